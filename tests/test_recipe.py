"""CalibrationRecipe / CalibrationOptions (caprese/calibration/recipe.py): per-method defaults, resolution against a
model, the CLI building the same objects as the Python API, what the artifact records, and old artifacts.

The per-method layer defaults are the paper's (/work/shared/CAPRESE.md): Caprese(GRIFFIN) on the first half of
the layers, Caprese(CATS) on all layers; magnitude (the static baseline) takes GRIFFIN's. The expected layer lists
are written out here, not computed with parse_layers.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cli_helpers import run_cli

from caprese.calibration.artifact import MANIFEST, load_artifact
from caprese.calibration.methods import EfficientFFN
from caprese.calibration.recipe import (METHOD_LAYERS, CalibrationOptions, CalibrationRecipe, E2EConfig,
                                        LayerwiseConfig)
from caprese.calibration.source import open_source
from caprese.cli.calibrate_command import calibrate_command, options_from_flags, recipe_from_flags
from caprese.errors import CapreseError

# gemma2 tiny model: 3 layers, hidden size 64 (tests/tiny_models.py)
GEMMA_LAYERS = {"griffin": [0], "cats": [0, 1, 2], "magnitude": [0]}


def test_method_layer_defaults_are_the_papers():
    assert METHOD_LAYERS == {"griffin": "first-half", "cats": "all", "magnitude": "first-half"}


@pytest.mark.parametrize("method, want", [("griffin", (0, 1, 2)), ("cats", (0, 1, 2, 3, 4, 5, 6)),
                                          ("magnitude", (0, 1, 2))])
def test_resolve_fills_the_layers_from_the_method(method, want):
    plan = CalibrationRecipe(method=method).resolve(num_layers=7, hidden_size=512)
    assert plan.layers == want and plan.layers_default
    assert plan.recipe.layers == METHOD_LAYERS[method] and plan.recipe.to_dict()["layers"] == METHOD_LAYERS[method]
    given = CalibrationRecipe(method="cats", layers=[4, 1]).resolve(7, 512)
    assert given.layers == (1, 4) and not given.layers_default and given.recipe.to_dict()["layers"] == "4,1"


def test_resolve_defaults():
    plan = CalibrationRecipe().resolve(4, 128)
    assert (plan.method, plan.density, plan.recipe.layers, plan.rank, plan.stage) == (
        "griffin", 0.5, "first-half", 64, "both")
    assert plan.recipe.layerwise == LayerwiseConfig(20, 1e-3, 128, 0.02) and plan.recipe.e2e == E2EConfig(3, 1e-4, 16)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(method="sparsegpt"), "unknown method 'sparsegpt'"),
    (dict(density=0.0), "density must be in (0, 1]"),
    (dict(density=1.5), "density must be in (0, 1]"),
    (dict(density="0.5"), "density must be in (0, 1] (a number); got '0.5'"),  # quoted: not a valid-looking 0.5
    (dict(rank=0), "rank must be at least 1"),
    (dict(rank=8.0), "rank must be at least 1 (an integer) and below the model's hidden size; got 8.0"),
    (dict(stage="all"), "unknown stage"),
    (dict(init="x"), "only goes with --stage e2e"),
    (dict(layerwise=LayerwiseConfig), "LayerwiseConfig"),
])
def test_recipe_rejects_bad_values(kwargs, needle):
    with pytest.raises((CapreseError, TypeError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        CalibrationRecipe(**kwargs)


@pytest.mark.parametrize("make, needle", [
    (lambda: LayerwiseConfig(epochs=0), "epochs"), (lambda: LayerwiseConfig(warmup=1.0), "warm-up"),
    (lambda: LayerwiseConfig(store="int8"), "capture store"), (lambda: E2EConfig(lr=0), "lr > 0"),
    (lambda: E2EConfig(batch_size=2.5), "batch size"), (lambda: CalibrationOptions(precision="fp8"), "precision"),
    (lambda: E2EConfig(loss="ce"), "end-to-end loss must be one of mse, kl"),
    (lambda: E2EConfig(responses="teacher"), "end-to-end responses must be one of dense, student"),
])
def test_configs_reject_bad_values(make, needle):
    with pytest.raises(CapreseError, match=needle):
        make()


def test_resolve_checks_against_the_model():
    with pytest.raises(CapreseError, match=r"below the hidden size \(64\)"):
        CalibrationRecipe(rank=64).resolve(2, 64)
    with pytest.raises(CapreseError, match="outside"):
        CalibrationRecipe(layers="5", rank=8).resolve(2, 64)


def test_recipe_is_frozen_and_hashable():
    r = CalibrationRecipe(method="cats", layers=[0, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.method = "griffin"
    assert r.layers == (0, 2) and hash(r) == hash(CalibrationRecipe(method="cats", layers=(0, 2)))


# ---------------------------------------------------------------- the CLI builds the same objects


def _flags(*args):
    ctx = calibrate_command.make_context("calibrate", ["MODEL", "-o", "OUT", *args])
    return dict(ctx.params)


def test_cli_flag_defaults_are_the_api_defaults():
    assert recipe_from_flags(_flags()) == CalibrationRecipe()
    assert options_from_flags(_flags()) == CalibrationOptions()


def test_cli_flags_map_onto_recipe_and_options():
    f = _flags("--method", "cats", "--density", "0.25", "--layers", "0,2", "--rank", "8", "--stage", "layerwise",
               "--epochs", "3", "--lr", "0.01", "--batch-size", "64", "--layerwise-mode", "sequential",
               "--e2e-epochs", "2", "--e2e-lr", "1e-5", "--e2e-batch-size", "4", "--warmup", "0.1", "--seed", "7",
               "--precision", "bf16", "--device", "cuda:1", "--work-dir", "W", "--force", "--keep-work", "--quiet")
    assert recipe_from_flags(f) == CalibrationRecipe(
        "cats", 0.25, "0,2", 8, stage="layerwise",
        layerwise=LayerwiseConfig(epochs=3, lr=0.01, batch_size=64, warmup=0.1, seed=7, mode="sequential"),
        e2e=E2EConfig(epochs=2, lr=1e-5, batch_size=4, warmup=0.1, seed=7))
    assert options_from_flags(f) == CalibrationOptions("bf16", "cuda:1", "W", keep_work=True, force=True,
                                                       progress=False)


def _normalised_help(entry, args, monkeypatch, capsys):
    rc, out, _ = run_cli(entry, args, monkeypatch, capsys)
    assert rc == 0
    return " ".join(out.split())


@pytest.mark.parametrize("command", ["calibrate", "eval", "generate"])
def test_help_shows_the_per_method_layer_defaults(command, monkeypatch, capsys):
    from caprese.cli.main import main

    text = _normalised_help(main, [command, "--help"], monkeypatch, capsys)
    assert "griffin: first-half, cats: all, magnitude: first-half" in text, text


# ---------------------------------------------------------------- the commands use them


def _calibrate(model, out, tmp_path, monkeypatch, capsys, *args):
    from caprese.cli.main import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the cat {i} sees", "response": f"a dog and {i} birds fly"}) + "\n"
                            for i in range(4)))
    rc, stdout, err = run_cli(main, ["calibrate", model, "-o", out, "--data", data, "--rank", "4", "--stage",
                                     "layerwise", "--epochs", "1", "--quiet", "--json", *args], monkeypatch, capsys)
    assert rc == 0, err
    return json.loads(stdout)


@pytest.mark.parametrize("method", ["griffin", "cats", "magnitude"])
def test_calibrate_without_layers_uses_and_records_the_methods_layers(tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys, method):
    model = tiny_model_dir("gemma2")
    obj = _calibrate(model, tmp_path / "art", tmp_path, monkeypatch, capsys, "--method", method)
    assert obj["layers"] == GEMMA_LAYERS[method]
    assert obj["recipe"]["layers"] == METHOD_LAYERS[method] and obj["recipe"]["layers_default"] is True
    on_disk = json.loads((tmp_path / "art" / MANIFEST).read_text())
    assert on_disk["layers"] == GEMMA_LAYERS[method] and on_disk["recipe"]["layers"] == METHOD_LAYERS[method]
    art = load_artifact(tmp_path / "art")
    assert sorted(art.adapters) == GEMMA_LAYERS[method]


def test_calibrate_with_layers_records_them(tiny_model_dir, tmp_path, monkeypatch, capsys):
    obj = _calibrate(tiny_model_dir("gemma2"), tmp_path / "art", tmp_path, monkeypatch, capsys, "--method", "cats",
                     "--layers", "first-half")
    assert obj["layers"] == [0] and obj["recipe"]["layers"] == "first-half"
    assert obj["recipe"]["layers_default"] is False


@pytest.mark.parametrize("method", ["griffin", "cats"])
def test_open_source_eval_and_generate_use_the_methods_layers(tiny_model_dir, monkeypatch, capsys, method):
    from caprese.cli.main import main

    model = tiny_model_dir("gemma2")
    tm = open_source(model, method)
    got = [i for i, layer in enumerate(tm.decoder.layers) if isinstance(layer.mlp, EfficientFFN)]
    assert got == GEMMA_LAYERS[method]
    label = f"{method}(d=0.5, {METHOD_LAYERS[method]})"
    assert tm.label == label
    rc, out, err = run_cli(main, ["eval", model, "--method", method, "--limit", 2, "-n", 2, "--no-dense", "--json",
                                  "--quiet"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["label"] == label
    rc, out, err = run_cli(main, ["generate", model, "--method", method, "-p", "hi", "-n", 2, "--json"],
                           monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["method"] == label
    # an explicit --layers still wins
    rc, out, err = run_cli(main, ["generate", model, "--method", method, "--layers", "1", "-p", "hi", "-n", 2,
                                  "--json"], monkeypatch, capsys)
    assert rc == 0 and json.loads(out)["method"] == f"{method}(d=0.5, 1)", err


# ---------------------------------------------------------------- artifacts from before the recipe fields


def test_an_artifact_without_the_new_recipe_fields_loads_and_seeds_e2e(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    from caprese.calibration.calibrate import plan_calibration

    model = tiny_model_dir("gemma2")
    _calibrate(model, tmp_path / "art", tmp_path, monkeypatch, capsys, "--method", "cats", "--layers", "0,2")
    path = tmp_path / "art" / MANIFEST
    m = json.loads(path.read_text())
    m["recipe"] = {}  # the oldest layout: no recipe details at all
    path.write_text(json.dumps(m))
    art = load_artifact(tmp_path / "art")
    assert (art.method, art.layers, art.recipe) == ("cats", [0, 2], {})
    plan = plan_calibration(model, CalibrationRecipe(stage="e2e", init=tmp_path / "art"))
    assert (plan.method, plan.layers, plan.recipe.layers, plan.rank) == ("cats", (0, 2), (0, 2), 4)
    assert not plan.layers_default
    with pytest.raises(CapreseError, match="differs from the init artifact's layers"):
        plan_calibration(model, CalibrationRecipe(stage="e2e", init=tmp_path / "art", layers="all"))
    dec_layers = [i for i, layer in enumerate(open_source(tmp_path / "art").decoder.layers)
                  if isinstance(layer.mlp, EfficientFFN)]
    assert dec_layers == [0, 2]
    for kwargs in (dict(density=0.3), dict(layers="0")):  # an artifact's are fixed: refused, not ignored
        with pytest.raises(CapreseError, match="is a calibration artifact: its density .* drop --density / --layers"):
            open_source(tmp_path / "art", **kwargs)
    assert torch.equal(art.adapters[0][0], load_artifact(tmp_path / "art").adapters[0][0])


def test_work_dir_that_overlaps_the_output_or_holds_user_files_is_refused(tmp_path):
    """A successful run deletes its work dir: one that is, holds or sits in OUT, or that holds files calibrate did
    not write, is refused before any work (it deleted a user's folder, or the artifact itself)."""
    from caprese.calibration.calibrate import check_work_dir, default_work_dir

    out = tmp_path / "runs" / "art"
    check_work_dir(default_work_dir(out), out)  # the default: fine, created or not
    for work in (out, tmp_path / "runs", out / "work"):
        with pytest.raises(CapreseError, match="overlap"):
            check_work_dir(work, out)
    mine = tmp_path / "mine"
    (mine / "capture").mkdir(parents=True)
    (mine / "layer_0.safetensors").write_bytes(b"")
    check_work_dir(mine, out)  # what calibrate writes (a resume): adopted
    (mine / "important.txt").write_text("precious")
    with pytest.raises(CapreseError, match=r"holds files calibrate did not write \(important.txt\)"):
        check_work_dir(mine, out)
    assert (mine / "important.txt").exists()


def test_one_calibrate_per_work_dir(tmp_path):
    """Two runs into one work dir appended to the same capture files: the second is refused while the first holds
    the lock, and takes it once the first is done."""
    from caprese.calibration.calibrate import _lock_work

    first = _lock_work(tmp_path / "w")
    with pytest.raises(CapreseError, match="another caprese calibrate is using the work dir"):
        _lock_work(tmp_path / "w")
    first.close()
    _lock_work(tmp_path / "w").close()


@pytest.mark.parametrize("meta", ['[1, 2]', '{"key": "k", "rows": "abc"}', '"x"'])
def test_a_garbled_capture_manifest_starts_the_capture_over(tmp_path, meta):
    """Not a TypeError / AttributeError from reading it: anything but the written object is no capture."""
    from caprese.calibration.capture_store import CaptureLayer

    (tmp_path / "layer_3.json").write_text(meta)
    c = CaptureLayer(tmp_path, 3, 8, "k", "fp32")
    assert c.state["rows"] == 0 and not c.complete
