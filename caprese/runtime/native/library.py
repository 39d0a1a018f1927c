"""Build (once per machine, source and instruction set) and load decode_step.c; mirror its structs for ctypes and
check the mirror against the layout the compiled library reports. Sibling kernel files (quant_gemv.c) are built
the same way (`built(isa, source=...)`, `check_layout(..., mirrors=...)`).

The library is compiled with the system C compiler at first use into the caprese cache, keyed on the source, the
flags, the compiler's version and this CPU's feature flags, written to a temporary name and renamed, so
concurrent first uses and interrupted builds leave nothing half-written.

Instruction sets (`isa`, or $CAPRESE_NATIVE_ISA; default: the widest this CPU has):
  avx512  -march=native on a CPU with AVX-512F: AVX-512 intrinsics for the int8 head rows, the compiler's
          AVX-512 code elsewhere
  avx2    -march=native -mno-avx512f (on an AVX-512 CPU: what an AVX2-only machine of the same family runs)
  scalar  the portable C paths only: baseline target (x86-64: SSE2), no intrinsics, the vectorizer off
  native  non-x86 CPUs: -march=native, the compiler's own vectorization, no intrinsics
Each build reports what it was compiled for (`caprese_isa()`), and the backend's report names it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from caprese.errors import CapreseError

SOURCE = Path(__file__).with_name("decode_step.c")
_QGEMV, _INT8X = Path(__file__).with_name("quant_gemv.c"), Path(__file__).with_name("int8_activations.c")
INCLUDED = {SOURCE: (_QGEMV, _INT8X), _QGEMV: (_INT8X,)}  # the files a source #includes (build key)
# -fno-trapping-math: no FP traps are relied on, and without it GCC keeps the exp loops (activations, softmax) scalar
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
ISAS = ("avx512", "avx2", "scalar", "native")
ISA_ENV = "CAPRESE_NATIVE_ISA"
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


class Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("ld", ctypes.c_int64), ("cols", ctypes.c_int64)]


class QMat(ctypes.Structure):  # quant_gemv.c's QMat (decode_step.c #includes it)
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("block", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("scale_fp32", ctypes.c_int32), ("layout", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm",
                                                "q_norm", "k_norm")] + [
        ("qkv", Mat), ("qkv_bias", ctypes.c_void_p), ("o", Mat), ("o_bias", ctypes.c_void_p),
        ("gu1", Mat), ("gu2", Mat), ("gu_bias", ctypes.c_void_p), ("down", Mat), ("down_bias", ctypes.c_void_p),
        ("n_ff", ctypes.c_int64), ("rank", ctypes.c_int64), ("cats_tau", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("window", ctypes.c_int64),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("up_t", Mat), ("up_bias", ctypes.c_void_p),
        ("q_attn", ctypes.c_int64), ("q_ffn", ctypes.c_int64), ("down_rows", ctypes.c_int64),
        ("q_qkv", QMat), ("q_o", QMat), ("q_gate", QMat), ("q_up", QMat), ("q_down", QMat),
        ("bypass_f16", ctypes.c_int64), ("down_quads", ctypes.c_void_p), ("l_t", ctypes.c_void_p),
        ("l_ld", ctypes.c_int64)]


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                              "vocab", "capacity", "max_ff", "activation", "gemma")] + [
        ("eps", ctypes.c_float), ("final_softcap", ctypes.c_float), ("embed_scale", ctypes.c_float)] + [
        (n, ctypes.c_void_p) for n in ("embed", "lm_head", "final_norm", "rope_cos", "rope_sin")] + [
        ("layers", ctypes.POINTER(Layer)), ("logits", ctypes.c_void_p),
        ("head_q", ctypes.c_void_p), ("head_scale", ctypes.c_void_p), ("head_bound", ctypes.c_void_p),
        ("q_head", ctypes.c_int64), ("q_lm_head", QMat), ("int8_act", ctypes.c_int64),
        ("kv_f16", ctypes.c_int64), ("k_tiles", ctypes.c_int64)]


MIRRORS = (Mat, QMat, Layer, Model)  # every struct the library reads from Python
QG_R16 = 1  # QMat.layout: codes and scales in groups of 16 rows (int8_activations.c, caprese_qx_pack_r16)


def declare_r16(lib, qmat=None) -> None:
    """The r16 layout's entry points, in decode_step.c's and quant_gemv.c's builds alike (qmat: the QMat mirror
    the caller passes)."""
    for f in ("caprese_qx_r16_fits", "caprese_qx_pack_r16"):
        getattr(lib, f).restype = ctypes.c_int
        getattr(lib, f).argtypes = [ctypes.POINTER(qmat or QMat)]
    lib.caprese_qx_r16_preferred.restype = ctypes.c_int
    lib.caprese_qx_r16_preferred.argtypes = []


class LayoutField(ctypes.Structure):  # decode_step.c's LayoutField
    _fields_ = [("type", ctypes.c_char_p), ("field", ctypes.c_char_p), ("offset", ctypes.c_int64),
                ("size", ctypes.c_int64)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def best_isa(flags: str | None = None) -> str:
    """The widest instruction set this CPU runs (x86: avx512 > avx2 > scalar; elsewhere native)."""
    if not X86:
        return "native"
    have = set((flags if flags is not None else _cpu_flags()).split())
    if "avx512f" in have:
        return "avx512"
    if {"avx2", "fma"} <= have:
        return "avx2"
    return "scalar"


def resolve_isa(isa: str | None = None) -> str:
    """The instruction set to build for: `isa`, else $CAPRESE_NATIVE_ISA, else the CPU's widest; one that this CPU
    cannot run is a one-line error."""
    isa = (isa or os.environ.get(ISA_ENV) or best_isa()).strip().lower()
    if isa not in ISAS:
        raise CapreseError(f"unknown native instruction set {isa!r} (from {ISA_ENV} or isa=); use one of "
                           f"{', '.join(ISAS)}")
    have = set(_cpu_flags().split())
    if isa in ("avx512", "avx2") and not X86:
        raise CapreseError(f"{isa} is an x86-64 instruction set and this CPU is {platform.machine()}; use "
                           f"{ISA_ENV}=native or scalar")
    if isa == "avx512" and "avx512f" not in have:
        raise CapreseError(f"this CPU has no AVX-512 ({ISA_ENV}=avx512 asked); use avx2 or scalar")
    if isa == "avx2" and not {"avx2", "fma"} <= have:
        raise CapreseError(f"this CPU has no AVX2/FMA ({ISA_ENV}=avx2 asked); use scalar")
    if isa == "native" and X86:
        raise CapreseError(f"{ISA_ENV}=native is for non-x86 CPUs; on x86-64 use avx512, avx2 or scalar")
    return isa


def isa_flags(isa: str) -> list[str]:
    """The compiler flags of one instruction set (see the module docstring)."""
    if isa == "scalar":
        target = ["-march=x86-64", "-mtune=generic"] if X86 else []
        return BASE_FLAGS + target + ["-fno-tree-vectorize", "-fno-tree-slp-vectorize"]
    simd = BASE_FLAGS + ["-fopenmp-simd", "-march=native"]
    if isa == "avx2" and "avx512f" in _cpu_flags().split():
        return simd + ["-mno-avx512f"]
    return simd


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CapreseError("the native backend compiles a small C kernel at first use and found no C compiler; "
                           "install gcc (or set CC), or use --backend onnxruntime")
    return cc


def library_path(isa: str | None = None, source: Path = SOURCE) -> Path:
    """Where this machine's build of `source` (decode_step.c, or a sibling kernel file) for `isa` lives."""
    from caprese.model.default_model import cache_root

    isa = resolve_isa(isa)
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CapreseError(f"the C compiler {cc} does not run ({e}); set CC to a working one, or use "
                           "--backend onnxruntime") from None
    texts = [source.read_text()] + [p.read_text() for p in INCLUDED.get(source, ())]
    key = hashlib.sha256("\0".join([*texts, " ".join(isa_flags(isa)), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"{source.stem}-{isa}-{key}.so"


def build(path: Path, isa: str | None = None, source: Path = SOURCE) -> Path:
    """Compile `source` (decode_step.c by default) for `isa` to `path` (atomically); a failed build is a one-line
    error."""
    isa = resolve_isa(isa)
    cc = _compiler()
    what = "decode kernel" if source == SOURCE else f"kernel {source.name}"
    print(f"[caprese] building the native {what} ({isa}) with {cc} (once per machine) -> {path}",
          file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([cc, *isa_flags(isa), "-o", tmp, str(source), "-lm"], capture_output=True,
                                  text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:  # as library_path's version check words it
            raise CapreseError(f"the C compiler {cc} does not run ({e}); set CC to a working one, or use "
                               "--backend onnxruntime") from None
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
            raise CapreseError(f"building the native {what} with {cc} failed: {first}; use --backend "
                               "onnxruntime")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def built(isa: str | None = None, source: Path = SOURCE) -> Path:
    """This machine's build of `source` for `isa`, compiled now if there is none yet (library_path, build)."""
    path = library_path(isa, source)
    return path if path.exists() else build(path, isa, source)


def compiled_layout(lib: ctypes.CDLL) -> dict[str, dict[str, tuple[int, int]]]:
    """{struct: {field: (offset, size)}} as the compiled library laid them out; field "" is the struct's size."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    p = lib.caprese_layout_info()
    i = 0
    while p[i].type is not None:
        out.setdefault(p[i].type.decode(), {})[p[i].field.decode()] = (int(p[i].offset), int(p[i].size))
        i += 1
    return out


def check_layout(lib: ctypes.CDLL, path: Path | str, mirrors=MIRRORS) -> None:
    """Every ctypes mirror has the compiled struct's size and each field's offset and size, and no field more or
    less; the first difference is a one-line error."""
    compiled = compiled_layout(lib)
    for cls in mirrors:
        name = cls.__name__
        want = compiled.get(name)
        why = None
        if want is None:
            why = f"the library has no struct {name}"
        else:
            mine = {f[0]: (getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_}
            theirs = {k: v for k, v in want.items() if k}
            for field in list(theirs) + [f for f in mine if f not in theirs]:
                if field not in mine:
                    why = f"{name}.{field} is missing from the mirror"
                elif field not in theirs:
                    why = f"{name}.{field} is not in the compiled struct"
                elif mine[field] != theirs[field]:
                    why = (f"{name}.{field} is at offset {mine[field][0]} (size {mine[field][1]}) in the mirror and "
                           f"{theirs[field][0]} (size {theirs[field][1]}) in the library")
                if why:
                    break
            if why is None and ctypes.sizeof(cls) != want[""][1]:
                why = f"sizeof({name}) is {ctypes.sizeof(cls)} in the mirror and {want[''][1]} in the library"
        if why:
            raise CapreseError(f"the native kernel {path} does not match its ctypes mirror: {why}; "
                               "caprese/runtime/native/library.py and decode_step.c disagree (fix the mirror)")


_LOADED: dict[str, ctypes.CDLL] = {}


def load(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernel for `isa` (see resolve_isa), built now if this machine has no build of this source yet;
    its structs' layout checked against the ctypes mirror."""
    isa = resolve_isa(isa)
    if isa not in _LOADED:
        path = built(isa)
        try:
            lib = ctypes.CDLL(str(path))
            lib.caprese_layout_info.restype = ctypes.POINTER(LayoutField)
        except (OSError, AttributeError) as e:
            raise CapreseError(f"cannot load the native kernel {path} ({str(e).splitlines()[0]}); delete it to "
                               "rebuild, or use --backend onnxruntime") from None
        check_layout(lib, path)
        lib.caprese_isa.restype = ctypes.c_char_p
        lib.caprese_head_topk_max.restype = ctypes.c_int64
        lib.caprese_context_new.restype = ctypes.c_void_p
        lib.caprese_context_new.argtypes = [ctypes.POINTER(Model), ctypes.c_int64]
        for f in ("caprese_context_free", "caprese_context_quiesce"):
            getattr(lib, f).restype = None
            getattr(lib, f).argtypes = [ctypes.c_void_p]
        lib.caprese_context_set_active.restype = None
        lib.caprese_context_set_active.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.caprese_context_stats.restype = None
        lib.caprese_context_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
        lib.caprese_context_profile.restype = ctypes.c_int64
        lib.caprese_context_profile.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
        lib.caprese_context_set_fused_ffn.restype = None
        lib.caprese_context_set_fused_ffn.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.caprese_context_debug_stall.restype = None
        lib.caprese_context_debug_stall.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        lib.caprese_decode_step.restype = ctypes.c_int
        lib.caprese_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
        i64p = ctypes.POINTER(ctypes.c_int64)
        f64, f32p = ctypes.c_double, ctypes.POINTER(ctypes.c_float)
        lib.caprese_decode_n.restype = ctypes.c_int64
        lib.caprese_decode_n.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, i64p,
                                         ctypes.c_int64, f64, ctypes.c_int64, f64, ctypes.c_int64,
                                         ctypes.POINTER(ctypes.c_double), i64p, i64p, i64p, i64p]
        lib.caprese_sample_logits.restype = ctypes.c_int64
        lib.caprese_sample_logits.argtypes = [f32p, ctypes.c_int64, f64, ctypes.c_int64, f64, f64]
        lib.caprese_qa_quads.restype = ctypes.c_int
        lib.caprese_qa_quads_bytes.restype = ctypes.c_int64
        lib.caprese_qa_quads_bytes.argtypes = [ctypes.POINTER(QMat)]
        lib.caprese_qa_fits.restype = ctypes.c_int
        lib.caprese_qa_fits.argtypes = [ctypes.POINTER(QMat)]
        lib.caprese_qa_pack_quads.restype = None
        lib.caprese_qa_pack_quads.argtypes = [ctypes.POINTER(QMat), ctypes.c_void_p]
        declare_r16(lib)
        lib.caprese_kv_tiles.restype = ctypes.c_int
        lib.caprese_kv_tiles.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_int64]
        lib.caprese_head_only.restype = ctypes.c_int
        lib.caprese_head_only.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
        built_for = lib.caprese_isa().decode()
        if built_for != isa and isa != "native":
            raise CapreseError(f"{path} was built for {isa} but runs the {built_for} code paths (the compiler "
                               f"{_compiler()} ignored the flags?); set CC to gcc or clang")
        lib.path = path  # where it was loaded from (for reports; library_path() would run the compiler again)
        lib.isa = isa if isa == "native" else built_for  # the instruction set its code paths use
        lib.head_topk_max = int(lib.caprese_head_topk_max())  # the largest k of a screened top-k step
        _LOADED[isa] = lib
    return _LOADED[isa]
