"""THE quantized-weight format: symmetric int8 / int4 blocks along the last axis of a 2-D tensor.

One format, defined once, so PyTorch (calibration, eval), the ONNX graphs and the native C kernel hold the same
bytes and compute the same dequantized values:

  tensor    a 2-D row-major tensor [R, C]; blocks are `block_size` (32 default, 64, 128) CONSECUTIVE elements of
            one row, along the LAST axis; C % block_size == 0 (else a one-line CapreseError)
  scales    [R, C / block_size], fp16 (default) or fp32, strictly positive
  codes     int8 in [-qmax, qmax]: qmax = 7 (int4) or 127 (int8); zero point 0 (symmetric), -8 / -128 never used
  value     w_hat[r, c] = codes[r, c] * scales[r, c // block_size], computed in float32

How codes are chosen (RTN; GPTQ picks other codes against the same scales):
  scale = round_to_scale_dtype(absmax(block) / qmax), then max(scale, smallest normal of that dtype); an
          all-zero block gets scale 1 (TensorRT's IDequantizeLayer requires strictly positive scales)
  code  = clamp(round_half_to_even(w / scale), -qmax, qmax), with the STORED (already rounded) scale, so with
          fp16 scales the codes fit the fp16 scale the graphs will use, and |w - w_hat| <= scale / 2 everywhere
Both divisions are done in float64 (exact enough that the result is the correctly rounded quotient of the fp32 /
fp16 / bf16 inputs), and ties go to even, the rule of ONNX QuantizeLinear, TensorRT's IQuantizeLayer,
torch.round and numpy.round. Codes are computed once, here; no other layer ever recomputes them.

Why [-7, 7] and not [-8, 7] for int4: the format must be symmetric with zero point 0 and strictly positive scales
(TensorRT). Mapping a block's absmax onto -8 (ONNX Runtime's and llama.cpp Q4_0's trick) needs a NEGATIVE scale
when the extreme element is positive; mapping it with scale absmax / 8 clips a positive extreme to 7 (error
absmax / 8); PyTorch / torchao's SYMMETRIC (absmax / 7.5) clips it by half a step. With absmax / 7 every element,
the extreme of either sign included, is within scale / 2 of its value, and the grid is sign-symmetric. Cost: one
of 16 levels unused (~7% coarser step than absmax / 7.5). Decoders still accept -8 (all of ONNX INT4,
MatMulNBits and the C kernel do); our quantizers never emit it.

Dequantized values are exactly reproducible: with fp16 scales, code (<= 8 bits) x fp16 scale (11 bits) is exact
in float32, so `dequantize(qt)` has no rounding at all, and an fp16 graph's DequantizeLinear (output = scale type)
yields exactly dequantize(qt).half(). With fp32 scales the product is one IEEE float32 multiply.

Byte layout (`QuantizedTensor.packed()`, what export writes and the C kernel reads):
  int8  the codes' two's-complement bytes, row-major [R, C] (= ONNX INT8 raw_data)
  int4  two codes per byte along the last axis, [R, C / 2]: element 2j in the LOW nibble, 2j+1 in the HIGH
        nibble, each a 4-bit two's complement. This is ONNX's INT4 packing ("the first element is stored in the
        4 LSB and the second element is stored in the 4 MSB", onnx/onnx.proto TensorProto; docs/technical/
        int4.md; onnx.numpy_helper._pack_4bitx2) and MatMulNBits' nibble order ("the first 4 bits are stored in
        the lower 4 bits of a byte", ONNX Runtime ContribOperators.md, com.microsoft.MatMulNBits).
  MatMulNBits stores UNSIGNED codes with an implicit zero point 2^(bits-1) (8 / 128), so its B bytes are ours
  XOR 0x88 (int4) / XOR 0x80 (int8): see `matmul_nbits_weight`. Same values, a fixed byte bijection.

Orientation: the format is orientation-agnostic; it blocks the last axis of whatever 2-D tensor it is given. The
caller (the engine spec / quantization recipe) decides which axis that is per weight role. The plan:
  q, k, v, o, gate, up, LM head, embedding   stored [out, in] (the nn.Linear layout), blocks along the inputs
  down                                        stored [in = F, out = D], blocks along the outputs, so that a
                                              GRIFFIN-kept neuron's row and a CATS-skipped row is whole blocks
"""

from __future__ import annotations

import dataclasses

import torch

from caprese.errors import CapreseError

BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)
ROW = 0  # block_size 0: one block per row (per-channel scales): the only INT8 layout TensorRT's IDequantizeLayer
#          takes for weights (it block-quantizes INT4 / FP8 / FP4 only), hence int8's default
SCALE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
BLOCK_AXES = ("in", "out")  # which nn.Linear axis a weight's blocks run along (see `stored_shape`)
SCHEME = "symmetric-absmax"  # recorded in to_dict: the rule above (absmax / qmax, zero point 0, ties to even)
_ROW_CHUNK = 4096  # rows quantized at a time: bounds the float64 temporaries of a large matrix (an LM head)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """int{bits}, blocks of `block_size` along the last axis (ROW = 0: the whole row, one scale per row),
    `scale_dtype` ("fp16" | "fp32") scales."""

    bits: int = 4
    block_size: int = 32
    scale_dtype: str = "fp16"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise CapreseError(f"weights int{self.bits} are not supported: use int4 or int8")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES + (ROW,):
            raise CapreseError(f"block size {self.block_size} is not supported: use 32, 64, 128 or row")
        if self.scale_dtype not in SCALE_DTYPES:
            raise CapreseError(f"scale dtype {self.scale_dtype!r} is not supported: use fp16 or fp32")

    @classmethod
    def parse(cls, weights: str, block_size: int | str | None = None, scale_dtype: str = "fp16") -> "WeightFormat":
        """From the CLI spelling: weights "int4" | "int8"; block_size 32 | 64 | 128 | "row" (None: the default of
        the bit width, `default_block`)."""
        name = str(weights).strip().lower()
        if not (name.startswith("int") and name[3:].isdigit()):
            raise CapreseError(f"--weights {weights!r} is not a weight format: use int4 or int8")
        bits = int(name[3:])
        if block_size is None:
            block_size = default_block(bits)
        elif str(block_size).strip().lower() in ("row", "channel"):
            block_size = ROW
        else:
            try:
                block_size = int(block_size)
            except ValueError:
                raise CapreseError(f"--block-size {block_size!r} is not a block size: use 32, 64, 128 or row") from None
            if block_size == ROW:  # ROW's internal value, not a spelling users are told of
                raise CapreseError(f"block size {block_size} is not supported: use 32, 64, 128 or row")
        return cls(bits, block_size, scale_dtype)

    def block(self, cols: int) -> int:
        """Elements per block of a row of `cols` elements."""
        return cols if self.block_size == ROW else self.block_size

    @property
    def block_name(self) -> str:
        return "row" if self.block_size == ROW else str(self.block_size)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1  # 7 | 127

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def check_shape(self, shape, name: str = "weight", axis: str = "last axis") -> None:
        """A one-line CapreseError unless `shape` is 2-D with a last axis that whole blocks tile.
        `axis` names that axis in the message ("input features", ...)."""
        if len(shape) != 2:
            raise CapreseError(f"{name}: block quantization needs a 2-D tensor, got shape {list(shape)}")
        n = shape[1]
        if self.block_size == ROW:
            if n < 1 or n * self.bits % 8:
                raise CapreseError(f"{name}: {axis} = {n} cannot be stored as whole bytes of int{self.bits}")
            return
        if n % self.block_size:
            fits = [str(b) for b in BLOCK_SIZES if n % b == 0]
            hint = (f"use block size {' or '.join(fits)}" if fits else
                    f"no supported block size ({', '.join(map(str, BLOCK_SIZES))}) divides it: leave it unquantized")
            raise CapreseError(f"{name}: {axis} = {n} is not a multiple of the block size {self.block_size}; {hint}")

    def code_bytes(self, rows: int, cols: int) -> int:
        return rows * cols * self.bits // 8

    def scale_bytes(self, rows: int, cols: int) -> int:
        return rows * (cols // self.block(cols)) * torch.finfo(self.torch_scale_dtype).bits // 8

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of a [rows, cols] tensor in this format: packed codes + scales."""
        return self.code_bytes(rows, cols) + self.scale_bytes(rows, cols)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "scale_dtype": self.scale_dtype,
                "scheme": SCHEME}

    @classmethod
    def from_dict(cls, d: dict) -> "WeightFormat":
        if not isinstance(d, dict) or "bits" not in d:
            raise CapreseError(f"not a weight format record: {d!r}")
        if d.get("scheme", SCHEME) != SCHEME:
            raise CapreseError(f"weight quantization scheme {d['scheme']!r} is not supported (this caprese "
                               f"reads {SCHEME!r}); re-quantize the model with this version")
        try:
            return cls(int(d["bits"]), int(d.get("block_size", 32)), str(d.get("scale_dtype", "fp16")))
        except (TypeError, ValueError) as e:
            raise CapreseError(f"corrupt weight format record {d!r} ({e})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """codes int8 [R, C] (unpacked, one code per element), scales [R, C / block] in fmt's scale dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: WeightFormat

    def __post_init__(self):
        c, s, f = self.codes, self.scales, self.fmt
        if c.dtype != torch.int8 or c.dim() != 2:
            raise CapreseError(f"quantized codes must be a 2-D int8 tensor, got {c.dtype} {list(c.shape)}")
        f.check_shape(tuple(c.shape), "quantized codes")
        want = (c.shape[0], c.shape[1] // f.block(c.shape[1]))
        if tuple(s.shape) != want or s.dtype != f.torch_scale_dtype:
            raise CapreseError(f"quantized scales must be {f.scale_dtype} {list(want)}, got {s.dtype} "
                               f"{list(s.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(*self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def packed(self) -> torch.Tensor:
        """The code bytes, uint8 [R, C * bits / 8] (see the module docstring)."""
        if self.fmt.bits == 4:
            return pack_int4(self.codes)
        return self.codes.contiguous().view(torch.uint8)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> "QuantizedTensor":
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise CapreseError(f"packed codes must be a 2-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
        codes = unpack_int4(packed) if fmt.bits == 4 else packed.contiguous().view(torch.int8)
        return cls(codes, scales, fmt)

    def select_rows(self, rows: torch.Tensor) -> "QuantizedTensor":
        """The rows `rows` (whole blocks: GRIFFIN's kept neurons of a row-blocked weight)."""
        return QuantizedTensor(self.codes.index_select(0, rows), self.scales.index_select(0, rows), self.fmt)


def default_block(bits: int) -> int:
    """int4: blocks of 32 (GenAI's and TensorRT's INT4-AWQ granularity); int8: ROW, per-channel, because TensorRT
    takes INT8 weights only per-tensor or per-channel, and int8 loses nothing measurable that way."""
    return 32 if bits == 4 else ROW


def block_scales(w: torch.Tensor, fmt: WeightFormat, name: str = "weight") -> torch.Tensor:
    """Scales [R, C / block] in fmt's scale dtype for w [R, C] (see `scales_from_absmax`)."""
    fmt.check_shape(tuple(w.shape), name)
    r, c = w.shape
    b = fmt.block(c)
    absmax = w.detach().reshape(r, c // b, b).abs().amax(dim=-1)
    if not torch.isfinite(absmax).all():
        raise CapreseError(f"{name}: contains inf or NaN values; the weights are corrupt")
    return scales_from_absmax(absmax, fmt, name)


def scales_from_absmax(absmax: torch.Tensor, fmt: WeightFormat, name: str = "weight") -> torch.Tensor:
    """THE scale rule, for blocks with these (finite) absolute maxima: absmax / qmax rounded once to the scale
    dtype (computed in float64, so correctly rounded), floored at that dtype's smallest normal; 1 for an all-zero
    block. Every quantizer (RTN, GPTQ) gets its scales here."""
    absmax = absmax.to(torch.float64)
    dt = fmt.torch_scale_dtype
    scale = (absmax / fmt.qmax).to(dt)
    if torch.isinf(scale).any():
        raise CapreseError(f"{name}: a block's largest value ({float(absmax.max()):.4g}) is beyond what "
                           f"{fmt.scale_dtype} scales can hold; use fp32 scales")
    return torch.where(absmax == 0, torch.ones((), dtype=dt), scale.clamp_min(torch.finfo(dt).tiny))


def codes_for(w: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """int8 codes clamp(round_half_even(w / scale), -qmax, qmax) for w and a broadcastable scale."""
    q = torch.round(w.detach().to(torch.float64) / scale.to(torch.float64))
    return q.clamp_(-fmt.qmax, fmt.qmax).to(torch.int8)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> QuantizedTensor:
    """Codes for w [R, C] against given block scales [R, C / block] (round to nearest)."""
    r, c = w.shape
    bs = fmt.block(c)
    s = scales.reshape(r, c // bs, 1)
    codes = torch.empty(r, c, dtype=torch.int8, device=w.device)
    for a in range(0, r, _ROW_CHUNK):
        b = min(a + _ROW_CHUNK, r)
        blocks = w[a:b].reshape(b - a, c // bs, bs)
        codes[a:b] = codes_for(blocks, s[a:b], fmt).reshape(b - a, c)
    return QuantizedTensor(codes, scales, fmt)


def quantize_rtn(w: torch.Tensor, fmt: WeightFormat, name: str = "weight") -> QuantizedTensor:
    """Round-to-nearest block quantization of w [R, C] (any float dtype), blocks along the last axis."""
    if not w.dtype.is_floating_point:
        raise CapreseError(f"{name}: only floating-point tensors can be quantized, got {w.dtype}")
    return quantize_with_scales(w, block_scales(w, fmt, name), fmt)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale in float32 (exact for fp16 scales), then cast to dtype: [R, C]."""
    r, c = qt.shape
    b = qt.fmt.block(c)
    w = qt.codes.reshape(r, c // b, b).to(torch.float32) * qt.scales.to(torch.float32)[..., None]
    return w.reshape(r, c).to(dtype)


def stored_shape(out_features: int, in_features: int, block_axis: str) -> tuple[int, int]:
    """The [R, C] that a weight of nn.Linear shape [out, in] is stored as: "in" -> [out, in] (blocks along the
    input features), "out" -> [in, out] (the transpose, blocks along the output features)."""
    if block_axis not in BLOCK_AXES:
        raise CapreseError(f"block axis must be 'in' or 'out'; got {block_axis!r}")
    return (out_features, in_features) if block_axis == "in" else (in_features, out_features)


def quantize_linear_rtn(weight: torch.Tensor, fmt: WeightFormat, block_axis: str = "in",
                        name: str = "weight") -> QuantizedTensor:
    """RTN of an nn.Linear weight [out, in], stored in `block_axis` orientation."""
    stored_shape(*weight.shape, block_axis)
    return quantize_rtn(weight if block_axis == "in" else weight.t().contiguous(), fmt, name)


def linear_weight(qt: QuantizedTensor, block_axis: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The nn.Linear weight [out, in] that a stored QuantizedTensor stands for."""
    stored_shape(1, 1, block_axis)
    w = qt.dequantize(dtype)
    return w if block_axis == "in" else w.t().contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., C] with C even -> uint8 [..., C / 2]: element 2j low nibble, 2j+1 high."""
    if codes.dtype != torch.int8:
        raise CapreseError(f"int4 packing takes int8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise CapreseError(f"int4 packing needs an even last axis, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise CapreseError("int4 codes must lie in [-8, 7]")
    u = codes.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C / 2] -> int8 codes [..., C] (inverse of pack_int4; sign-extends each nibble)."""
    if packed.dtype != torch.uint8:
        raise CapreseError(f"int4 unpacking takes uint8 bytes, got {packed.dtype}")
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return ((nib ^ 8) - 8).to(torch.int8)


def matmul_nbits_weight(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, scales) for ONNX Runtime's com.microsoft.MatMulNBits without a zero_points input.

    qt must be [N, K] blocked along K (an [out, in] weight blocked along its inputs). B is uint8
    [N, K / block, block * bits / 8]: our packed bytes XOR 0x88 (int4) / 0x80 (int8), because MatMulNBits codes
    are unsigned with the default zero point 2^(bits-1), so (c + 8) - 8 = c. Scales: [N, K / block] as stored
    (MatMulNBits wants them in the activation dtype: cast fp16 scales to fp32 for an fp32 graph; exact)."""
    n, k = qt.shape
    b = qt.fmt.block(k)
    flip = 0x88 if qt.fmt.bits == 4 else 0x80
    data = qt.packed() ^ flip
    return data.reshape(n, k // b, b * qt.fmt.bits // 8), qt.scales
