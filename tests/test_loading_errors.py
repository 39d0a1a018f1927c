"""Bad model folders: load_spec / load_decoder must raise CapreseError with one useful line, never a traceback soup.

Each case starts from a good tiny checkpoint (tests/tiny_models.py) and breaks exactly one thing, then checks the
message names the offending file / tensor / value. The sharded cases also check a good sharded folder loads to
exactly the same weights as the single-file one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from caprese.errors import CapreseError
from caprese.model import load_decoder, load_spec
from tiny_models import make_tiny_model

KIND = "llama"  # biases on q/k/v/o and MLP: the most tensors per layer
PROBE = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return make_tiny_model(KIND, tmp_path_factory.mktemp("good") / KIND, tokenizer=False)


@pytest.fixture
def model_dir(good_dir, tmp_path) -> Path:
    """A private copy of the good folder, free to break."""
    return Path(shutil.copytree(good_dir, tmp_path / "model"))


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CapreseError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    print(f"[error] {msg}")
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert info.value.__cause__ is None or info.value.__suppress_context__  # no chained traceback shown
    return msg


def edit_weights(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_good_folder_loads(good_dir):
    """The baseline every other case breaks: it loads and runs."""
    model = load_decoder(good_dir)
    model.setup_caches(1, 4)
    assert model(torch.tensor([[1, 5, 9]]), 0).shape == (1, 3, load_spec(good_dir).vocab_size)


# --- the folder and config.json ------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_spec, load_decoder])
def test_missing_folder(tmp_path, loader):
    missing = tmp_path / "no-such-model"
    msg = one_line_error(loader, missing)
    assert "not found" in msg and str(missing) in msg


@pytest.mark.parametrize("loader", [load_spec, load_decoder])
def test_file_instead_of_folder(model_dir, loader):
    f = model_dir / "model.safetensors"
    msg = one_line_error(loader, f)
    assert "file" in msg and str(f) in msg


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    msg = one_line_error(load_decoder, model_dir)
    assert "config.json" in msg and "not found" in msg


@pytest.mark.parametrize("text", ['{"model_type": "llama", ', "\xff\xfe garbage", ""], ids=["cut", "binary", "empty"])
def test_invalid_json(model_dir, text):
    (model_dir / "config.json").write_bytes(text.encode("latin-1"))
    msg = one_line_error(load_spec, model_dir)
    assert "config.json" in msg and "JSON" in msg


def test_config_not_an_object(model_dir):
    (model_dir / "config.json").write_text("[1, 2, 3]")
    msg = one_line_error(load_spec, model_dir)
    assert "config.json" in msg and "object" in msg


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", None])
def test_unsupported_model_type(model_dir, model_type):
    _edit_config(model_dir, model_type=model_type)
    msg = one_line_error(load_decoder, model_dir)
    assert "unsupported model_type" in msg and repr(model_type) in msg and "llama" in msg  # says what is supported


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
], ids=["yarn", "dynamic"])
def test_unsupported_rope_type(model_dir, rope):
    _edit_config(model_dir, rope_parameters=rope)
    msg = one_line_error(load_decoder, model_dir)
    assert repr(rope["rope_type"]) in msg and "RoPE" in msg


BAD_CONFIGS = {  # config change -> words of transformers' own reason that the message should carry
    "heads": ({"num_attention_heads": 5}, "hidden size (96) is not a multiple of the number of attention heads (5)"),
    "type": ({"vocab_size": "big"}, "expected int"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_rejected_by_transformers(model_dir, case):
    _edit_config(model_dir, **BAD_CONFIGS[case][0])
    msg = one_line_error(load_spec, model_dir)
    assert "config.json is invalid for llama" in msg


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_rejection_names_the_reason(model_dir, case):
    """transformers' StrictDataclass errors put a header on line 1 and the reason on line 2: keep the reason."""
    _edit_config(model_dir, **BAD_CONFIGS[case][0])
    msg = one_line_error(load_spec, model_dir)
    assert BAD_CONFIGS[case][1] in msg


def test_heads_not_multiple_of_kv_heads(model_dir):
    _edit_config(model_dir, num_attention_heads=6, num_key_value_heads=4)
    msg = one_line_error(load_spec, model_dir)
    assert "num_key_value_heads" in msg and "6" in msg and "4" in msg


# --- weight files ---------------------------------------------------------------------------------------------


def test_only_pytorch_bin(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(tensors, model_dir / "pytorch_model.bin")
    msg = one_line_error(load_decoder, model_dir)
    assert ".bin" in msg and "pickle" in msg and "save_pretrained" in msg and str(model_dir) in msg


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    msg = one_line_error(load_decoder, model_dir)
    assert "no *.safetensors" in msg and str(model_dir) in msg


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    msg = one_line_error(load_decoder, model_dir)
    assert "corrupt" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("garbage", [bytes(range(256)) * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}",
                                     b"\x00" * 4], ids=["random", "bad-header", "too-short"])
def test_garbage_safetensors(model_dir, garbage):
    (model_dir / "model.safetensors").write_bytes(garbage)
    msg = one_line_error(load_decoder, model_dir)
    assert "corrupt" in msg and "model.safetensors" in msg


def test_tensor_of_wrong_shape(model_dir):
    def shrink(t):
        t[PROBE] = t[PROBE][:-3].clone()  # [48, 96] -> [45, 96]

    edit_weights(model_dir, shrink)
    msg = one_line_error(load_decoder, model_dir)
    assert PROBE in msg and "(45, 96)" in msg and "(48, 96)" in msg


def test_missing_tensor(model_dir):
    edit_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.bias"))
    msg = one_line_error(load_decoder, model_dir)
    assert "missing" in msg and "model.layers.1.mlp.up_proj.bias" in msg


def test_many_missing_tensors_are_summarised(model_dir):
    def drop_layer(t):
        for name in [n for n in t if n.startswith("model.layers.1.")]:
            del t[name]

    edit_weights(model_dir, drop_layer)
    msg = one_line_error(load_decoder, model_dir)
    assert "missing" in msg and "more" in msg and "model.layers.1." in msg and len(msg) < 400


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.q_proj.weight",  # a layer the config doesn't have
                                  "model.layers.0.self_attn.q_norm.weight"])  # a qwen3-only tensor
def test_unexpected_tensor(model_dir, name):
    edit_weights(model_dir, lambda t: t.__setitem__(name, torch.zeros(24)))
    msg = one_line_error(load_decoder, model_dir)
    assert "unexpected" in msg and name in msg and "model.safetensors" in msg


def test_integer_tensor_is_refused(model_dir):
    edit_weights(model_dir, lambda t: t.__setitem__(PROBE, torch.zeros(t[PROBE].shape, dtype=torch.int8)))
    msg = one_line_error(load_decoder, model_dir)
    assert PROBE in msg and "int8" in msg


def test_rotary_inv_freq_is_ignored(model_dir, good_dir):
    """Older checkpoints carry rotary_emb.inv_freq buffers: not an error, and not used."""
    edit_weights(model_dir, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                    torch.full((12,), 123.0)))
    a, b = load_decoder(model_dir).state_dict(), load_decoder(good_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_checkpoint_loads_in_any_dtype(tmp_path, saved):
    """A checkpoint stored in bf16/fp16: the spec records it, and fp32 loading upcasts the stored values exactly."""
    folder = make_tiny_model("qwen3", tmp_path / "half", dtype=saved, tokenizer=False)
    assert load_spec(folder).dtype == str(saved).replace("torch.", "")
    stored = load_file(str(folder / "model.safetensors"))
    assert all(t.dtype == saved for t in stored.values())
    for want in (torch.float32, saved):
        sd = load_decoder(folder, want).state_dict()
        for name, t in stored.items():
            assert sd[name].dtype == want and torch.equal(sd[name], t.to(want)), name


def test_unknown_precision(good_dir):
    msg = one_line_error(load_decoder, good_dir, "int4")
    assert "'int4'" in msg and "bf16" in msg


# --- sharded checkpoints --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, good_dir) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = tmp_path_factory.mktemp("sharded") / KIND
    AutoModelForCausalLM.from_pretrained(good_dir).save_pretrained(out, max_shard_size="200KB")
    shutil.copy(good_dir / "generation_config.json", out / "generation_config.json")
    return out


def test_sharded_checkpoint_loads_identically(sharded_dir, good_dir):
    shards = sorted(sharded_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (sharded_dir / "model.safetensors").exists()
    a, b = load_decoder(sharded_dir).state_dict(), load_decoder(good_dir).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_with_missing_shard(sharded_dir, tmp_path):
    folder = Path(shutil.copytree(sharded_dir, tmp_path / "sharded"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    msg = one_line_error(load_decoder, folder)
    assert victim in msg and "missing" in msg


def test_sharded_index_invalid_json(sharded_dir, tmp_path):
    folder = Path(shutil.copytree(sharded_dir, tmp_path / "sharded"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    msg = one_line_error(load_decoder, folder)
    assert "model.safetensors.index.json" in msg and "JSON" in msg


def test_sharded_index_points_outside_folder(sharded_dir, tmp_path):
    folder = Path(shutil.copytree(sharded_dir, tmp_path / "sharded"))
    (tmp_path / "evil.safetensors").write_bytes(b"")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../evil.safetensors"
    path.write_text(json.dumps(index))
    msg = one_line_error(load_decoder, folder)
    assert "outside" in msg and "evil.safetensors" in msg


def test_an_engine_or_an_artifact_where_a_model_goes(tmp_path_factory, tiny_model_dir):
    """caprese's own output folders passed as MODEL_DIR say what they are and what to pass instead (an engine
    folder holds config.json and a weights.bin, which read as pickle weights before)."""
    from caprese.calibration.artifact import MANIFEST as ARTIFACT
    from caprese.export.manifest import MANIFEST as ENGINE
    from caprese.model import spec as spec_module
    from export_helpers import get_export

    assert (spec_module._ARTIFACT_FILE, spec_module._ENGINE_FILE) == (ARTIFACT, ENGINE)  # the names model/ repeats
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    for loader in (load_spec, load_decoder):
        with pytest.raises(CapreseError, match="is an engine folder .caprese-export output., not a model folder") as e:
            loader(engine)
        assert "\n" not in str(e.value) and "pickle" not in str(e.value)
    artifact = tmp_path_factory.mktemp("art")
    (artifact / ARTIFACT).write_text("{}")
    with pytest.raises(CapreseError, match="is a calibration artifact, not a model folder.*--init"):
        load_spec(artifact)
