"""ExportOptions: what one export builds (target, precision, lengths, low-bit weights, KV cache, TensorRT plans),
one object from the CLI's flags or the Python API, checked for values that are wrong whatever the model is.

    from caprese.export.exporter import export
    export(src, out, ExportOptions(target="onnxruntime", weights="int4", max_seq_len=2048))
    export(src, out, target="onnxruntime", weights="int4")   # the same: the fields as keywords
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from caprese.errors import CapreseError
from caprese.export import contract as C


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16 | bf16: the graphs' float dtype
    target: str = C.TARGET_TENSORRT  # tensorrt: standard ONNX (also ONNX Runtime's); onnxruntime: its contrib ops
    max_seq_len: int | None = None  # None: the model's context, at most exporter.DEFAULT_MAX_SEQ_LEN
    max_prompt_len: int | None = None  # None: max_seq_len - 1
    max_batch: int = 1
    # low-bit weights (export_quantization.py): the artifact's own codes where it carries them, else RTN here
    weights: str | None = None  # "int4" | "int8"
    block_size: int | str | None = None  # 32 | 64 | 128 | "row"; None: the bit width's default (int4 on TensorRT: 64)
    quantize_head: bool = False  # the LM head too
    int8_activations: bool = False  # target onnxruntime: MatMulNBits with int8 activations (accuracy_level 4)
    float_selection: bool = False  # GRIFFIN's per-prompt matrices as float w_gul / w_dr (dequantized per prompt)
    fp16_bypass: bool = False  # an fp32 engine's bypass L / R stored fp16 (half their bytes per step)
    kv_dtype: str | None = None  # "fp16" | "fp32"; None: exporter.default_kv_dtype
    engine: bool = False  # also build the TensorRT plans (needs TensorRT and a GPU)
    timing_cache: str | Path | None = None  # TensorRT's timing cache, read and updated

    def __post_init__(self):
        if self.target not in C.TARGETS:
            raise CapreseError(f"unknown --target {self.target!r}; use tensorrt (standard ONNX, the default) or "
                               "onnxruntime")
        if self.engine and self.target != C.TARGET_TENSORRT:
            raise CapreseError("--engine builds TensorRT plans from the standard graphs; drop --target onnxruntime")
        if self.timing_cache is not None and not self.engine:
            raise CapreseError("--timing-cache is TensorRT's, read and updated while building plans; add --engine or "
                               "drop --timing-cache")
        if self.precision not in C.PRECISIONS:
            raise CapreseError(f"unknown precision {self.precision!r}; use fp32, fp16 or bf16")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise CapreseError(f"max batch must be an integer >= 1; got {self.max_batch!r}")
        if self.target == C.TARGET_ONNXRUNTIME and self.max_batch != 1:
            raise CapreseError("--target onnxruntime graphs serve batch 1 (no left padding); use --max-batch 1")
        if self.fp16_bypass and self.precision != "fp32":
            raise CapreseError(f"--fp16-bypass stores an fp32 engine's bypass in fp16; a --precision {self.precision} "
                               f"engine keeps it in {self.precision} already: drop --fp16-bypass")
        if self.kv_dtype not in (None, self.precision, "fp32", "fp16"):
            raise CapreseError(f"unknown --kv-dtype {self.kv_dtype!r}; use fp16 (or the precision's own, "
                               "the default)")
        if self.kv_dtype == "fp32" and self.precision != "fp32":
            raise CapreseError(f"--kv-dtype fp32 with --precision {self.precision}: the cache takes the precision's "
                               "dtype; drop --kv-dtype")

    def replace(self, **changes) -> "ExportOptions":
        return dataclasses.replace(self, **changes)
