"""Build (once per machine and source) and load decode_step.c, and mirror its structs for ctypes.

The library is compiled with the system C compiler at first use (-O3 -march=native -fopenmp) into the caprese
cache, keyed on the source, the flags, the compiler's version and this CPU's feature flags, written to a
temporary name and renamed, so concurrent first uses and interrupted builds leave nothing half-written.
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
ABI = 3
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]


class Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("ld", ctypes.c_int64), ("cols", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm",
                                                "q_norm", "k_norm")] + [
        ("qkv", Mat), ("qkv_bias", ctypes.c_void_p), ("o", Mat), ("o_bias", ctypes.c_void_p),
        ("gu1", Mat), ("gu2", Mat), ("gu_bias", ctypes.c_void_p), ("down", Mat), ("down_bias", ctypes.c_void_p),
        ("n_ff", ctypes.c_int64), ("rank", ctypes.c_int64), ("cats_tau", ctypes.c_void_p),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("window", ctypes.c_int64),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("up_t", Mat), ("up_bias", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("abi", "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim",
                                              "vocab", "capacity", "max_ff", "threads", "activation", "gemma")] + [
        ("eps", ctypes.c_float), ("final_softcap", ctypes.c_float), ("embed_scale", ctypes.c_float)] + [
        (n, ctypes.c_void_p) for n in ("embed", "lm_head", "final_norm", "rope_cos", "rope_sin")] + [
        ("layers", ctypes.POINTER(Layer)), ("logits", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
        ("head_q", ctypes.c_void_p), ("head_scale", ctypes.c_void_p), ("head_bound", ctypes.c_void_p)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CapreseError("the native backend compiles a small C kernel at first use and found no C compiler; "
                           "install gcc (or set CC), or use --backend onnxruntime")
    return cc


def library_path() -> Path:
    from caprese.model.default_model import cache_root

    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CapreseError(f"the C compiler {cc} does not run ({e}); set CC to a working one, or use "
                           "--backend onnxruntime") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"decode_step-{key}.so"


def build(path: Path) -> Path:
    """Compile decode_step.c to `path` (atomically); a failed build is a one-line error."""
    cc = _compiler()
    print(f"[caprese] building the native decode kernel with {cc} (once per machine) -> {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
            raise CapreseError(f"building the native decode kernel with {cc} failed: {first}; use --backend "
                               "onnxruntime")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_LOADED: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The compiled kernel (built now if this machine has no build of this source yet)."""
    global _LOADED
    if _LOADED is None:
        path = library_path()
        if not path.exists():
            build(path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise CapreseError(f"cannot load the native kernel {path} ({str(e).splitlines()[0]}); delete it to "
                               "rebuild, or use --backend onnxruntime") from None
        lib.caprese_native_abi.restype = ctypes.c_int64
        lib.caprese_head_topk_max.restype = ctypes.c_int64
        lib.caprese_scratch_floats.restype = ctypes.c_int64
        lib.caprese_scratch_floats.argtypes = [ctypes.POINTER(Model)]
        lib.caprese_decode_step.restype = ctypes.c_int
        lib.caprese_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_int64,
                                           ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
        if lib.caprese_native_abi() != ABI:
            raise CapreseError(f"{path} is a native kernel of another version; delete it and run again")
        lib.path = path  # where it was loaded from (for reports; library_path() would run the compiler again)
        lib.head_topk_max = int(lib.caprese_head_topk_max())  # the largest k of a screened top-k step
        _LOADED = lib
    return _LOADED
