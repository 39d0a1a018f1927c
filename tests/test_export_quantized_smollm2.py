"""Real weights: SmolLM2-135M-Instruct exported with int4 / int8 weights, on ONNX Runtime against the PyTorch
quantized reference (the decoder with every quantized weight replaced by dequantize(codes)).

Tolerance: fp32 on both sides, logits of magnitude ~25: 1e-3, as tests/test_export_smollm2.py holds the float
graphs (the graphs dequantize the very same codes and scales exactly; only the kernels' summation order differs,
MatMulNBits' included). Greedy tokens identical for 33 steps (the prefill token + 32 decode steps).
"""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import method_artifact, one_torch_thread, prompt_ids
from quantized_export_helpers import QuantLoop, quantized_reference

pytestmark = pytest.mark.slow
MAX_SEQ = 96
TOL = 1e-3


@pytest.mark.parametrize("method,weights,block,target,rho", [
    ("dense", "int4", 32, "onnxruntime", 0),  # GenAI's int4 layout: MatMulNBits for every decoder weight
    ("griffin", "int4", None, "tensorrt", 8),  # block 64, DequantizeLinear graphs, quantized per-prompt rows
    ("dense", "int8", None, "tensorrt", 0),  # one scale per row
])
def test_smollm2_quantized_engine_matches_reference(method, weights, block, target, rho, tmp_path, monkeypatch):
    import export_helpers as support
    from caprese.export.exporter import export
    from caprese.model.default_model import fetch_default

    src = fetch_default()
    if method != "dense":
        src = method_artifact(src, tmp_path / "art", method, rank=16, layers="first-half")
    engine = export(src, tmp_path / "engine", max_seq_len=MAX_SEQ, target=target, weights=weights,
                    block_size=block, kv_dtype="fp32").out  # held to the fp32 reference
    dec = quantized_reference(src, weights, block, target)
    prompt = prompt_ids(24, seed=29)
    monkeypatch.setattr(support, "MAX_SEQ", MAX_SEQ)
    with one_torch_thread():
        ref_tokens, ref_logits = support.reference_greedy(dec, prompt, 33, rho)
    tokens, logits = QuantLoop(engine, cache_len=MAX_SEQ, threads=2).greedy(prompt.numpy(), 33, reselect_every=rho)
    errs = [float(np.abs(a - b.numpy()).max()) for a, b in zip(logits, ref_logits)]
    print(f"SmolLM2 {method}/{weights}/{target}: max |logit diff| {max(errs):.3g} over {len(errs)} steps")
    for step, err in enumerate(errs):
        assert err < TOL, f"{method}/{weights} step {step}: max |diff| {err:.3g}"
    assert tokens.tolist() == ref_tokens.tolist()
