"""Calibration over block-quantized weights (`caprese calibrate --weights`, issue 15) on tiny random models.

The reference is independent of the code under test: a float64 round-to-nearest written here from the format's
rule (scale = fp16(absmax / qmax), code = clamp(round_half_even(w / scale))), the down projection blocked along its
outputs), two float64 decoders (the unquantized teacher, and a student whose every decoder linear weight is that
reference's dequantized value), and whole-model forwards with hooks. Tolerances: the calibration runs in fp32, the
reference in float64; recorded squared errors are sums of O(1) terms, so rel 1e-3 is far above fp32 rounding and
far below what a wrong teacher (quantized: the residuals vanish) or a wrong student (unquantized) would change.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from distributed_worker import make_samples

from caprese.calibration.artifact import QUANTIZED, load_artifact
from caprese.calibration.calibrate import calibrate
from caprese.calibration.quantized_file import read_quantized, write_quantized
from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe, E2EConfig, LayerwiseConfig
from caprese.calibration.source import open_source
from caprese.calibration.weight_quant import QuantRecipe, quantize_decoder, weight_slots
from caprese.calibration.weights_choice import WeightsChoice
from caprese.errors import CapreseError
from caprese.model.loading import load_decoder
from caprese.model.quantization import WeightFormat, linear_weight, quantize_rtn

QUIET = CalibrationOptions(progress=False)
LW = LayerwiseConfig(epochs=3, lr=5e-3, batch_size=32, seed=1)
E2E = E2EConfig(epochs=1, lr=1e-3, batch_size=4, seed=1)
INT4 = QuantRecipe(WeightFormat(4, 32))
KIND = "llama3"  # hidden 64, 4 heads x 16, FFN 128, tied embeddings: every decoder weight tiles blocks of 32
ROLES = {"q_proj": "in", "k_proj": "in", "v_proj": "in", "o_proj": "in", "gate_proj": "in", "up_proj": "in",
         "down_proj": "out"}


def ref_dequant(w: torch.Tensor, bits: int, block: int, axis: str) -> torch.Tensor:
    """float64 RTN of an nn.Linear weight [out, in], blocks along `axis`, fp16 scales: the dequantized weight."""
    w = w.double()
    m = w if axis == "in" else w.t()
    r, c = m.shape
    qmax = (1 << (bits - 1)) - 1
    blocks = m.reshape(r, c // block, block)
    absmax = blocks.abs().amax(-1)
    scale = (absmax / qmax).half().double().clamp_min(torch.finfo(torch.float16).tiny)
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale)[..., None]
    deq = (torch.round(blocks / scale).clamp(-qmax, qmax) * scale).reshape(r, c)
    return deq if axis == "in" else deq.t()


def reference_pair(model_dir, bits=4, block=32):
    """(teacher, student): float64 decoders, the student's decoder linear weights replaced by ref_dequant."""
    teacher = load_decoder(model_dir, torch.float64)
    student = load_decoder(model_dir, torch.float64)
    with torch.no_grad():
        for layer in student.layers:
            for mod in (layer.self_attn, layer.mlp):
                for name, axis in ROLES.items():
                    lin = getattr(mod, name, None)
                    if lin is not None:
                        lin.weight.copy_(ref_dequant(lin.weight, bits, block, axis))
    return teacher, student


def run_recorded(dec, ids, hooks: dict):
    """Forward `ids` with {(module, kind): store} hooks ("pre": the module's input, "out": its output)."""
    handles = []
    for (mod, kind), store in hooks.items():
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(lambda m, a, s=store: s.append(a[0][0].clone())))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, s=store: s.append(o[0].clone())))
    try:
        dec.setup_caches(1, ids.shape[1])
        with torch.no_grad():
            return dec.hidden_states(ids, 0, phase="prefill")[0]
    finally:
        for h in handles:
            h.remove()


def ffn64(mlp, x):
    return mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))


# ---------------------------------------------------------------- the student and the teacher

def test_student_weights_are_the_dequantized_codes_and_the_teacher_stays_unquantized(tiny_model_dir):
    """StudentWeights swaps every decoder linear weight: student() = the float64 reference's dequantized values
    exactly (fp16 scales: code x scale is exact in fp32), teacher() = the original bytes; the embedding / norms
    are never touched; the FFN output in each state matches its float64 reference."""
    from caprese.calibration.quantized_student import prepare_student

    model = tiny_model_dir(KIND)
    dec = load_decoder(model)
    orig = {n: p.detach().clone() for n, p in dec.named_parameters()}
    sw = prepare_student(dec, INT4)
    teacher64, student64 = reference_pair(model)
    x = torch.randn(1, 5, dec.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, p in dec.named_parameters():  # state after prepare_student: the teacher
        assert torch.equal(p, orig[name]), name
    with sw.student():
        for slot in weight_slots(dec, INT4.roles):
            axis = INT4.block_axis(slot.role)
            want = ref_dequant(orig[slot.name], 4, 32, axis)  # HF names are the decoder's parameter names
            assert torch.equal(slot.weight.double(), want), slot.name
        assert torch.equal(dec.model.embed_tokens.weight, orig["model.embed_tokens.weight"])
        with torch.no_grad():
            y_s = dec.layers[0].mlp(x)
        with sw.teacher():
            with torch.no_grad():
                y_t = dec.layers[0].mlp(x)
    ref_s, ref_t = ffn64(student64.layers[0].mlp, x.double()), ffn64(teacher64.layers[0].mlp, x.double())
    err_s, err_t = float((y_s.double() - ref_s).abs().max()), float((y_t.double() - ref_t).abs().max())
    gap = float((ref_s - ref_t).abs().max())
    print(f"student FFN max |diff| {err_s:.2e}, teacher {err_t:.2e}, quantization changes it by {gap:.2e}")
    assert err_s < 1e-5 and err_t < 1e-5 and gap > 1e-2
    for name, p in dec.named_parameters():  # both contexts closed: the teacher again
        assert torch.equal(p, orig[name]), name


def test_parallel_layerwise_residual_is_dense_ffn_minus_quantized_ffn(tiny_model_dir, tmp_path):
    """--method none, parallel layer-wise: inputs x from the UNQUANTIZED model, r = FF(x) − Q(FF)(x). The recorded
    mean ‖r‖² and mean ‖FF(x)‖² per layer equal the float64 reference's; a quantized teacher makes r vanish, an
    unquantized student too."""
    model = tiny_model_dir(KIND)
    samples = make_samples(6, seed=2)
    art = calibrate(model, tmp_path / "a", CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                                                            weights=INT4), samples, QUIET)
    teacher64, student64 = reference_pair(model)
    n = len(teacher64.layers)
    sums = {i: [0.0, 0.0] for i in range(n)}
    rows = 0
    for s in samples:
        xs = {i: [] for i in range(n)}
        run_recorded(teacher64, torch.tensor([s.ids]), {(teacher64.layers[i].mlp, "pre"): xs[i] for i in range(n)})
        p = len(s.prompt_ids)
        for i in range(n):
            x = xs[i][0][p:]
            y = ffn64(teacher64.layers[i].mlp, x)
            r = y - ffn64(student64.layers[i].mlp, x)
            sums[i][0] += float(r.square().sum())
            sums[i][1] += float(y.square().sum())
        rows += len(s.response_ids)
    for i in range(n):
        m = art.metrics["layerwise"]["layers"][str(i)]
        assert m["before"] == pytest.approx(sums[i][0] / rows, rel=1e-3), i
        assert m["ff_sq"] == pytest.approx(sums[i][1] / rows, rel=1e-3), i
        assert m["before_rel"] > 1e-3 and m["after"] < m["before"], m


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_parallel_layerwise_selection_comes_from_the_quantized_ffn(tiny_model_dir, tmp_path, method):
    """GRIFFIN / CATS over int4: FF̂'s selection (top-k of the prompt's statistic, τ) is taken from the QUANTIZED
    FFN's activations on the prompt, as the int4 graphs will take it; the reference builds the method's FFN
    around the float64 student's FFN and feeds it the teacher's inputs."""
    from caprese.calibration.methods import make_method_ffn
    from caprese.model.ffn import FFNContext

    model = tiny_model_dir(KIND)
    samples = make_samples(5, seed=7)
    art = calibrate(model, tmp_path / "a", CalibrationRecipe(method, 0.5, "all", 4, stage="layerwise",
                                                            layerwise=LW, weights=INT4), samples, QUIET)
    teacher64, student64 = reference_pair(model)
    n = len(teacher64.layers)
    sums, rows = [0.0] * n, 0
    for s in samples:
        xs = {i: [] for i in range(n)}
        run_recorded(teacher64, torch.tensor([s.ids]), {(teacher64.layers[i].mlp, "pre"): xs[i] for i in range(n)})
        p = len(s.prompt_ids)
        for i in range(n):
            x = xs[i][0]
            f = make_method_ffn(student64.layers[i].mlp, method, 0.5)
            with torch.no_grad():
                a = f.act(f.dense.gate_proj(x[None, :p]))
                f.observe(a, a * f.dense.up_proj(x[None, :p]), FFNContext("prefill", 0))
                r = ffn64(teacher64.layers[i].mlp, x[p:]) - f.approx(x[None, p:])[0]
            sums[i] += float(r.square().sum())
        rows += len(s.response_ids)
    for i in range(n):
        assert art.metrics["layerwise"]["layers"][str(i)]["before"] == pytest.approx(sums[i] / rows, rel=1e-3), i


def test_a_resumed_run_trains_over_the_codes_kept_in_the_work_dir(tiny_model_dir, tmp_path, monkeypatch):
    """GPTQ codes are computed once per work dir: a rerun (here: a second output from the kept work dir) reads
    them back instead of quantizing again, and gets the same codes and adapters."""
    import caprese.calibration.quantized_student as qs

    model = tiny_model_dir(KIND)
    samples = make_samples(4, seed=8)
    recipe = CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                               weights=QuantRecipe(WeightFormat(4, 32), "gptq"))
    opts = CalibrationOptions(progress=False, work_dir=tmp_path / "w", keep_work=True)
    first = calibrate(model, tmp_path / "a", recipe, samples, opts)
    assert list((tmp_path / "w").glob("quantized-*.safetensors"))

    def refuse(*a, **k):
        raise AssertionError("quantized again")

    monkeypatch.setattr(qs, "quantize_decoder", refuse)
    second = calibrate(model, tmp_path / "b", recipe, samples, opts)
    a, b = first.qweights, load_artifact(tmp_path / "b").quantized_weights()
    assert all(torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].scales, b[k].scales) for k in a)
    assert all(torch.equal(first.adapters[i][1], second.adapters[i][1]) for i in first.adapters)


def test_sequential_layer0_sees_the_quantized_attention_against_the_dense_output(tiny_model_dir, tmp_path):
    """Sequential mode: layer 0's x and mid come from the student (quantized q/k/v/o, its own prompt), the target
    from the dense layer output, and FF(x) for ‖FF(x)‖² from the unquantized FFN."""
    model = tiny_model_dir(KIND)
    samples = make_samples(5, seed=3)
    art = calibrate(model, tmp_path / "a",
                    CalibrationRecipe("none", rank=4, stage="layerwise", weights=INT4,
                                      layerwise=LayerwiseConfig(epochs=2, lr=5e-3, batch_size=32, mode="sequential")),
                    samples, QUIET)
    teacher64, student64 = reference_pair(model)
    before = ff = 0.0
    rows = 0
    for s in samples:
        ids, p = torch.tensor([s.ids]), len(s.prompt_ids)
        t, mid, x, fq = [], [], [], []
        run_recorded(teacher64, ids, {(teacher64.layers[0], "out"): t})
        run_recorded(student64, ids, {(student64.layers[0].post_attention_layernorm, "pre"): mid,
                                      (student64.layers[0].mlp, "pre"): x, (student64.layers[0].mlp, "out"): fq})
        target = t[0][p:] - mid[0][p:]
        before += float((target - fq[0][p:]).square().sum())
        ff += float(ffn64(teacher64.layers[0].mlp, x[0][p:]).square().sum())
        rows += len(s.response_ids)
    m = art.metrics["layerwise"]["layers"]["0"]
    assert m["before"] == pytest.approx(before / rows, rel=1e-3)
    assert m["ff_sq"] == pytest.approx(ff / rows, rel=1e-3)


def test_e2e_teacher_is_the_unquantized_model_and_the_student_the_quantized_one(tiny_model_dir, tmp_path):
    """E2E, --method none: before training, the student without bypasses is exactly the quantized model, so the
    recorded final-hidden MSE 'FF^ alone' equals the float64 MSE between the dense and the quantized model on the
    response tokens (attention quantized too); training the bypass lowers it."""
    model = tiny_model_dir(KIND)
    samples = make_samples(6, seed=4)
    art = calibrate(model, tmp_path / "a", CalibrationRecipe("none", rank=4, layerwise=LW, e2e=E2E, weights=INT4),
                    samples, QUIET)
    teacher64, student64 = reference_pair(model)
    sse, count = 0.0, 0
    for s in samples:
        ids, p = torch.tensor([s.ids]), len(s.prompt_ids)
        h_t = run_recorded(teacher64, ids, {})[p:]
        h_s = run_recorded(student64, ids, {})[p:]
        sse += float((h_t - h_s).square().sum())
        count += h_t.numel()
    e2 = art.metrics["e2e"]
    print(f"e2e MSE: reference {sse / count:.6g}, recorded {e2['mse_approx']:.6g} -> {e2['mse_after']:.6g}")
    assert e2["mse_approx"] == pytest.approx(sse / count, rel=1e-3)
    assert e2["mse_after"] < e2["mse_approx"]


# ---------------------------------------------------------------- the artifact

def test_artifact_round_trips_the_exact_codes_and_method_none_trains_only_the_bypass(tiny_model_dir, tmp_path):
    """quantized.safetensors holds the codes RTN gives the base model (bit for bit, packed as export writes them);
    the artifact has nothing else but L, R (trained: R != 0) on every layer; applying it gives the dequantized
    weights exactly and the base model's norms / embedding unchanged."""
    model = tiny_model_dir(KIND)
    samples = make_samples(6, seed=5)
    calibrate(model, tmp_path / "a", CalibrationRecipe("none", rank=4, layerwise=LW, e2e=E2E, weights=INT4),
              samples, QUIET)
    art = load_artifact(tmp_path / "a")
    assert art.weights == INT4 and art.method == "none" and art.layers == [0, 1]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapters.safetensors", "caprese.json",
                                                                  QUANTIZED]
    got = art.quantized_weights()
    fresh = quantize_decoder(load_decoder(model), INT4)
    assert sorted(got) == sorted(fresh)
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "a" / QUANTIZED))
    for name, qt in fresh.items():
        assert torch.equal(got[name].codes, qt.codes) and torch.equal(got[name].scales, qt.scales), name
        assert torch.equal(raw[name + ".codes"], qt.packed()), name
    assert all(float(R.abs().sum()) > 0 for _, R in art.adapters.values())

    base = load_decoder(model)
    dec = open_source(tmp_path / "a").decoder
    for slot in weight_slots(dec, INT4.roles):
        assert torch.equal(slot.weight, linear_weight(got[slot.name], INT4.block_axis(slot.role))), slot.name
    quantized = {s.name for s in weight_slots(dec, INT4.roles)}
    for name, p in base.named_parameters():
        if name not in quantized:
            assert torch.equal(dict(dec.named_parameters())[name], p), name


def test_corrupt_or_missing_quantized_file_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from caprese.cli.main import main

    model = tiny_model_dir(KIND)
    calibrate(model, tmp_path / "a", CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                                                       weights=INT4), make_samples(4), QUIET)
    f = tmp_path / "a" / QUANTIZED
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # one code byte
    f.write_bytes(bytes(data))
    with pytest.raises(CapreseError, match="corrupt"):
        open_source(tmp_path / "a")
    rc, _, err = run_cli(main, ["eval", tmp_path / "a", "--limit", "1", "-n", "2", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "corrupt")
    f.unlink()
    rc, _, err = run_cli(main, ["eval", tmp_path / "a", "--limit", "1", "-n", "2", "--quiet"], monkeypatch, capsys)
    assert_one_line_error(rc, err, QUANTIZED, "missing")
    with pytest.raises(CapreseError, match="missing"):
        read_quantized(f)


def test_the_same_codes_give_the_same_file_bytes_every_time(tmp_path):
    """safetensors writes its metadata keys in a random order per write; the artifact records the file's sha256, so
    identical codes must give identical bytes (8 writes: by chance all alike with probability 1/6^7 unfixed)."""
    g = torch.Generator().manual_seed(0)
    qt = quantize_rtn(torch.randn(8, 64, generator=g), INT4.fmt)
    qweights = {"model.layers.0.mlp.up_proj.weight": qt, "model.embed_tokens.weight": qt,
                "lm_head.weight": quantize_rtn(torch.randn(4, 64, generator=g), INT4.fmt)}
    blobs, shas = set(), set()
    for k in range(8):
        f = tmp_path / f"q{k}.safetensors"
        shas.add(write_quantized(f, qweights, INT4))
        blobs.add(f.read_bytes())
    assert len(shas) == 1 and len(blobs) == 1
    back = read_quantized(f, INT4, shas.pop())
    assert back.keys() == qweights.keys()
    for name, q in qweights.items():
        assert torch.equal(back[name].packed(), q.packed()) and torch.equal(back[name].scales, q.scales), name
    assert back["model.embed_tokens.weight"] is back["model.layers.0.mlp.up_proj.weight"]  # stored once, aliased


def test_e2e_from_a_quantized_init_keeps_its_codes_and_refuses_other_weights(tiny_model_dir, tmp_path):
    model = tiny_model_dir(KIND)
    samples = make_samples(4, seed=6)
    calibrate(model, tmp_path / "lw", CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                                                        weights=INT4), samples, QUIET)
    e2 = calibrate(model, tmp_path / "e2", CalibrationRecipe(stage="e2e", init=tmp_path / "lw", e2e=E2E), samples,
                   QUIET)
    assert e2.weights == INT4 and e2.method == "none"
    a, b = load_artifact(tmp_path / "lw").quantized_weights(), load_artifact(tmp_path / "e2").quantized_weights()
    assert all(torch.equal(a[n].codes, b[n].codes) for n in a)
    with pytest.raises(CapreseError, match="differs from the init artifact's int4"):
        calibrate(model, tmp_path / "x", CalibrationRecipe(stage="e2e", init=tmp_path / "lw", e2e=E2E,
                                                           weights=QuantRecipe(WeightFormat(8, 0))), samples, QUIET)


# ---------------------------------------------------------------- the command line

def run_main(args, monkeypatch, capsys):
    from caprese.cli.main import main

    return run_cli(main, args, monkeypatch, capsys)


@pytest.mark.parametrize("mode, quant, method", [("sequential", "gptq", "griffin"), ("parallel", "rtn", "cats")])
def test_cli_calibrates_layerwise_and_e2e_with_weights(tiny_model_dir, tmp_path, monkeypatch, capsys, mode, quant,
                                                       method):
    monkeypatch.setenv("CAPRESE_CACHE", str(tmp_path / "cache"))
    model = tiny_model_dir(KIND)
    rc, out, err = run_main(["calibrate", model, "-o", tmp_path / "a", "--weights", "int4", "--quant", quant,
                             "--method", method, "--layers", "all", "--rank", "4", "--synthetic", "6",
                             "--response-tokens", "8", "--epochs", "2", "--e2e-epochs", "1", "--e2e-batch-size", "3",
                             "--layerwise-mode", mode, "--json"], monkeypatch, capsys)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["recipe"]["weights"]["format"]["bits"] == 4 and obj["recipe"]["weights"]["method"] == quant
    assert obj["quantized"]["file"] == QUANTIZED and set(obj["metrics"]) >= {"layerwise", "e2e"}
    assert obj["metrics"]["e2e"]["mse_approx"] > 0
    rc, out, err = run_main(["eval", tmp_path / "a", "--weights", "int4", "--limit", "2", "-n", "4", "--json",
                             "--quiet"], monkeypatch, capsys)
    assert rc == 0, err
    assert "int4" in json.loads(out)["label"]


def test_eval_and_generate_run_the_quantized_baseline_on_a_plain_folder(tiny_model_dir, monkeypatch, capsys):
    """--weights on a plain folder: the model's weights are the dequantized codes (no bypass); the dense reference
    row stays unquantized."""
    model = tiny_model_dir(KIND)
    tm = open_source(model, weights=WeightsChoice("int8"))
    fresh = quantize_decoder(load_decoder(model), WeightsChoice("int8").recipe())
    for slot in weight_slots(tm.decoder, INT4.roles):
        assert torch.equal(slot.weight, linear_weight(fresh[slot.name], INT4.block_axis(slot.role)))
    assert "int8-rtn/brow" in tm.label
    rc, out, err = run_main(["eval", model, "--weights", "int4", "--limit", "2", "-n", "4", "--json", "--quiet"],
                            monkeypatch, capsys)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["label"] == "dense int4-rtn/b32" and obj["dense"]["label"] == "dense"
    assert obj["weights"]["format"]["bits"] == 4
    rc, out, err = run_main(["generate", model, "-p", "hi", "-n", "3", "--weights", "int4", "--method", "griffin",
                             "--json"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["method"].endswith("int4-rtn/b32")


@pytest.fixture(scope="module")
def int4_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "a"
    calibrate(tiny_model_dir(KIND), out, CalibrationRecipe("none", rank=4, stage="layerwise", layerwise=LW,
                                                            weights=INT4), make_samples(4), QUIET)
    return out


@pytest.mark.parametrize("args, needles", [
    (["eval", "MODEL", "--weights", "int3"], ["int3", "use int4 or int8"]),
    (["generate", "MODEL", "-p", "x", "--weights", "int3"], ["int3", "use int4 or int8"]),
    (["calibrate", "MODEL", "-o", "OUT", "--weights", "int3"], ["int3", "use int4 or int8"]),
    (["eval", "MODEL", "--weights", "int4", "--block-size", "48"], ["block size 48", "32, 64, 128 or row"]),
    (["generate", "MODEL", "-p", "x", "--weights", "int4", "--block-size", "0"],
     ["block size 0 is not supported", "32, 64, 128 or row"]),  # ROW's internal value, not a user spelling
    (["eval", "LLAMA", "--weights", "int4"], ["o_proj", "144", "multiple of the block size 32", "--block-size row"]),
    (["calibrate", "MODEL", "-o", "OUT", "--rank", "4", "--weights", "int4", "--block-size", "128"],
     ["q_proj", "64", "multiple of the block size 128", "--block-size 32 or 64 or row"]),
    (["eval", "ART", "--weights", "int8"], ["calibrated at int4, not int8"]),
    (["generate", "ART", "-p", "x", "--weights", "int8"], ["calibrated at int4, not int8"]),
    (["eval", "ART", "--weights", "int4", "--block-size", "64"], ["block size 32, not 64"]),
    (["eval", "ART", "--weights", "int4", "--quant", "gptq"], ["quantized with rtn, not gptq"]),
    (["eval", "MODEL", "--block-size", "32"], ["--block-size", "only meaningful with --weights"]),
    (["calibrate", "MODEL", "-o", "OUT", "--method", "none"], ["--method none", "--weights"]),
])
def test_bad_weight_flags_are_one_line_errors(tiny_model_dir, int4_artifact, tmp_path, monkeypatch, capsys, args,
                                              needles):
    subst = {"MODEL": tiny_model_dir(KIND), "LLAMA": tiny_model_dir("llama"), "ART": int4_artifact,
             "OUT": tmp_path / "out"}
    rc, _, err = run_main([subst.get(a, a) for a in args], monkeypatch, capsys)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()


def test_weights_on_an_unquantized_artifact_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    calibrate(tiny_model_dir(KIND), tmp_path / "a", CalibrationRecipe("griffin", rank=4, stage="layerwise",
                                                                      layerwise=LW), make_samples(4), QUIET)
    rc, _, err = run_main(["eval", tmp_path / "a", "--weights", "int4"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "calibrated on unquantized weights")


def test_recipe_records_the_weights_and_method_none_defaults():
    plan = CalibrationRecipe("none", weights=INT4).resolve(4, 128)
    assert plan.layers == (0, 1, 2, 3) and plan.density == 1.0 and plan.recipe.weights == INT4
    d = plan.recipe.to_dict()
    assert d["weights"] == INT4.to_dict() and QuantRecipe.from_dict(json.loads(json.dumps(d["weights"]))) == INT4
    assert CalibrationRecipe().to_dict()["weights"] is None
    with pytest.raises(CapreseError, match="--method none"):
        CalibrationRecipe("none")
    with pytest.raises(TypeError):
        CalibrationRecipe(weights="int4")


def test_non_finite_adapters_are_not_saved(tiny_model_dir, tmp_path, monkeypatch):
    """A damaged finished-layer file (or a diverged run) gave NaN adapters, saved with exit code 0: refused, and
    nothing is written at OUT."""
    import caprese.calibration.calibrate as cal

    real = cal.run_layerwise

    def poisoned(*args, **kwargs):
        got = real(*args, **kwargs)
        i = min(got.adapters)
        L, R = got.adapters[i]
        got.adapters[i] = (torch.full_like(L, float("nan")), R)
        return got

    monkeypatch.setattr(cal, "run_layerwise", poisoned)
    with pytest.raises(CapreseError, match="bypass of layer.s. 0 holds non-finite values"):
        calibrate(tiny_model_dir(KIND), tmp_path / "a", CalibrationRecipe("griffin", rank=4, stage="layerwise",
                                                                          layers="0", layerwise=LW),
                  make_samples(4), QUIET)
    assert not (tmp_path / "a").exists()
