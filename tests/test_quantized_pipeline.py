"""calibrate --weights -> caprese-export -> runtime, end to end, on the real seam (no stand-in artifact).

The artifact is calibrated with GPTQ codes (other codes than the RTN export would pick by itself), so an export
that re-quantized instead of writing the artifact's codes would give other weights.bin bytes and, within a few
steps, other greedy tokens than the artifact's own PyTorch model (art.apply: the dequantized codes + L, R).
fp32 on both sides: the tokens must be identical (the quantized export tests hold logits to 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from distributed_worker import make_samples

from caprese.calibration.artifact import load_artifact
from caprese.calibration.calibrate import calibrate
from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe, LayerwiseConfig
from caprese.calibration.weight_quant import GPTQConfig, QuantRecipe
from caprese.model.quantization import WeightFormat

KIND = "llama3"  # hidden 64, FFN 128: every decoder weight tiles blocks of 32


@pytest.fixture(scope="module")
def gptq_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qpipe") / "art"
    recipe = CalibrationRecipe("griffin", density=0.5, layers="all", rank=4, stage="layerwise",
                               layerwise=LayerwiseConfig(epochs=2, lr=5e-3, batch_size=32, seed=1),
                               weights=QuantRecipe(WeightFormat(4, 32), method="gptq", gptq=GPTQConfig()))
    calibrate(tiny_model_dir(KIND), out, recipe, make_samples(6, seed=3), CalibrationOptions(progress=False))
    return out


def test_export_writes_the_artifacts_codes_and_runs_its_model(gptq_artifact, tmp_path):
    from caprese.calibration.source import open_source
    from caprese.export.exporter import export
    from caprese.export.manifest import load_manifest
    from caprese.export.weights import read_weight
    from caprese.runtime import Generator

    art = load_artifact(gptq_artifact)
    assert art.weights is not None and art.weights.method == "gptq"
    engine = export(gptq_artifact, tmp_path / "engine", max_seq_len=96, target="onnxruntime",
                    kv_dtype="fp32").out  # its tokens are the fp32 model's
    m = load_manifest(engine)
    assert m.spec.recipe.weights is not None and m.spec.recipe.weights.bits == 4

    # the down projection of layer 0 is stored [F, D] blocked along D on both sides: the artifact's bytes as they are
    qt = art.quantized_weights()["model.layers.0.mlp.down_proj.weight"]
    ref = m.spec.layers[0].fold.down if m.spec.layers[0].fold is not None else m.spec.layers[0].down
    assert torch.equal(read_weight(m.file("weights"), m.entry(ref)), qt.packed())

    tm = open_source(gptq_artifact)
    ids = tm.encode("What is 12 + 7?", chat=True)
    want = tm.generate(ids, max_new_tokens=24, ignore_eos=True).tokens
    got = Generator.load(engine, backend="onnxruntime").generate(ids, max_new_tokens=24, ignore_eos=True).tokens
    assert got == want
