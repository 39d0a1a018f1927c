"""weights.bin: every exported tensor written once, page-aligned, shared by the prefill and decode graphs.

The graphs' initializers are ONNX external-data references (location weights.bin, offset, length), so both
graphs point at the same bytes; the manifest's "weights" table (name -> offset, length, shape, dtype) lets a
runtime read a tensor itself (GRIFFIN folding needs the dense gate/up/down and the bypass L, R).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from caprese.errors import CapreseError
from caprese.export.contract import WEIGHT_ALIGNMENT, WEIGHTS_FILE

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
               "int32": onnx.TensorProto.INT32, "bool": onnx.TensorProto.BOOL, "int8": onnx.TensorProto.INT8,
               "uint8": onnx.TensorProto.UINT8, "int4": onnx.TensorProto.INT4}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool, "int8": torch.int8,
                "uint8": torch.uint8}


def tensor_bytes(t: torch.Tensor, dtype: str) -> bytes:
    """Little-endian raw bytes of t cast to dtype (bfloat16 through an int16 view: numpy has no bfloat16)."""
    t = t.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class WeightsWriter:
    """Append tensors to ENGINE_DIR/weights.bin as they are registered; hand out external-data initializers."""

    def __init__(self, folder: str | Path, filename: str = WEIGHTS_FILE):
        self.path = Path(folder) / filename
        self.filename = filename
        self._fh = open(self.path, "wb")
        self._offset = 0
        self.table: dict[str, dict] = {}

    def add(self, name: str, t: torch.Tensor, dtype: str) -> dict:
        """Write t once under `name` (a second call with the same name must be the same tensor) and return its entry."""
        if name in self.table:
            return self.add_bytes(name, b"", list(t.shape), dtype)
        return self.add_bytes(name, tensor_bytes(t, dtype), list(t.shape), dtype)

    def add_bytes(self, name: str, data: bytes, shape: list, dtype: str) -> dict:
        """Write raw bytes under `name` with a logical shape and dtype (quantized codes: int4 two per byte)."""
        if name in self.table:
            entry = self.table[name]
            if entry["shape"] != list(shape) or entry["dtype"] != dtype:
                raise ValueError(f"weight {name!r} registered twice with different shapes or dtypes")
            return entry
        pad = -self._offset % WEIGHT_ALIGNMENT
        if pad:
            self._fh.write(b"\0" * pad)
            self._offset += pad
        self._fh.write(data)
        entry = {"offset": self._offset, "length": len(data), "shape": list(shape), "dtype": dtype}
        self._offset += len(data)
        self.table[name] = entry
        return entry

    def initializer(self, name: str, view: tuple | None = None) -> onnx.TensorProto:
        """An ONNX initializer that references `name`'s bytes in weights.bin; view (dtype, shape, initializer
        name): the same bytes read as another dtype / shape (MatMulNBits' uint8 [N, K / block, block bytes])."""
        entry = self.table[name]
        dtype, shape, init_name = view if view is not None else (entry["dtype"], entry["shape"], name)
        tp = onnx.TensorProto()
        tp.name = init_name
        tp.data_type = ONNX_DTYPES[dtype]
        tp.dims.extend(shape)
        tp.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.filename), ("offset", str(entry["offset"])),
                           ("length", str(entry["length"]))):
            kv = tp.external_data.add()
            kv.key, kv.value = key, value
        return tp

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_weight(path: str | Path, entry: dict) -> torch.Tensor:
    """One tensor of a weights.bin as described by its manifest entry (a copy, in the stored dtype)."""
    path = Path(path)
    dtype = entry["dtype"]
    n = int(np.prod(entry["shape"], dtype=np.int64)) if entry["shape"] else 1
    np_dtype = {"bfloat16": np.int16, "float16": np.float16, "float32": np.float32, "int64": np.int64,
                "int32": np.int32, "bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "int4": np.uint8}[dtype]
    shape = list(entry["shape"])
    if dtype == "int4":  # two codes per byte along the last axis: read the packed bytes [.., C / 2]
        n, shape = n // 2, shape[:-1] + [shape[-1] // 2]
    if entry["length"] != n * np.dtype(np_dtype).itemsize:
        raise CapreseError(f"weights entry of {path.name} has length {entry['length']} for shape {entry['shape']}")
    try:
        arr = np.fromfile(path, dtype=np_dtype, count=n, offset=int(entry["offset"]))
    except OSError as e:
        raise CapreseError(f"cannot read {path}: {e}") from None
    if arr.size != n:
        raise CapreseError(f"{path} is truncated (a tensor ends past the end of the file); export again")
    t = torch.from_numpy(arr.copy()).reshape(shape)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t  # int4: the packed bytes, uint8 [.., C / 2]
