"""ModelSpec: the architecture facts the decoder, calibration and exporter need, read from a local HF folder.

transformers' own config classes parse config.json so every default (rope, sliding windows, soft-caps) is
exactly what the reference implementation uses; the spec then pins those facts in one plain, serialisable record.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from caprese.errors import CapreseError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "linear"|"llama3", ...} or None
    max_position_embeddings: int
    activation: str  # "silu" | "gelu_tanh" | "gelu"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_windows: tuple  # per layer: window size (int) or None for full attention
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before RoPE
    gemma_norms: bool = False  # gemma2: (1 + w) RMSNorm, post-attention and pre/post-FFN norms, sqrt(D) embed scale
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    dtype: str = "float32"  # the checkpoint's own dtype

    @property
    def gqa_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sliding_windows"] = list(self.sliding_windows)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["sliding_windows"] = tuple(d["sliding_windows"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def read_json(path: Path, what: str, fix: str = "re-download or re-save the model") -> dict:
    """Read a JSON object, turning every way it can be wrong into a one-line CapreseError; `fix` says what to do
    about a file that is not valid JSON (an engine's manifest: export again)."""
    if not path.is_file():
        raise CapreseError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapreseError(f"{what} is not valid JSON ({path}: {e}); {fix}") from None
    if not isinstance(data, dict):
        raise CapreseError(f"{what} must hold a JSON object: {path}")
    return data


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# the files that mark caprese's own output folders (calibration.artifact.MANIFEST, export.manifest.MANIFEST; named
# here, not imported, since this layer sits below both): a user who passes one where a model goes hears what it is
_ARTIFACT_FILE, _ENGINE_FILE = "caprese.json", "manifest.json"


def _not_another_kind(model_dir: Path) -> None:
    if (model_dir / _ENGINE_FILE).is_file() and (model_dir / "decode.onnx").is_file():
        raise CapreseError(f"{model_dir} is an engine folder (caprese-export output), not a model folder; pass the "
                           "model folder or calibration artifact it was exported from (its manifest.json's "
                           "source.path), or run the engine with `caprese run`")
    if (model_dir / _ARTIFACT_FILE).is_file() and not (model_dir / "config.json").is_file():
        raise CapreseError(f"{model_dir} is a calibration artifact, not a model folder; pass its base model folder "
                           "(to continue training it: caprese calibrate BASE_MODEL --stage e2e --init "
                           f"{model_dir})")


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Build the spec from MODEL_DIR/config.json (+ generation_config.json for EOS ids)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CapreseError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise CapreseError(f"expected a model folder (with config.json and *.safetensors), got a file: {model_dir}")
    _not_another_kind(model_dir)
    raw = read_json(model_dir / "config.json", "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CapreseError(
            f"unsupported model_type {model_type!r} in {model_dir / 'config.json'}; "
            f"caprese supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    from transformers import CONFIG_MAPPING  # lazy: transformers is heavy to import

    try:
        cfg = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    except Exception as e:  # transformers' validators raise many types, some with the reason on line 2
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CapreseError(f"config.json is invalid for {model_type}: {reason}") from None
    return _spec_from_config(cfg, model_dir)


def _spec_from_config(cfg, model_dir: Path) -> ModelSpec:
    mt = cfg.model_type
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % kv_heads:
        raise CapreseError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")

    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CapreseError(f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise CapreseError("partial_rotary_factor != 1 is not supported")
    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta",)}
        scaling["rope_type"] = rope_type
        if rope_type == "llama3":
            scaling.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)

    act_name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise CapreseError(f"activation {act_name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")

    n = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if mt == "mistral":
        windows = [window] * n
    elif layer_types and window:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    else:
        windows = [None] * n

    attention_bias = bool(getattr(cfg, "attention_bias", False))
    gen = {}
    if (model_dir / "generation_config.json").is_file():
        gen = read_json(model_dir / "generation_config.json", "generation_config.json")
    eos = _as_list(gen.get("eos_token_id")) or _as_list(cfg.eos_token_id)
    dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    gemma = mt == "gemma2"
    return ModelSpec(
        model_type=mt,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.max_position_embeddings),
        activation=ACTIVATIONS[act_name],
        qkv_bias=True if mt == "qwen2" else attention_bias,
        o_bias=False if mt == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        # as transformers does: the config decides (Gemma2Config defaults to tied when the key is absent)
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        sliding_windows=tuple(windows),
        qk_norm=mt == "qwen3",
        gemma_norms=gemma,
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else None,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) if gemma else None,
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=tuple(int(e) for e in eos),
        dtype=dtype,
    )
