"""Which quantized weights an export writes: the artifact's own codes, or round-to-nearest at export time.

  caprese-export SRC --weights int4|int8 [--block-size N] [--quantize-head]

A calibration artifact that carries its quantization (the recipe as `artifact.weights`, the codes from its
quantized.safetensors through `artifact.quantized_weights()`; `artifact_quantization` is the one seam that reads
them) is exported with exactly those
codes: `--weights` may repeat its bit width, never change it. A plain model folder, or an artifact without
quantization, is quantized here with RTN (caprese.calibration.weight_quant.quantize_decoder) BEFORE the method is
installed, so the PyTorch decoder the parity tests compare against holds the same dequantized values.

TensorRT (target tensorrt) takes INT4 weights only in blocks of 64 or 128 ("INT4 quantization requires per-block
scales. The supported block sizes are {64, 128}": TensorRT, Quantization Schemes,
docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html) and INT8 weights only
per-tensor or per-channel (IDequantizeLayer blocks INT4 / FP8 / FP4 only, NvInfer.h), so its default int4 block is
64, and int8 is one scale per row everywhere. ONNX Runtime takes every block size (target onnxruntime: 32 default,
GenAI's int4 granularity).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from caprese.calibration.weight_quant import ALL_ROLES, QuantRecipe, quantize_decoder, weight_slots
from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.quantized_weights import QuantizedWeights, export_recipe, spec_recipe
from caprese.model.quantization import ROW, WeightFormat, linear_weight

TENSORRT_INT4_BLOCKS = (64, 128)  # TensorRT Quantization Schemes page (module docstring)


@dataclasses.dataclass(frozen=True)
class QuantRequest:
    """What the user asked for: --weights, --block-size, --quantize-head."""

    weights: str | None = None  # "int4" | "int8"
    block_size: int | str | None = None  # 32 | 64 | 128 | "row"; None: the default of the bits and target
    head: bool = False
    int8_activations: bool = False  # target onnxruntime: MatMulNBits accuracy_level 4
    float_selection: bool = False  # GRIFFIN's per-prompt matrices in floats (dequantized when folded)
    fp16_bypass: bool = False  # the bypass L / R stored fp16 in an fp32 engine


def artifact_quantization(art) -> tuple[QuantRecipe, dict] | None:
    """(recipe, {HF name: QuantizedTensor}) of an artifact calibrated with quantized weights, else None.

    The seam with the calibration artifact: `art.weights` is its caprese.calibration.weight_quant.QuantRecipe (None:
    not quantized) and `art.quantized_weights()` returns its codes, {HF name: QuantizedTensor} (read from its
    quantized.safetensors, checked against the artifact's record)."""
    recipe = getattr(art, "weights", None)
    if recipe is None:
        return None
    tensors = art.quantized_weights() if callable(getattr(art, "quantized_weights", None)) else None
    if not tensors:
        raise CapreseError(f"{getattr(art, 'path', None) or 'the artifact'} records a quantization recipe but holds no "
                           "quantized weights; calibrate it again")
    return recipe, dict(tensors)


def requested_format(request: QuantRequest, target: str) -> WeightFormat:
    block = request.block_size
    fmt = WeightFormat.parse(request.weights, block)
    if block is None and fmt.bits == 4 and target == C.TARGET_TENSORRT:
        fmt = WeightFormat(4, TENSORRT_INT4_BLOCKS[0], fmt.scale_dtype)
    return fmt


def down_axis(target: str, method: str | None) -> str:
    """The down projection's block axis of an export-time quantization: "out" ([F, D], a neuron's row is whole
    blocks: GRIFFIN's gather, CATS' row skipping in the native kernel; the recipe default), but "in" for a dense
    model on target onnxruntime, where [D, F] blocked along F runs as MatMulNBits instead of a DequantizeLinear
    of the whole matrix every step (tools/bench_quantized_matmul.py)."""
    return "in" if target == C.TARGET_ONNXRUNTIME and method in (None, C.DENSE) else "out"


def check_target(fmt: WeightFormat, target: str) -> None:
    """One-line CapreseError for a format the target's engine cannot take (module docstring)."""
    if target != C.TARGET_TENSORRT:
        return
    if fmt.bits == 4 and fmt.block_size not in TENSORRT_INT4_BLOCKS:
        raise CapreseError(f"TensorRT takes int4 weights in blocks of 64 or 128 only (its Quantization Schemes page), "
                           f"not {fmt.block_name}: use --block-size 64 or 128, or --target onnxruntime")
    if fmt.bits == 8 and fmt.block_size != ROW:
        raise CapreseError(f"TensorRT takes int8 weights with one scale per row only (IDequantizeLayer blocks INT4, "
                           f"FP8 and FP4), not blocks of {fmt.block_size}: use --block-size row, or --target onnxruntime")


def _load_codes(decoder, recipe: QuantRecipe, tensors: dict) -> None:
    """The decoder's weights become the artifact codes' dequantized values (the PyTorch reference of the graphs)."""
    slots = {s.name: s for s in weight_slots(decoder, ALL_ROLES)}
    with torch.no_grad():
        for name, qt in tensors.items():
            slot = slots.get(name)
            if slot is None:
                raise CapreseError(f"the artifact's quantized weights name {name}, which this model does not have")
            axis = "in" if slot.role == "embed" else recipe.block_axis(slot.role)
            w = slot.weight
            value = linear_weight(qt, axis, w.dtype)
            if tuple(value.shape) != tuple(w.shape):
                raise CapreseError(f"the artifact's quantized {name} has shape {list(value.shape)}, the model "
                                   f"{list(w.shape)}; it was calibrated on another model")
            w.copy_(value)


def quantize_for_export(decoder, art, request: QuantRequest | None, target: str,
                        log: Callable[[str], None] | None = None) -> QuantizedWeights | None:
    """The quantized weights of this export (None: floats); the decoder's weights hold their dequantized values."""
    log = log or (lambda msg: None)
    level = 4 if request is not None and request.int8_activations else 0
    if level and target != C.TARGET_ONNXRUNTIME:
        raise CapreseError("--int8-activations is MatMulNBits' accuracy level 4: it needs --target onnxruntime")
    own = artifact_quantization(art) if art is not None else None
    if own is not None:
        recipe, tensors = own
        fmt = recipe.fmt
        if request is not None:
            asked = requested_format(dataclasses.replace(request, weights=request.weights or fmt.name), target)
            if request.weights and asked.bits != fmt.bits:
                raise CapreseError(f"--weights {request.weights}: the artifact was calibrated with {fmt.name} "
                                   f"weights; export it without --weights (its own {fmt.name} codes) or calibrate "
                                   f"again with --weights {request.weights}")
            if request.block_size is not None and asked.block_size != fmt.block_size:
                raise CapreseError(f"--block-size {request.block_size}: the artifact's {fmt.name} weights are in "
                                   f"blocks of {fmt.block_name}; drop --block-size or calibrate again")
            if request.head and "lm_head" not in recipe.roles:  # (int8 activations: any recipe)
                raise CapreseError("--quantize-head: the artifact's quantization leaves the LM head in floats; "
                                   "drop --quantize-head or calibrate again with the head quantized")
        check_target(fmt, target)
        _load_codes(decoder, recipe, tensors)
        log(f"weights: the artifact's {fmt.name} codes (block {fmt.block_name}, {recipe.method})")
    elif request is None:
        return None
    else:
        if not request.weights:
            raise CapreseError("--block-size, --quantize-head, --int8-activations, --float-selection and --fp16-bypass "
                               "need --weights int4 or int8")
        fmt = requested_format(request, target)
        check_target(fmt, target)
        recipe = export_recipe(fmt, request.head, down_axis=down_axis(target, art.method if art is not None else None))
        log(f"weights: {fmt.name}, block {fmt.block_name}, round-to-nearest")
        tensors = quantize_decoder(decoder, recipe)
    float_sel = request is not None and request.float_selection
    fp16_bypass = request is not None and request.fp16_bypass
    return QuantizedWeights(tensors, dataclasses.replace(spec_recipe(recipe), accuracy_level=level,
                                                         float_selection=float_sel, fp16_bypass=fp16_bypass))
