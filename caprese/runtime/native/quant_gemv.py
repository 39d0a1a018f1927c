"""ctypes entry points of quant_gemv.c: rows-dot and rows-axpy over caprese's quantized weights (int8 / int4, blocks
of 32 / 64 / 128 or ROW, fp16 / fp32 scales), for tests, benchmarks and the decode step's Python side.

The kernels read the bytes `QuantizedTensor.packed()` holds and its scales as stored, so the weights the native
kernel multiplies are the very bytes export writes. Built per instruction set like decode_step.c
(`library.built(isa, source=SOURCE)`), and QMat's layout is checked against the compiled one at load.

    qm = QMatrix(quantize_rtn(w, WeightFormat(4, 32)))   # w [out, in], blocks along `in`
    y = rows_dot(qm, x)                                  # y[i] = sum_c x[c] * w_hat[i, c]
    y = rows_dot(qm, x, rows=kept)                       # GRIFFIN: only the rows `kept`
    rows_axpy(qd, h, y)                                  # qd [F, D] (down, blocks along D): y += h @ w_hat,
                                                         # rows with h == 0 not read (CATS)
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from caprese.errors import CapreseError
from caprese.model.quantization import QuantizedTensor
from caprese.runtime.native import library

SOURCE = Path(__file__).with_name("quant_gemv.c")
_I64P = ctypes.POINTER(ctypes.c_int64)
_F32P = ctypes.POINTER(ctypes.c_float)


class QMat(ctypes.Structure):  # quant_gemv.c's QMat
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("block", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("scale_fp32", ctypes.c_int32), ("layout", ctypes.c_int64)]


_LOADED: dict[str, ctypes.CDLL] = {}


def load(isa: str | None = None) -> ctypes.CDLL:
    """quant_gemv.c built for `isa` (library.resolve_isa: avx512 | avx2 | scalar, default the CPU's widest)."""
    isa = library.resolve_isa(isa)
    if isa not in _LOADED:
        path = library.built(isa, source=SOURCE)
        try:
            lib = ctypes.CDLL(str(path))
            lib.caprese_layout_info.restype = ctypes.POINTER(library.LayoutField)
        except (OSError, AttributeError) as e:
            raise CapreseError(f"cannot load the native kernel {path} ({str(e).splitlines()[0]}); delete it to "
                               "rebuild") from None
        library.check_layout(lib, path, mirrors=(QMat,))
        lib.caprese_isa.restype = ctypes.c_char_p
        for f in ("caprese_q_rows_dot", "caprese_q_rows_axpy"):
            getattr(lib, f).restype = None
            getattr(lib, f).argtypes = [ctypes.POINTER(QMat), _F32P, _I64P, ctypes.c_int64, ctypes.c_int64, _F32P]
        for f in ("caprese_q_rows_dot_prepared", "caprese_q_rows_axpy_prepared"):
            getattr(lib, f).restype = None
            getattr(lib, f).argtypes = [ctypes.POINTER(QMat), _F32P, _I64P, ctypes.c_int64, ctypes.c_int64, _F32P]
        for f in ("caprese_q_prepare_x", "caprese_q_finish_y"):
            getattr(lib, f).restype = None
            getattr(lib, f).argtypes = [ctypes.POINTER(QMat), _F32P, _F32P]
        lib.caprese_f32_rows_dot.restype = None
        lib.caprese_f32_rows_dot.argtypes = [_F32P, ctypes.c_int64, ctypes.c_int64, _F32P, _I64P, ctypes.c_int64,
                                             ctypes.c_int64, _F32P]
        lib.caprese_q_rows_dot_int8x.restype = ctypes.c_int
        lib.caprese_q_rows_dot_int8x.argtypes = [ctypes.POINTER(QMat), _F32P, _I64P, ctypes.c_int64, ctypes.c_int64,
                                                 _F32P]
        lib.caprese_q_rows_dot_int8x_cols.restype = ctypes.c_int
        lib.caprese_q_rows_dot_int8x_cols.argtypes = [ctypes.POINTER(QMat), _F32P, ctypes.c_int64, ctypes.c_int64,
                                                      ctypes.c_int64, ctypes.c_int64, _F32P]
        lib.caprese_qa_fits.restype = ctypes.c_int
        lib.caprese_qa_fits.argtypes = [ctypes.POINTER(QMat)]
        lib.caprese_q_rows_axpy_qa.restype = None
        lib.caprese_q_rows_axpy_qa.argtypes = [ctypes.POINTER(QMat), _F32P, _I64P, ctypes.c_int64, ctypes.c_int64,
                                               ctypes.c_int64, _F32P]
        lib.caprese_q_rows_axpy_qw.restype = None
        lib.caprese_q_rows_axpy_qw.argtypes = [ctypes.POINTER(QMat), _F32P, _I64P, ctypes.c_int64, ctypes.c_int64,
                                               ctypes.c_int64, _F32P]
        lib.caprese_qa_quads.restype = ctypes.c_int
        lib.caprese_qa_quads.argtypes = []
        lib.caprese_qa_quads_bytes.restype = ctypes.c_int64
        lib.caprese_qa_quads_bytes.argtypes = [ctypes.POINTER(QMat)]
        lib.caprese_qa_pack_quads.restype = None
        lib.caprese_qa_pack_quads.argtypes = [ctypes.POINTER(QMat), ctypes.c_void_p]
        lib.caprese_q_rows_axpy_quads.restype = None
        lib.caprese_q_rows_axpy_quads.argtypes = [ctypes.POINTER(QMat), ctypes.c_void_p, ctypes.c_int64, _F32P,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _F32P]
        library.declare_r16(lib, QMat)
        lib.caprese_q_bench.restype = ctypes.c_double
        lib.caprese_q_bench.argtypes = [ctypes.c_int, ctypes.POINTER(QMat), ctypes.c_int64, _F32P, _F32P,
                                        ctypes.c_int64, ctypes.c_int64]
        built_for = lib.caprese_isa().decode()
        if built_for != isa and isa != "native":
            raise CapreseError(f"{path} was built for {isa} but runs the {built_for} code paths; set CC to gcc "
                               "or clang")
        lib.path, lib.isa = path, built_for
        _LOADED[isa] = lib
    return _LOADED[isa]


class QMatrix:
    """A QuantizedTensor as the C kernel reads it: its packed code bytes and scales (kept alive here) and the
    QMat that points at them."""

    def __init__(self, qt: QuantizedTensor):
        self.qt = qt
        self.packed = qt.packed().contiguous()
        self.scales = qt.scales.contiguous()
        rows, cols = qt.shape
        self.struct = QMat(self.packed.data_ptr(), self.scales.data_ptr(), rows, cols, qt.fmt.block(cols),
                           qt.fmt.bits, int(qt.fmt.scale_dtype == "fp32"))

    @property
    def shape(self) -> tuple[int, int]:
        return self.qt.shape

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()


def _f32(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n or t.device.type != "cpu":
        raise CapreseError(f"{what} must be a CPU float32 vector of {n} elements, got {t.dtype} {list(t.shape)} on "
                           f"{t.device}")
    return t.contiguous()


def _rows(rows: torch.Tensor | None, n_rows: int) -> tuple[torch.Tensor | None, int]:
    if rows is None:
        return None, n_rows
    rows = torch.as_tensor(rows, dtype=torch.int64).contiguous()
    if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_rows)):
        raise CapreseError(f"row indices must be a vector of rows in [0, {n_rows})")
    return rows, rows.numel()


def _ptr(t: torch.Tensor | None, kind):
    return None if t is None else ctypes.cast(t.data_ptr(), kind)


def rows_dot(qm: QMatrix, x: torch.Tensor, rows: torch.Tensor | None = None, r0: int = 0, r1: int | None = None,
             isa: str | None = None) -> torch.Tensor:
    """y[i] = sum_c x[c] * w_hat[row_i, c] for i in [r0, r1) (row_i = rows[i], or i); y has r1 - r0 entries."""
    n_rows, cols = qm.shape
    x = _f32(x, cols, "x")
    idx, n = _rows(rows, n_rows)
    r1 = n if r1 is None else r1
    if not 0 <= r0 <= r1 <= n:
        raise CapreseError(f"row range [{r0}, {r1}) is outside [0, {n})")
    y = torch.empty(n, dtype=torch.float32)
    load(isa).caprese_q_rows_dot(ctypes.byref(qm.struct), _ptr(x, _F32P), _ptr(idx, _I64P), r0, r1, _ptr(y, _F32P))
    return y[r0:r1]


def _axpy_args(qm: QMatrix, h: torch.Tensor, y: torch.Tensor | None, rows: torch.Tensor | None, r0: int,
               r1: int | None):
    """rows-axpy's arguments checked: (row indices or None, h as float32, r1, y: zeros when not given)."""
    n_rows, cols = qm.shape
    idx, n = _rows(rows, n_rows)
    h = _f32(h, n, "h")
    r1 = n if r1 is None else r1
    if not 0 <= r0 <= r1 <= n:
        raise CapreseError(f"row range [{r0}, {r1}) is outside [0, {n})")
    if y is None:
        y = torch.zeros(cols, dtype=torch.float32)
    elif y.dtype != torch.float32 or y.dim() != 1 or y.numel() != cols or not y.is_contiguous():
        raise CapreseError(f"y must be a contiguous float32 vector of {cols} elements")
    return idx, h, r1, y


def rows_axpy(qm: QMatrix, h: torch.Tensor, y: torch.Tensor | None = None, rows: torch.Tensor | None = None,
              r0: int = 0, r1: int | None = None, isa: str | None = None) -> torch.Tensor:
    """y[c] += sum_{i in [r0, r1), h[i] != 0} h[i] * w_hat[row_i, c] (row_i = rows[i], or i); y (float32 [cols])
    is updated in place and returned (zeros when not given). Rows whose h is 0 are not read."""
    idx, h, r1, y = _axpy_args(qm, h, y, rows, r0, r1)
    load(isa).caprese_q_rows_axpy(ctypes.byref(qm.struct), _ptr(h, _F32P), _ptr(idx, _I64P), r0, r1,
                                  _ptr(y, _F32P))
    return y


def prepare_x(qm: QMatrix, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """x in the kernel's order (int4 groups de-interleaved in the SIMD builds), for rows_dot_prepared."""
    x = _f32(x, qm.shape[1], "x")
    xp = torch.empty_like(x)
    load(isa).caprese_q_prepare_x(ctypes.byref(qm.struct), _ptr(x, _F32P), _ptr(xp, _F32P))
    return xp


def rows_dot_prepared(qm: QMatrix, xp: torch.Tensor, rows: torch.Tensor | None = None, r0: int = 0,
                      r1: int | None = None, isa: str | None = None) -> torch.Tensor:
    """rows_dot from prepare_x's vector (what each thread-pool chunk of one x calls)."""
    n_rows, cols = qm.shape
    xp = _f32(xp, cols, "prepared x")
    idx, n = _rows(rows, n_rows)
    r1 = n if r1 is None else r1
    if not 0 <= r0 <= r1 <= n:
        raise CapreseError(f"row range [{r0}, {r1}) is outside [0, {n})")
    y = torch.empty(n, dtype=torch.float32)
    load(isa).caprese_q_rows_dot_prepared(ctypes.byref(qm.struct), _ptr(xp, _F32P), _ptr(idx, _I64P), r0, r1,
                                          _ptr(y, _F32P))
    return y[r0:r1]


def rows_axpy_prepared(qm: QMatrix, h: torch.Tensor, yp: torch.Tensor, rows: torch.Tensor | None = None,
                       r0: int = 0, r1: int | None = None, isa: str | None = None) -> torch.Tensor:
    """yp += the chunk's rows, yp in the kernel's order (start from zeros; finish_y adds it into y)."""
    n_rows, cols = qm.shape
    idx, n = _rows(rows, n_rows)
    h = _f32(h, n, "h")
    r1 = n if r1 is None else r1
    if not 0 <= r0 <= r1 <= n:
        raise CapreseError(f"row range [{r0}, {r1}) is outside [0, {n})")
    if yp.dtype != torch.float32 or yp.dim() != 1 or yp.numel() != cols or not yp.is_contiguous():
        raise CapreseError(f"yp must be a contiguous float32 vector of {cols} elements")
    load(isa).caprese_q_rows_axpy_prepared(ctypes.byref(qm.struct), _ptr(h, _F32P), _ptr(idx, _I64P), r0, r1,
                                           _ptr(yp, _F32P))
    return yp


def finish_y(qm: QMatrix, yp: torch.Tensor, y: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """y += yp (yp in the kernel's order), in place."""
    cols = qm.shape[1]
    for t, what in ((yp, "yp"), (y, "y")):
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != cols or not t.is_contiguous():
            raise CapreseError(f"{what} must be a contiguous float32 vector of {cols} elements")
    load(isa).caprese_q_finish_y(ctypes.byref(qm.struct), _ptr(yp, _F32P), _ptr(y, _F32P))
    return y


def f32_rows_dot(w: torch.Tensor, x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """The fp32 baseline: y = w @ x for w float32 [rows, cols] (the same 4-row loop as the decode step's head)."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu":  # the kernel reads 4 bytes an element
        raise CapreseError(f"w must be a CPU float32 matrix, got {w.dtype} {list(w.shape)} on {w.device}")
    w = w.contiguous()
    rows, cols = w.shape
    x = _f32(x, cols, "x")
    y = torch.empty(rows, dtype=torch.float32)
    load(isa).caprese_f32_rows_dot(_ptr(w, _F32P), cols, cols, _ptr(x, _F32P), None, 0, rows, _ptr(y, _F32P))
    return y


def rows_dot_int8_activations(qm: QMatrix, x: torch.Tensor, rows: torch.Tensor | None = None,
                              isa: str | None = None, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """int4 rows-dot with x rounded to int8 per block (int8_activations.c: what an engine exported with
    --int8-activations computes): y[i] for every row, or the rows `rows` (GRIFFIN); only y[r0:r1] is computed
    (the rest is NaN)."""
    n_rows, cols = qm.shape
    idx, n = _rows(rows, n_rows)
    r1 = n if r1 is None else r1
    if not 0 <= r0 <= r1 <= n:
        raise CapreseError(f"rows [{r0}, {r1}) outside [0, {n})")
    x = _f32(x, cols, "x")
    y = torch.full((n,), float("nan"), dtype=torch.float32)
    rc = load(isa).caprese_q_rows_dot_int8x(ctypes.byref(qm.struct), _ptr(x, _F32P), _ptr(idx, _I64P), r0, r1,
                                            _ptr(y, _F32P))
    return _int8x_result(rc, y, f"int8 activations take int4 weights with columns a multiple of 32 in blocks of 32, "
                                f"64, 128 or one per row (got {qm.qt.fmt.name} {list(qm.shape)})")


def _int8x_result(rc: int, y: torch.Tensor, misfit: str) -> torch.Tensor:
    """y, or the one-line error for an int8-activation call's code (-1: the arguments do not fit; -2: memory)."""
    if rc == -1:
        raise CapreseError(misfit)
    if rc:
        raise CapreseError("out of memory quantizing the activations")
    return y


def rows_dot_int8_activations_cols(qm: QMatrix, x: torch.Tensor, c0: int, c1: int, r0: int = 0,
                                   r1: int | None = None, isa: str | None = None) -> torch.Tensor:
    """Rows [r0, r1) of an r16 matrix (pack_r16) times x over its columns [c0, c1) only, x[c0:c1] rounded to int8 in
    the weight's blocks: the decode step's dense down product per neuron chunk (a partial sum). y[r0:r1]; the rest
    is NaN."""
    n_rows, cols = qm.shape
    r1 = n_rows if r1 is None else r1
    x = _f32(x, cols, "x")
    y = torch.full((n_rows,), float("nan"), dtype=torch.float32)
    rc = load(isa).caprese_q_rows_dot_int8x_cols(ctypes.byref(qm.struct), _ptr(x, _F32P), c0, c1, r0, r1,
                                                 _ptr(y, _F32P))
    return _int8x_result(rc, y, f"columns [{c0}, {c1}) and rows [{r0}, {r1}) must be whole blocks and whole groups "
                                f"of 16 of an r16 matrix (got {list(qm.shape)}, block {qm.struct.block})")


def pack_r16(qm: QMatrix, isa: str | None = None) -> QMatrix:
    """A copy of qm in the r16 layout (int8_activations.c: groups of 16 rows, what the decode step repacks its
    int8-activation rows-dot weights into where caprese_qx_r16_preferred()); rows_dot_int8_activations reads it."""
    lib = load(isa)
    if not lib.caprese_qx_r16_fits(ctypes.byref(qm.struct)):
        raise CapreseError(f"the r16 layout takes int4 weights with rows a multiple of 16 and columns a multiple "
                           f"of 32 in blocks of 32, 64, 128 or one per row (got {qm.qt.fmt.name} {list(qm.shape)})")
    out = QMatrix(qm.qt)
    out.packed, out.scales = qm.packed.clone(), qm.scales.clone()
    out.struct.codes, out.struct.scales = out.packed.data_ptr(), out.scales.data_ptr()
    if lib.caprese_qx_pack_r16(ctypes.byref(out.struct)):
        raise CapreseError("out of memory repacking into the r16 layout")
    out.struct.layout = library.QG_R16
    return out


def _require_qa_fits(lib, qm: QMatrix, what: str) -> None:
    """The rounded-coefficient rows-axpy's format (caprese_qa_fits), or a one-line error naming `what`."""
    if not lib.caprese_qa_fits(ctypes.byref(qm.struct)):
        raise CapreseError(f"{what} takes int4 weights with columns a multiple of 32 in blocks of 32, 64, 128 or "
                           f"one per row (got {qm.qt.fmt.name} {list(qm.shape)})")


def _rounded_axpy(qm: QMatrix, h, y, rows, r0, r1, isa, bits: int, entry: str) -> torch.Tensor:
    idx, h, r1, y = _axpy_args(qm, h, y, rows, r0, r1)
    lib = load(isa)
    _require_qa_fits(lib, qm, f"int{bits}-coefficient rows-axpy")
    getattr(lib, entry)(ctypes.byref(qm.struct), _ptr(h, _F32P), _ptr(idx, _I64P), r0, r1, r1, _ptr(y, _F32P))
    return y


def rows_axpy_int8_activations(qm: QMatrix, h: torch.Tensor, y: torch.Tensor | None = None,
                               rows: torch.Tensor | None = None, r0: int = 0, r1: int | None = None,
                               isa: str | None = None) -> torch.Tensor:
    """rows-axpy with the coefficients rounded to int8 per group of 32 rows and column block (int8_activations.c:
    GRIFFIN's down on an engine exported with --int8-activations, native `int8_down`): y += over rows [r0, r1),
    in place."""
    return _rounded_axpy(qm, h, y, rows, r0, r1, isa, 8, "caprese_q_rows_axpy_qa")


def rows_axpy_int16_coefficients(qm: QMatrix, h: torch.Tensor, y: torch.Tensor | None = None,
                                 rows: torch.Tensor | None = None, r0: int = 0, r1: int | None = None,
                                 isa: str | None = None) -> torch.Tensor:
    """The same with 16-bit coefficients (32512 levels; int8_activations.c, caprese_q_rows_axpy_qw): GRIFFIN's down
    on an engine exported with --int8-activations, by default."""
    return _rounded_axpy(qm, h, y, rows, r0, r1, isa, 16, "caprese_q_rows_axpy_qw")


def pack_quads(qm: QMatrix, isa: str | None = None) -> torch.Tensor | None:
    """qm's codes in the quads layout GRIFFIN's down is repacked into once per prompt (int8_activations.c), or None
    where the build reads the plain layout (the scalar build)."""
    lib = load(isa)
    _require_qa_fits(lib, qm, "the quads layout")
    if not lib.caprese_qa_quads():
        return None
    out = torch.empty(int(lib.caprese_qa_quads_bytes(ctypes.byref(qm.struct))), dtype=torch.uint8)
    lib.caprese_qa_pack_quads(ctypes.byref(qm.struct), out.data_ptr())
    return out


def rows_axpy_quads(qm: QMatrix, quads: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor | None = None,
                    r0: int = 0, r1: int | None = None, bits: int = 16, isa: str | None = None) -> torch.Tensor:
    """rows_axpy_int16_coefficients (bits=16) / rows_axpy_int8_activations (8) over rows [r0, r1) (r0 % 4 == 0) read
    from pack_quads(qm)'s bytes: the same sums; quads None (a build without the layout): the plain entry point."""
    idx, h, r1, y = _axpy_args(qm, h, y, None, r0, r1)
    if r0 % 4 or bits not in (8, 16):
        raise CapreseError(f"quads rows-axpy takes r0 a multiple of 4 and bits 8 or 16 (got r0={r0}, bits={bits})")
    lib = load(isa)
    _require_qa_fits(lib, qm, "the quads layout")
    if lib.caprese_qa_quads():  # the layout's build reads quads: they must be pack_quads(qm)'s bytes
        want = int(lib.caprese_qa_quads_bytes(ctypes.byref(qm.struct)))
        if quads is None or quads.dtype != torch.uint8 or quads.device.type != "cpu" or quads.numel() != want:
            raise CapreseError(f"quads must be pack_quads(qm)'s {want} uint8 bytes on the CPU")
        quads = quads.contiguous()
    lib.caprese_q_rows_axpy_quads(ctypes.byref(qm.struct), None if quads is None else quads.data_ptr(),
                                        int(bits == 16), _ptr(h, _F32P), r0, r1, r1, _ptr(y, _F32P))
    return y
