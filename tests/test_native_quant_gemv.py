"""quant_gemv.c (rows-dot and rows-axpy over caprese's int8 / int4 block-quantized weights) against float64.

Reference: quantization.dequantize(qt) (the format's own values, exact in float32 for fp16 scales) widened to
float64, times x in float64. Every combination of kernel x {int4, int8} x {block 32, 64, 128, ROW} x {fp16, fp32
scales} x {the avx512 / avx2 / scalar builds this CPU runs}, on shapes with rows not a multiple of 4 and columns
not a multiple of the vector groups (ROW), columns over one 4096-column tile, the -8 / -128 codes, row subsets
and ranges, CATS' zero rows (given NaN scales, so a kernel that reads them fails), and the int4 nibble order.

Tolerance (fp32 activations, fp32 accumulation): the kernel sums n products in fp32 in another order than the
reference, and with fp32 scales multiplies by the scale once per block instead of per element (a relative
difference of one rounding per term). Its error is a sum of n roundings of partial sums, each <= u = 2^-24
relative: bounded by about u * sqrt(n) * sum|w x| for random-signed rounding errors (the worst case is n u).
The tests allow 4 u sqrt(n) sum_c |w_hat x| + 1e-30 per output, and print the largest error in units of
u * sum|w x|. A bug moves an output by a whole term: one wrong or missing element among n is ~sum|w x| / n,
above the bound for every n here (n <= 5000: 4 u sqrt(n) <= 1.7e-5 < 1 / n)."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from caprese.errors import CapreseError
from caprese.model.quantization import ROW, QuantizedTensor, WeightFormat, pack_int4, quantize_rtn
from caprese.runtime.native import library
from caprese.runtime.native import quant_gemv as qg

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler (the native kernels are built with one)")

U = 2.0 ** -24


def _isas() -> list[str]:
    """Every build this CPU runs (avx512, avx2, scalar on x86-64; native, scalar elsewhere)."""
    out = []
    for isa in library.ISAS:
        try:
            library.resolve_isa(isa)
            out.append(isa)
        except CapreseError:
            pass
    return out


def _cpu_flags() -> set[str]:
    try:
        return next((set(ln.split(":", 1)[1].split()) for ln in open("/proc/cpuinfo") if ln.startswith("flags")),
                    set())
    except OSError:
        return set()


ISAS = _isas()
FORMATS = [WeightFormat(bits, block, sd) for bits in (4, 8) for block in (32, 64, 128, ROW) for sd in ("fp16", "fp32")]


def _fid(f: WeightFormat) -> str:
    return f"int{f.bits}-b{f.block_name}-{f.scale_dtype}"


def _quant(rows: int, cols: int, fmt: WeightFormat, seed: int, extremes: bool = True) -> QuantizedTensor:
    """RTN of a random matrix whose rows have different magnitudes; with `extremes`, some codes set to the most
    negative value (-8 / -128: decoders must accept it though our quantizers never emit it)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    qt = quantize_rtn(w, fmt)
    if extremes:
        codes = qt.codes.clone()
        lo = -8 if fmt.bits == 4 else -128
        mask = torch.rand(rows, cols, generator=g) < 0.05
        codes[mask] = lo
        codes[0, : min(cols, 8)] = lo  # whole first bytes of row 0
        qt = QuantizedTensor(codes, qt.scales, fmt)
    return qt


def _ref(qt: QuantizedTensor) -> torch.Tensor:
    return qt.dequantize(torch.float32).to(torch.float64)


def _check(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, n: int, what: str) -> None:
    """|got - want| <= 4 u sqrt(n) * scale (scale = sum |w x| per output)."""
    err = (got.to(torch.float64) - want).abs()
    bound = 4 * U * math.sqrt(max(n, 1)) * scale + 1e-30
    worst = float((err / (U * scale + 1e-300)).max()) if err.numel() else 0.0
    print(f"{what}: max |err| = {float(err.max()) if err.numel() else 0:.3g}, "
          f"{worst:.2f} u*sum|wx| (bound {4 * math.sqrt(max(n, 1)):.1f})")
    assert torch.isfinite(got).all(), what
    assert bool((err <= bound).all()), f"{what}: error {float((err / bound).max()):.3g}x the bound"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
def test_rows_dot_against_float64(isa, fmt):
    # rows 37 (not a multiple of 4), cols 4480 = 35 blocks of 128 over two tiles (4096 + 384); cols 768: int4
    # rows of 384 bytes, the shortest the kernel reads two at a time (QG_PAIR_BYTES; 256: four at a time); ROW
    # also cols 200 (not a multiple of 16 or 32: the scalar tail of the row block) and 6 (shorter than one group)
    shapes = [(37, 4480), (5, 256), (23, 768)] + ([(11, 200), (3, 6), (9, 4106)] if fmt.block_size == ROW else [])
    for k, (rows, cols) in enumerate(shapes):
        qt = _quant(rows, cols, fmt, seed=k)
        x = torch.randn(cols, generator=torch.Generator().manual_seed(100 + k))
        w = _ref(qt)
        want = w @ x.double()
        y = qg.rows_dot(qg.QMatrix(qt), x, isa=isa)
        _check(y, want, w.abs() @ x.double().abs(), cols, f"{isa} {_fid(fmt)} dot {rows}x{cols}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
def test_rows_axpy_against_float64(isa, fmt):
    shapes = [(37, 4480), (6, 128)] + ([(13, 200), (3, 6)] if fmt.block_size == ROW else [])
    for k, (rows, cols) in enumerate(shapes):
        qt = _quant(rows, cols, fmt, seed=10 + k)
        g = torch.Generator().manual_seed(200 + k)
        h = torch.randn(rows, generator=g)
        y0 = torch.randn(cols, generator=g)  # y is accumulated into
        w = _ref(qt)
        want = y0.double() + h.double() @ w
        y = qg.rows_axpy(qg.QMatrix(qt), h, y0.clone(), isa=isa)
        _check(y, want, y0.double().abs() + h.double().abs() @ w.abs(), rows + 1, f"{isa} {_fid(fmt)} axpy")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", (4, 8))
def test_row_subsets_and_ranges(isa, bits):
    """GRIFFIN's kept rows (an index list, any order, repeats allowed) and thread-pool chunks [r0, r1): each
    chunk gives exactly the rows of the whole call (the same bits: a row's sum does not depend on its chunk)."""
    fmt = WeightFormat(bits, 32, "fp16")
    qt = _quant(50, 640, fmt, seed=3)
    qm = qg.QMatrix(qt)
    w = _ref(qt)
    x = torch.randn(640, generator=torch.Generator().manual_seed(4))
    kept = torch.tensor([49, 0, 7, 7, 31, 2, 18, 44, 13, 5, 48], dtype=torch.int64)
    y = qg.rows_dot(qm, x, rows=kept, isa=isa)
    wk = w[kept]
    _check(y, wk @ x.double(), wk.abs() @ x.double().abs(), 640, f"{isa} int{bits} dot kept")
    chunks = [qg.rows_dot(qm, x, rows=kept, r0=a, r1=b, isa=isa) for a, b in ((0, 3), (3, 4), (4, 11))]
    assert torch.equal(torch.cat(chunks), y)
    whole = qg.rows_dot(qm, x, isa=isa)
    assert torch.equal(qg.rows_dot(qm, x, r0=13, r1=29, isa=isa), whole[13:29])
    # axpy over the kept rows with a compact h (h[i] goes with row kept[i]), and over chunks added up
    h = torch.randn(kept.numel(), generator=torch.Generator().manual_seed(5))
    ya = qg.rows_axpy(qg.QMatrix(_quant(50, 640, fmt, seed=6)), h, rows=kept, isa=isa)
    wd = _ref(_quant(50, 640, fmt, seed=6))[kept]
    _check(ya, h.double() @ wd, h.double().abs() @ wd.abs(), kept.numel(), f"{isa} int{bits} axpy kept")
    qd = qg.QMatrix(_quant(50, 640, fmt, seed=6))
    part = torch.zeros(640)
    for a, b in ((0, 5), (5, 6), (6, 11)):
        qg.rows_axpy(qd, h, part, rows=kept, r0=a, r1=b, isa=isa)
    _check(part, h.double() @ wd, h.double().abs() @ wd.abs(), kept.numel(), f"{isa} int{bits} axpy chunks")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", (4, 8))
def test_axpy_skips_zero_rows(isa, bits):
    """CATS: a row whose coefficient is 0 (or -0) is not read. Those rows get NaN scales, so reading one (0 * NaN)
    would make y NaN; the result must equal the reference over the passing rows alone."""
    fmt = WeightFormat(bits, 64, "fp32")
    qt = _quant(23, 320, fmt, seed=8)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(23, generator=g)
    skipped = torch.tensor([0, 3, 4, 5, 6, 11, 22])
    h[skipped] = 0.0
    h[4] = -0.0
    scales = qt.scales.clone()
    scales[skipped] = float("nan")
    poisoned = QuantizedTensor(qt.codes, scales, fmt)
    w = _ref(qt)
    y = qg.rows_axpy(qg.QMatrix(poisoned), h, isa=isa)
    _check(y, h.double() @ w, h.double().abs() @ w.abs(), 23, f"{isa} int{bits} axpy CATS")
    # and the same with a row subset: position i of h goes with row rows[i]
    rows = torch.tensor([22, 1, 3, 2])
    hs = torch.tensor([0.0, 1.5, 0.0, -2.0])
    y = qg.rows_axpy(qg.QMatrix(poisoned), hs, rows=rows, isa=isa)
    _check(y, hs.double() @ w[rows], hs.double().abs() @ w[rows].abs(), 4, f"{isa} int{bits} axpy CATS subset")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [WeightFormat(4, 32), WeightFormat(4, ROW, "fp32"), WeightFormat(8, 64)], ids=_fid)
def test_prepared_entry_points_equal_the_plain_ones(isa, fmt):
    """The thread pool's form (x prepared once, rows-dot per chunk; rows-axpy parts in the kernel's order, added
    and finished once) gives the plain calls' bits, across a column tile edge (4480 columns) and a ROW tail."""
    for rows, cols in ((22, 4480), (9, 200 if fmt.block_size == ROW else 192)):
        qm = qg.QMatrix(_quant(rows, cols, fmt, seed=14))
        g = torch.Generator().manual_seed(15)
        x, h, y0 = torch.randn(cols, generator=g), torch.randn(rows, generator=g), torch.randn(cols, generator=g)
        h[3] = 0.0
        xp = qg.prepare_x(qm, x, isa=isa)
        if fmt.bits == 8 or isa == "scalar":
            assert torch.equal(xp, x)  # the order only changes for int4 in the SIMD builds
        else:
            assert not torch.equal(xp, x) and torch.equal(xp.sort().values, x.sort().values)
        assert torch.equal(qg.rows_dot_prepared(qm, xp, r0=0, r1=rows, isa=isa), qg.rows_dot(qm, x, isa=isa))
        assert torch.equal(torch.cat([qg.rows_dot_prepared(qm, xp, r0=a, r1=b, isa=isa)
                                      for a, b in ((0, 5), (5, 6), (6, rows))]), qg.rows_dot_prepared(qm, xp, isa=isa))
        yp = torch.zeros(cols)
        qg.rows_axpy_prepared(qm, h, yp, isa=isa)
        y = qg.finish_y(qm, yp, y0.clone(), isa=isa)
        assert torch.equal(y, qg.rows_axpy(qm, h, y0.clone(), isa=isa))


@pytest.mark.parametrize("isa", ISAS)
def test_int4_nibble_order(isa):
    """Element 2j is the LOW nibble, 2j + 1 the HIGH one (ONNX INT4, MatMulNBits). Codes chosen so that even and
    odd elements differ everywhere: the kernel matches the reference, and the same bytes with the nibbles of
    every byte swapped (what a kernel with the order reversed would read) give a clearly different result."""
    fmt = WeightFormat(4, 32, "fp16")
    rows, cols = 8, 96
    codes = torch.empty(rows, cols, dtype=torch.int8)
    codes[:, 0::2] = 7
    codes[:, 1::2] = -8
    codes[3, :] = torch.arange(cols) % 15 - 7
    qt = QuantizedTensor(codes, torch.full((rows, cols // 32), 0.5, dtype=torch.float16), fmt)
    packed = pack_int4(codes)
    assert int(packed[0, 0]) == 0x87  # 7 in the low nibble, -8 (0x8) in the high one
    x = torch.zeros(cols)
    x[0::2] = 1.0  # only the even elements count
    y = qg.rows_dot(qg.QMatrix(qt), x, isa=isa)
    assert torch.equal(y[:3], torch.full((3,), 0.5 * 7 * cols / 2))
    w = _ref(qt)
    _check(y, w @ x.double(), w.abs() @ x.double().abs(), cols, f"{isa} nibbles")
    swapped = QuantizedTensor.from_packed(((packed >> 4) | (packed << 4)).to(torch.uint8), qt.scales, fmt)
    ys = qg.rows_dot(qg.QMatrix(swapped), x, isa=isa)
    assert torch.equal(ys[:3], torch.full((3,), -0.5 * 8 * cols / 2))
    # rows-axpy reads the same order
    h = torch.zeros(rows)
    h[0] = 1.0
    ya = qg.rows_axpy(qg.QMatrix(qt), h, isa=isa)
    assert torch.equal(ya[0::2], torch.full((cols // 2,), 3.5)) and torch.equal(ya[1::2], torch.full((cols // 2,), -4.0))


@pytest.mark.parametrize("isa", ISAS)
def test_f32_baseline(isa):
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(13, 300, generator=g), torch.randn(300, generator=g)
    _check(qg.f32_rows_dot(w, x, isa=isa), w.double() @ x.double(), w.double().abs() @ x.double().abs(), 300,
           f"{isa} fp32")


def test_bad_inputs_are_one_line_errors():
    qm = qg.QMatrix(_quant(4, 64, WeightFormat(4, 32), seed=1, extremes=False))
    for call in (lambda: qg.rows_dot(qm, torch.zeros(63)),
                 lambda: qg.rows_dot(qm, torch.zeros(64, dtype=torch.float64)),
                 lambda: qg.rows_dot(qm, torch.zeros(64), rows=torch.tensor([4])),
                 lambda: qg.rows_dot(qm, torch.zeros(64), r0=2, r1=5),
                 lambda: qg.rows_axpy(qm, torch.zeros(4), torch.zeros(65))):
        with pytest.raises(CapreseError) as e:
            call()
        assert "\n" not in str(e.value)


def test_layout_mirror_is_checked():
    lib = qg.load()
    library.check_layout(lib, lib.path, mirrors=(qg.QMat,))

    class QMat(qg.QMat.__base__):  # the mirror with two fields swapped
        _fields_ = [qg.QMat._fields_[1], qg.QMat._fields_[0]] + qg.QMat._fields_[2:]

    with pytest.raises(CapreseError, match="QMat"):
        library.check_layout(lib, lib.path, mirrors=(QMat,))


def _quantize_x(x: torch.Tensor, xb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_activations.c's definition in torch's fp32 arithmetic (IEEE, as the C code's): per block of xb,
    m = max |x|, s_x = m / 127, code = round_half_even(x * (127 / m)); (codes, s_x per element)."""
    xb_ = x.reshape(-1, xb)
    m = xb_.abs().amax(dim=1, keepdim=True)
    inv = torch.where(m > 0, torch.tensor(127.0) / m, torch.zeros_like(m))
    codes = torch.round(xb_ * inv)  # torch.round: half to even
    return codes.reshape(-1), (m / 127.0).expand_as(xb_).reshape(-1)


INT8X_CASES = [(WeightFormat(4, 32, "fp16"), 640), (WeightFormat(4, 64, "fp32"), 576),
               (WeightFormat(4, ROW, "fp32"), 64), (WeightFormat(4, ROW, "fp16"), 96),
               (WeightFormat(4, ROW, "fp16"), 576), (WeightFormat(4, 32, "fp32"), 64),
               (WeightFormat(4, 32, "fp16"), 96), (WeightFormat(4, 128, "fp16"), 4224),
               (WeightFormat(4, ROW, "fp32"), 4160), (WeightFormat(4, 32, "fp32"), 576),
               (WeightFormat(4, 64, "fp16"), 4160),  # every (block, scale dtype) in both the 128- and 64-column steps
               (WeightFormat(4, 32, "fp16"), 768)]  # rows of 384 bytes: read in pairs (QG_PAIR_BYTES)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,cols", INT8X_CASES, ids=[f"{_fid(f)}-{c}" for f, c in INT8X_CASES])
def test_int8_activations_against_float64(isa, fmt, cols):
    """int4 rows-dot with int8 activations (int8_activations.c) against its definition in float64: x's codes and
    scales recomputed here, y[i] = sum_c code_w * scale_w * code_x * s_x. The integer lane sums are exact, so the
    kernel differs from that by fp32 rounding of the per-lane scaling and of the sum (<= n / 8 + 2 roundings of
    terms bounded by sum |w_hat| |code_x s_x|): tolerance 4 u sqrt(n) sum |w_hat x_hat| as the fp32 path's. Shapes:
    128-column chunks only (640), chunks + a 64 tail (576), tails only (64, 96), more than one 4096-column tile
    (4224, 4160), one scale per row; the -8 code; a row subset. And it is NOT the fp32 path: against the unrounded
    x the error exceeds that tolerance but stays within the activation rounding's bound,
    sum_b s_x[b] / 2 * sum_{c in b} |w_hat[i, c]|."""
    qt = _quant(21, cols, fmt, seed=12)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(13)) * 3
    x[5] = 0.0
    x[-32:] = 0.0  # an all-zero block: scale 0, codes 0
    w = _ref(qt)
    block = cols if fmt.block_size == ROW else fmt.block_size
    xb = block if block in (64, 128) else 32  # int8_activations.c: the weight's block if 64 / 128, else 32
    codes, sx = _quantize_x(x, xb)
    x_hat = codes.double() * sx.double()
    rows = torch.tensor([20, 0, 7, 7, 3, 11])
    for sel in (None, rows):
        y = qg.rows_dot_int8_activations(qg.QMatrix(qt), x, rows=sel, isa=isa)
        ws = w if sel is None else w[sel]
        want = ws @ x_hat
        tol = 4 * U * math.sqrt(cols) * (ws.abs() @ x_hat.abs()) + 1e-30
        err = (y.double() - want).abs()
        print(f"int8 activations {isa} {_fid(fmt)} [{cols}]: max err {float((err / tol).max()):.3f} of tolerance")
        assert bool((err <= tol).all())
    unrounded = (y.double() - w[rows] @ x.double()).abs()
    bound = (w[rows].abs() * (sx.double() / 2)).sum(dim=1)
    assert bool((unrounded <= bound + tol).all()) and bool((unrounded > tol).any())


def test_int8_activations_refuse_other_formats():
    """int8 weights, or columns not a multiple of 32, are a one-line error (the decode step keeps fp32 activations
    for them)."""
    for fmt, cols in ((WeightFormat(8, 32, "fp16"), 64), (WeightFormat(4, ROW, "fp16"), 48)):
        with pytest.raises(CapreseError, match="int8 activations take int4"):
            qg.rows_dot_int8_activations(qg.QMatrix(_quant(4, cols, fmt, seed=1)), torch.randn(cols))


R16_CASES = [(WeightFormat(4, 32, "fp16"), 576), (WeightFormat(4, 32, "fp32"), 1536),
             (WeightFormat(4, 64, "fp16"), 640), (WeightFormat(4, 64, "fp32"), 576),
             (WeightFormat(4, 128, "fp16"), 4224), (WeightFormat(4, ROW, "fp16"), 96),
             (WeightFormat(4, ROW, "fp32"), 576)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,cols", R16_CASES, ids=[f"{_fid(f)}-{c}" for f, c in R16_CASES])
def test_r16_layout_against_its_definition(isa, fmt, cols):
    """The r16 layout (int8_activations.c: groups of 16 rows, which the AVX-512 and AVX2 decode steps repack their
    int4 rows-dot weights into) against its definition in float64: per x block b, t_b = sum code_w * code_x
    exactly (integers), y = sum_b t_b * fp32(s_w s_x). The kernel rounds each of the nb FMAs of that sum once and
    each fp32 s_w s_x once, so |y - def| <= (nb + 2) u sum_b |t_b s_w s_x| (a strict bound, not a statistical one).
    A wrong interleave or nibble would move an output by whole products (~sum / cols), far above it at these
    sizes. 48 rows (3 groups), the -8 code; ranges that cut groups, rows by index; and the r16 matrix read with
    fp32 activations (caprese_q_rows_dot puts its groups back in rows) gives the rows layout's bits."""
    qt = _quant(48, cols, fmt, seed=31)
    qm = qg.QMatrix(qt)
    r16 = qg.pack_r16(qm, isa=isa)
    assert r16.struct.layout == library.QG_R16 and qm.struct.layout == 0
    assert not torch.equal(r16.packed, qm.packed)  # really repacked (and the source left as it was)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(32)) * 3
    x[-32:] = 0.0  # an all-zero block
    block = cols if fmt.block_size == ROW else fmt.block_size
    xb = block if block in (64, 128) else 32
    codes, sx = _quantize_x(x, xb)
    cw = qt.codes.to(torch.float64).reshape(48, -1, xb)
    t = (cw * codes.double().reshape(1, -1, xb)).sum(dim=2)  # [48, nb]: exact (integers below 2^53)
    s_w = qt.scales.float().reshape(48, -1).repeat_interleave(cols // xb // qt.scales.reshape(48, -1).shape[1], 1)
    scale = (s_w * sx.reshape(-1, xb)[:, 0].reshape(1, -1)).double()  # fp32 s_w * s_x, widened
    want = (t * scale).sum(dim=1)
    nb = cols // xb
    tol = (nb + 2) * U * (t * scale).abs().sum(dim=1) + 1e-30
    y = qg.rows_dot_int8_activations(r16, x, isa=isa)
    err = (y.double() - want).abs()
    print(f"r16 {isa} {_fid(fmt)} [{cols}]: max err {float((err / tol).max()):.3f} of the bound")
    assert bool((err <= tol).all())
    part = qg.rows_dot_int8_activations(r16, x, isa=isa, r0=5, r1=37)
    assert torch.equal(part[5:37], y[5:37]) and bool(part[:5].isnan().all()) and bool(part[37:].isnan().all())
    rows = torch.tensor([47, 0, 16, 16, 31])
    assert torch.equal(qg.rows_dot_int8_activations(r16, x, rows=rows, isa=isa), y[rows])
    assert torch.equal(qg.rows_dot(r16, x, isa=isa), qg.rows_dot(qm, x, isa=isa))
    # Columns [c0, c1) only (the decode step's dense down product per neuron chunk): the same definition on those blocks, x's
    # rounding per block unchanged; over every column it is the whole product's FMA chain, so its bits.
    assert torch.equal(qg.rows_dot_int8_activations_cols(r16, x, 0, cols, isa=isa), y)
    c0, c1 = xb, cols - xb if nb > 2 else cols
    b0, b1 = c0 // xb, c1 // xb
    want_c = (t[:, b0:b1] * scale[:, b0:b1]).sum(dim=1)
    tol_c = (b1 - b0 + 2) * U * (t[:, b0:b1] * scale[:, b0:b1]).abs().sum(dim=1) + 1e-30
    got = qg.rows_dot_int8_activations_cols(r16, x, c0, c1, r0=16, r1=48, isa=isa)
    assert bool(got[:16].isnan().all())
    err_c = (got[16:].double() - want_c[16:]).abs()
    print(f"r16 cols [{c0}, {c1}) {isa}: max err {float((err_c / tol_c[16:]).max()):.3f} of the bound")
    assert bool((err_c <= tol_c[16:]).all())
    with pytest.raises(CapreseError, match="must be whole blocks and whole groups of 16"):
        qg.rows_dot_int8_activations_cols(r16, x, 0, cols, r0=8, r1=48, isa=isa)
    with pytest.raises(CapreseError, match="must be whole blocks and whole groups of 16"):
        qg.rows_dot_int8_activations_cols(qm, x, 0, cols, isa=isa)  # rows layout


def test_r16_layout_refuses_other_shapes():
    for fmt, rows, cols in ((WeightFormat(4, 32, "fp16"), 40, 64), (WeightFormat(8, 32, "fp16"), 48, 64)):
        with pytest.raises(CapreseError, match="r16 layout takes int4 weights with rows a multiple of 16"):
            qg.pack_r16(qg.QMatrix(_quant(rows, cols, fmt, seed=1)))


def _axpy_int8_ref(qt: QuantizedTensor, h: torch.Tensor, sel: torch.Tensor, calls, levels: float = 127.0) -> tuple:
    """int8_activations.c's int8-activation rows-axpy in float64 over the calls' row ranges (groups of 32 from each
    call's first row): per group and column block, a = fp32(h * s_w), alpha = round_half_even(fp32(a * fp32(127 /
    max |a|))), s_a = fp32(max |a| / 127); y = sum_g s_a * sum_i alpha * code. levels=32512: caprese_q_rows_axpy_qw's.
    Returns (y, the per-group terms' sum of magnitudes, the rounding bound against h itself, the number of
    groups)."""
    cols = qt.codes.shape[1]
    block = qt.fmt.block_size if qt.fmt.block_size != ROW else cols
    codes = qt.codes.to(torch.float64)
    sw = qt.scales.to(torch.float32)  # [rows, blocks]
    y = torch.zeros(cols, dtype=torch.float64)
    mag, bound, ng = torch.zeros_like(y), torch.zeros_like(y), 0
    for r0, r1 in calls:
        for g in range(r0, r1, 32):
            ii = torch.arange(g, min(g + 32, r1))
            rows = sel[ii]
            a = h[ii, None].to(torch.float32) * sw[rows]  # fp32 products [nr, blocks]
            m = a.abs().amax(dim=0)
            inv = torch.where(m > 0, torch.tensor(levels) / m, torch.zeros_like(m))
            alpha = torch.round(a * inv).to(torch.float64).repeat_interleave(block, dim=1)[:, :cols]
            sa = (m / levels).to(torch.float64).repeat_interleave(block)[:cols]
            term = (alpha * codes[rows]).sum(dim=0) * sa
            y += term
            mag += term.abs()
            bound += (codes[rows].abs() * sa / 2).sum(dim=0)
            ng += 1
    return y, mag, bound, ng


AXPY8_CASES = [(WeightFormat(4, 32, "fp16"), 576), (WeightFormat(4, 64, "fp32"), 576),
               (WeightFormat(4, 128, "fp16"), 4224), (WeightFormat(4, ROW, "fp16"), 96),
               (WeightFormat(4, ROW, "fp32"), 4160), (WeightFormat(4, 32, "fp32"), 64),
               (WeightFormat(4, 32, "fp16"), 96)]


COEFFICIENTS = {8: (qg.rows_axpy_int8_activations, 127.0), 16: (qg.rows_axpy_int16_coefficients, 32512.0)}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,cols", AXPY8_CASES, ids=[f"{_fid(f)}-{c}" for f, c in AXPY8_CASES])
@pytest.mark.parametrize("bits", (8, 16))
def test_int8_activation_axpy_against_float64(isa, fmt, cols, bits):
    """rows-axpy with rounded coefficients (GRIFFIN's down on an --int8-activations engine: int8 with `int8_down`,
    16 bits by default, split into two int8 halves over the same codes) against its definition in float64
    (_axpy_int8_ref at 127 / 32512 levels): the integer sums are exact, each group's term is one fp32 FMA into the
    partial, so the error is within 4 u (groups + 1) sum_g |term_g|. Shapes: whole 128-column pieces and a 64 tail
    (576), a 48-byte piece (96), tails only (64), more than one 4096-column tile (4224, 4160, a row block across
    tiles); 75 rows (groups of 32, 32, 11: a last 4-row set padded), two calls [0, 41) and [41, 75) into one y
    (groups restart at each call), a row subset, the -8 code, h with zeros. Against the fp32 product with h itself
    the error exceeds that tolerance (it is the rounded arithmetic) but stays within the rounding's bound (16 bits:
    256x tighter). A wrong split of a 16-bit alpha (hi off by one, lo unsigned) would be off by a code step."""
    axpy, levels = COEFFICIENTS[bits]
    qt = _quant(83, cols, fmt, seed=21)
    qm = qg.QMatrix(qt)
    h = torch.randn(75, generator=torch.Generator().manual_seed(22)) * 2
    h[3] = 0.0
    sel = torch.randperm(83, generator=torch.Generator().manual_seed(23))[:75]
    for calls in ([(0, 75)], [(0, 41), (41, 75)]):
        y = torch.zeros(cols, dtype=torch.float32)
        for r0, r1 in calls:
            axpy(qm, h, y, rows=sel, r0=r0, r1=r1, isa=isa)
        want, mag, bound, ng = _axpy_int8_ref(qt, h, sel, calls, levels)
        tol = 4 * U * (ng + 1) * mag + 1e-30
        err = (y.double() - want).abs()
        exact = _ref(qt)[sel].T @ h.double()
        unrounded = (y.double() - exact).abs()
        print(f"int{bits}-coefficient axpy {isa} {_fid(fmt)} [{cols}] calls {calls}: max err "
              f"{float((err / tol).max()):.3f} of tolerance; relative to the fp32 product "
              f"{float((y.double() - exact).norm() / exact.norm()):.2e}")
        assert bool((err <= tol).all())
        assert bool((unrounded <= bound + tol).all()) and bool((unrounded > tol).any())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,cols", AXPY8_CASES, ids=[f"{_fid(f)}-{c}" for f, c in AXPY8_CASES])
@pytest.mark.parametrize("bits", (8, 16))
def test_quads_layout_gives_the_same_bits(isa, fmt, cols, bits):
    """GRIFFIN's down repacked into the quads layout (AVX-512 and AVX2 builds; int8_activations.c) gives the plain
    layout's rounded-coefficient rows-axpy bit for bit (the same groups, integer sums and fp32 roundings, which the
    test above checks against float64): 75 rows (the last quad padded), calls [0, 75), [0, 40) + [40, 75) and
    [0, 12) + [12, 75), and [0, 41) + [44, 75) (a call that ends inside a quad: rows 41-43 have no term), every
    shape above. The scalar build has no such layout (pack_quads: None). The layout carries the scales too, by quad
    ([block][4 rows]), and the coefficients are rounded from there (qa_quantize_lanes, AVX-512 and AVX2): a scale of
    the wrong row or block, or a row past the call's end given a term, changes the bits here."""
    axpy = COEFFICIENTS[bits][0]
    qm = qg.QMatrix(_quant(75, cols, fmt, seed=21))
    h = torch.randn(75, generator=torch.Generator().manual_seed(22)) * 2
    h[3] = 0.0
    quads = qg.pack_quads(qm, isa=isa)
    if quads is None:
        assert isa != "avx512"
        pytest.skip(f"no quads layout on the {isa} build")
    blocks = 1 if fmt.block_size == ROW else cols // fmt.block_size
    scale_bytes = 19 * 4 * blocks * (4 if fmt.scale_dtype == "fp32" else 2)
    assert quads.numel() == 19 * cols // 32 * 64 + scale_bytes
    for calls in ([(0, 75)], [(0, 40), (40, 75)], [(0, 12), (12, 75)], [(0, 41), (44, 75)]):
        want, got = torch.zeros(cols), torch.zeros(cols)
        for r0, r1 in calls:
            axpy(qm, h, want, r0=r0, r1=r1, isa=isa)
            qg.rows_axpy_quads(qm, quads, h, got, r0=r0, r1=r1, bits=bits, isa=isa)
        assert torch.equal(got, want), calls
    with pytest.raises(CapreseError, match="r0 a multiple of 4"):
        qg.rows_axpy_quads(qm, quads, h, r0=2, isa=isa)


@pytest.mark.parametrize("bits", (8, 16))
def test_rounded_coefficient_axpy_refuses_other_formats(bits):
    for fmt, cols in ((WeightFormat(8, 32, "fp16"), 64), (WeightFormat(4, ROW, "fp16"), 48)):
        with pytest.raises(CapreseError, match=f"int{bits}-coefficient rows-axpy takes int4"):
            COEFFICIENTS[bits][0](qg.QMatrix(_quant(4, cols, fmt, seed=1)), torch.randn(4))


@pytest.mark.parametrize("bits", (4, 8))
def test_same_bytes_as_onnxruntime_matmulnbits(bits):
    """The kernel reads the bytes export hands ONNX Runtime: com.microsoft.MatMulNBits (accuracy_level 0, fp32
    activations) on B = quantization.matmul_nbits_weight(qt) and the kernel on qt.packed() agree within fp32
    rounding (both against float64 here), on a weight whose codes include -8 / -128; a byte order that differed
    (nibbles swapped, or the XOR with the zero point missing) would move every output by O(1)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from caprese.model.quantization import matmul_nbits_weight

    n, k = 24, 256
    fmt = WeightFormat(bits, 32, "fp32")
    qt = _quant(n, k, fmt, seed=16)
    b, s = matmul_nbits_weight(qt)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(b.numpy(), "b"), numpy_helper.from_array(s.numpy(), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(k, generator=torch.Generator().manual_seed(17))
    y_ort = torch.from_numpy(sess.run(None, {"x": x[None].numpy()})[0][0])
    y = qg.rows_dot(qg.QMatrix(qt), x)
    w = _ref(qt)
    scale = w.abs() @ x.double().abs()
    _check(y_ort, w @ x.double(), scale, k, f"onnxruntime int{bits}")
    _check(y, y_ort.double(), 2 * scale, k, f"kernel vs onnxruntime int{bits}")
