"""One tensor of an engine's weights.bin as a role uses it (WeightRef), and how a quantized one is stored
(QuantFormat). engine_spec.py decides which WeightRefs an engine has; this module only says what one is, so that
the spec, the builders, the manifest and the runtimes share one definition. Plain code: no torch."""

from __future__ import annotations

import dataclasses
import math

MATRIX, MATRIX_T, ROWS, VECTOR = "in_out", "out_in", "rows", "vector"
STORAGES = (MATRIX, MATRIX_T, ROWS, VECTOR)
DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int64": 64, "int32": 32, "int8": 8, "uint8": 8,
              "int4": 4, "bool": 8}
QUANT_BITS = (4, 8)
QUANT_BLOCKS = (0, 32, 64, 128)  # 0: one block per row (per-channel scales), caprese.model.quantization.ROW
SCALE_DTYPES = ("float16", "float32")
PACKING_INT4 = "int4x2-low-first"  # two codes per byte, element 2j in the low nibble (ONNX INT4, TensorRT INT4)
PACKING_NBITS = "matmulnbits"  # com.microsoft.MatMulNBits' B: our bytes XOR 0x88 (int4) / 0x80 (int8), unsigned
QUANT_ROLES = ("qkv", "o", "gate_up", "gate", "up", "down")  # the decoder linear roles quantized (+ head: option)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """How a quantized weight is stored: `bits` (4 | 8) symmetric integers in blocks of `block_size` (0: one per
    row) along `axis` of the stored tensor (1: the last, caprese.model.quantization's format), one scale per block
    in the weights.bin tensor `scale` (its own WeightRef: name, shape [R, C / block] or [R] for one per row, dtype
    float16 | float32), `packing`: PACKING_INT4 (two int4 per byte, low nibble first), "none" (int8) or
    PACKING_NBITS (MatMulNBits' unsigned bytes, ours XOR 0x88 / 0x80)."""

    bits: int
    block_size: int
    axis: int
    scale: "WeightRef"
    packing: str = "none"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "axis": self.axis, "scale": self.scale.to_dict(),
                "packing": self.packing}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantFormat":
        return cls(int(d["bits"]), int(d["block_size"]), int(d["axis"]), WeightRef.from_dict(d["scale"]),
                   str(d.get("packing", "none")))


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """One tensor of weights.bin as a role uses it: its name there, shape, stored dtype and storage."""

    name: str
    shape: tuple  # ints
    dtype: str  # numpy-style stored dtype: float32 | float16 | bfloat16 (int4 / int8 with quant)
    storage: str  # MATRIX | MATRIX_T | ROWS | VECTOR
    quant: QuantFormat | None = None  # None: plain floats

    def __post_init__(self):
        if self.storage not in STORAGES or self.dtype not in DTYPE_BITS:
            raise ValueError(f"weight {self.name}: unknown storage {self.storage!r} or dtype {self.dtype!r}")
        if len(self.shape) != (1 if self.storage == VECTOR else 2) or not all(isinstance(d, int) and d > 0
                                                                            for d in self.shape):
            raise ValueError(f"weight {self.name}: shape {list(self.shape)} does not fit storage {self.storage}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Its length in weights.bin (sub-byte dtypes packed)."""
        return -(-self.numel * DTYPE_BITS[self.dtype] // 8)

    @property
    def row_bytes(self) -> int:
        """What reading one row costs (a ROWS table read per token)."""
        return self.nbytes // self.shape[0]

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "storage": self.storage}
        if self.quant is not None:
            d["quant"] = self.quant.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WeightRef":
        q = d.get("quant")
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]), str(d["storage"]),
                   QuantFormat.from_dict(q) if q is not None else None)
