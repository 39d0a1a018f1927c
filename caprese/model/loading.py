"""Load a local HF folder's safetensors weights into the reference decoder, checking every tensor.

Only safetensors are read (no pickles, no remote code). Each tensor is checked for name and shape before
it is placed, the module is built on the meta device so a large model is never held twice in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from caprese.errors import CapreseError
from caprese.model.decoder import Decoder
from caprese.model.spec import ModelSpec, load_spec, read_json

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Tensors some checkpoints carry that the decoder derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(name: str | torch.dtype | None, spec: ModelSpec | None = None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise CapreseError(f"unknown precision {name!r}; use fp32, fp16 or bf16")
    return DTYPES[name]


def check_device(device: str) -> str:
    """A torch device string, checked before anything loads: an unknown name, or CUDA where torch sees no GPU."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise CapreseError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CapreseError(f"device {device!r} was asked for but torch sees no CUDA GPU; use cpu")
    return device


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: one model.safetensors, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "model.safetensors.index.json")
        names = sorted(set((data.get("weight_map") or {}).values()))
        if not names:
            raise CapreseError(f"{index} has an empty weight_map; re-save the model")
        files = []
        for name in names:
            f = (model_dir / name).resolve()
            if model_dir.resolve() not in f.parents:
                raise CapreseError(f"{index} names a shard outside the model folder: {name}")
            if not f.is_file():
                raise CapreseError(f"weight shard {name} listed in {index.name} is missing from {model_dir}")
            files.append(f)
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
        raise CapreseError(
            f"{model_dir} has only PyTorch pickle weights (.bin/.pt), which caprese does not load because unpickling "
            "can run arbitrary code; convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")
    if any(model_dir.glob("*.gguf")):
        raise CapreseError(f"{model_dir} holds a GGUF file; convert it to a safetensors folder first "
                           "(`caprese fetch-default` shows how for the built-in model)")
    raise CapreseError(f"no *.safetensors weights in {model_dir}")


def _read_tensors(files: list[Path]):
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield f, name, st.get_tensor(name)
        except CapreseError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...: a truncated or garbled file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CapreseError(f"corrupt weights file {f.name} ({msg}); re-download or re-save the model") from None


def load_decoder(model_dir: str | Path, dtype: str | torch.dtype | None = "fp32", device: str = "cpu",
                 spec: ModelSpec | None = None) -> Decoder:
    """Build the decoder for MODEL_DIR and fill it from its safetensors, cast to `dtype` on `device`."""
    model_dir = Path(model_dir)
    check_device(device)
    spec = spec or load_spec(model_dir)
    dt = resolve_dtype(dtype)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = Decoder(spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if spec.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    for f, name, tensor in _read_tensors(files):
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and spec.tie_word_embeddings):
            continue
        if name not in expected:
            raise CapreseError(f"unexpected tensor {name!r} in {f.name}: the weights do not match a "
                               f"{spec.model_type} model with this config.json")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CapreseError(f"tensor {name!r} in {f.name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(expected[name])}")
        if not tensor.is_floating_point():
            raise CapreseError(f"tensor {name!r} in {f.name} has dtype {tensor.dtype}; quantized checkpoints "
                               "are not supported, use the float weights")
        loaded[name] = tensor.to(device=device, dtype=dt)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CapreseError(f"weights are missing {', '.join(missing[:3])}{more} in {model_dir}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model

