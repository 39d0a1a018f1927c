"""Helpers of the quantized-export tests: exports cached per session, the PyTorch quantized reference, and an
OrtLoop that feeds a quantized layout's GRIFFIN rows (int4 OrtValues from packed bytes)."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import torch

from caprese.export import contract as C
from export_helpers import MAX_SEQ, OrtLoop, method_artifact, reference_kv_dtype

_CACHE: dict = {}


def q_export(tmp_path_factory, tiny_model_dir, kind, method, weights, block=None, target="tensorrt", head=False,
             precision="fp32", float_selection=False, int8_activations=False, fp16_bypass=False, kv_dtype="fp32",
             rank=8):
    """(engine, source) of a quantized export, once per session; kv_dtype as export_helpers.reference_kv_dtype,
    rank: the bypass's (method_artifact's)."""
    from caprese.export.exporter import export

    kv_dtype = reference_kv_dtype(kv_dtype, precision)
    key = (kind, method, weights, block, target, head, precision, float_selection, int8_activations, fp16_bypass,
           kv_dtype, rank)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp(f"qexport_{kind}_{method}_{weights}")
        src = tiny_model_dir(kind)
        if method != "dense":
            art_key = ("artifact", kind, method, rank)
            if art_key not in _CACHE:
                _CACHE[art_key] = method_artifact(src, tmp_path_factory.mktemp("qart") / "artifact", method, rank)
            src = _CACHE[art_key]
        out = export(src, root / "engine", precision=precision, max_seq_len=MAX_SEQ, max_prompt_len=MAX_SEQ - 1,
                     target=target, weights=weights, block_size=block, quantize_head=head,
                     float_selection=float_selection, int8_activations=int8_activations,
                     fp16_bypass=fp16_bypass, kv_dtype=kv_dtype).out
        _CACHE[key] = (out, src)
    return _CACHE[key]


def quantized_reference(src, weights, block, target="tensorrt", head=False):
    """The PyTorch decoder with RTN-quantized weights (dequantized values) and the artifact's method applied."""
    from caprese.calibration.artifact import is_artifact, load_artifact
    from caprese.calibration.weight_quant import quantize_decoder
    from caprese.export.export_quantization import QuantRequest, requested_format, down_axis
    from caprese.export.quantized_weights import export_recipe
    from caprese.model import load_decoder

    art = load_artifact(src) if is_artifact(src) else None
    dec = load_decoder(art.base_model if art else src, "fp32")
    axis = down_axis(target, art.method if art else None)
    quantize_decoder(dec, export_recipe(requested_format(QuantRequest(weights, block, head), target), head, down_axis=axis))
    if art is not None:
        art.apply(dec)
    dec.requires_grad_(False)
    return dec


def ort_value(ort, arr: np.ndarray, dtype: str):
    """An OrtValue of `dtype` holding arr; int4: arr is the packed bytes [.., D / 2] of a [.., D] tensor."""
    if dtype != "int4":
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
    shape = list(arr.shape[:-1]) + [arr.shape[-1] * 2]
    v = ort.OrtValue.ortvalue_from_shape_and_type(shape, onnx.TensorProto.INT4)
    src = np.ascontiguousarray(arr, np.uint8)
    ctypes.memmove(v.data_ptr(), src.ctypes.data, src.nbytes)
    return v


class QuantLoop(OrtLoop):
    """OrtLoop whose GRIFFIN selection feeds a quantized layout's per-prompt quantized rows (w_gu_q, ...)."""

    def select(self, out, tokens, restart):
        if not self.lay.quantized or C.w_gul(0) in {i.name for i in self.sessions[C.DECODE].get_inputs()} or \
                not self.lay.layers_of(C.GRIFFIN):
            return super().select(out, tokens, restart)
        dtypes = {t.name: t.dtype for t in self.lay.inputs(C.DECODE)}
        for i in self.lay.layers_of(C.GRIFFIN):
            s = torch.from_numpy(out[C.griffin_stat(i)])
            self.stat_sq[i] = s if restart or i not in self.stat_sq else self.stat_sq[i] + s
            idx, parts = self.folder.fold_quantized(i, self.stat_sq[i])
            self.idx[i] = idx
            for name, t in parts.items():
                self.selection[name] = ort_value(self.ort, t.numpy(), dtypes[name])


