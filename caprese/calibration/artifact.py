"""Calibration artifact: `caprese.json` (recipe, base model + fingerprint, metrics) + `adapters.safetensors`
(+ `quantized.safetensors` when calibrated with --weights).

The adapters only make sense on the exact base weights they were trained against, so loading checks a
fingerprint of the base model (fingerprint.py: config.json, weight file sizes and sampled bytes) and refuses a
mismatch. `recipe` is CalibrationRecipe.to_dict() of the resolved recipe plus how the run went (precision,
device, world size, samples); readers take its keys with .get(): artifacts from before a key existed still load.

Quantized artifacts (recipe["weights"] = QuantRecipe.to_dict(), else None): `Artifact.weights` is the
QuantRecipe, `Artifact.quantized_weights()` reads {HF name: QuantizedTensor} from quantized.safetensors (format:
caprese/calibration/quantized_file.py), verified against the sha256 and recipe recorded in caprese.json
("quantized": {"file", "sha256", "tensors"}). These are the codes the bypass was trained over: export writes them
as they are, never re-quantizing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from caprese.atomic_output import atomic_dir
from caprese.calibration.fingerprint import fingerprint
from caprese.calibration.methods import EfficientFFN, apply_method, efficient_layers
from caprese.errors import CapreseError
from caprese.model.spec import read_json

FORMAT = "caprese-artifact"
VERSION = 1
MANIFEST = "caprese.json"
ADAPTERS = "adapters.safetensors"
QUANTIZED = "quantized.safetensors"


@dataclasses.dataclass
class Artifact:
    path: Path | None
    base_model: str
    fingerprint: str
    method: str
    density: float
    layers: list[int]
    rank: int
    recipe: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    quantized: dict | None = None  # manifest record {"file", "sha256", "tensors"} when the weights are quantized
    qweights: dict | None = None  # {HF name: QuantizedTensor}: set to save them; read with quantized_weights()

    def manifest(self) -> dict:
        m = {"format": FORMAT, "version": VERSION, "base_model": self.base_model,
             "fingerprint": self.fingerprint, "method": self.method, "density": self.density,
             "layers": self.layers, "rank": self.rank, "recipe": self.recipe, "metrics": self.metrics}
        if self.quantized is not None:
            m["quantized"] = self.quantized
        return m

    @property
    def weights(self):
        """The QuantRecipe the student's weights were quantized with (None: unquantized base weights)."""
        d = self.recipe.get("weights")
        if d is None:
            return None
        from caprese.calibration.weight_quant import QuantRecipe

        return QuantRecipe.from_dict(d)

    def quantized_weights(self) -> dict:
        """{HF name: QuantizedTensor} of a quantized artifact ({} for an unquantized one), checked against the
        manifest (sha256, recipe); one-line CapreseError when the file is missing or corrupt."""
        if self.qweights is not None:
            return self.qweights
        recipe = self.weights
        if recipe is None:
            return {}
        from caprese.calibration.quantized_file import read_quantized

        rec = self.quantized or {}
        where = Path(self.path) if self.path is not None else Path(".")
        self.qweights = read_quantized(where / rec.get("file", QUANTIZED), recipe, rec.get("sha256"))
        return self.qweights

    def apply(self, decoder) -> None:
        """Swap in the method on the artifact's layers, load its trained L, R, and (quantized artifact) write the
        dequantized weights into the decoder: the method is installed first, on the unquantized weights, so a
        static selection (magnitude) is the same as in calibration."""
        apply_method(decoder, self.method, self.density, self.layers, self.rank)
        for i, ffn in efficient_layers(decoder).items():
            if ffn.bypass is not None:
                if i not in self.adapters:
                    raise CapreseError(f"{self.path or 'artifact'} has no adapters for layer {i}; recalibrate")
                L, R = self.adapters[i]
                ffn.bypass.L.data.copy_(L)
                ffn.bypass.R.data.copy_(R)
        decoder.requires_grad_(False)
        recipe = self.weights
        if recipe is not None:
            from caprese.calibration.quantized_student import install_quantized

            install_quantized(decoder, recipe, self.quantized_weights())


def collect_adapters(decoder) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: (f.bypass.L.detach().float().cpu(), f.bypass.R.detach().float().cpu())
            for i, f in efficient_layers(decoder).items() if isinstance(f, EfficientFFN) and f.bypass is not None}


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_artifact(art: Artifact, out: str | Path, force: bool = False) -> Path:
    """Write atomically: a temporary sibling folder renamed into place."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out, force, "pass --force to overwrite it or choose another -o") as tmp:
        tensors = {}
        for i, (L, R) in sorted(art.adapters.items()):
            tensors[f"layers.{i}.L"] = L.contiguous()
            tensors[f"layers.{i}.R"] = R.contiguous()
        save_file(tensors, str(tmp / ADAPTERS))
        if art.recipe.get("weights") is not None:
            if not art.qweights:
                raise ValueError("a quantized artifact needs its quantized weights (Artifact.qweights)")
            from caprese.calibration.quantized_file import write_quantized

            sha = write_quantized(tmp / QUANTIZED, art.qweights, art.weights)
            art.quantized = {"file": QUANTIZED, "sha256": sha, "tensors": len(art.qweights)}
        (tmp / MANIFEST).write_text(json.dumps(art.manifest(), indent=2))
    art.path = out
    return out


def load_artifact(src: str | Path, base_model: str | Path | None = None, check: bool = True) -> Artifact:
    """Read an artifact folder; verify its base model (or `base_model`, when given) has the same fingerprint."""
    src = Path(src)
    m = read_json(src / MANIFEST, MANIFEST)
    if m.get("format") != FORMAT:
        raise CapreseError(f"{src / MANIFEST} is not a caprese calibration artifact")
    if m.get("version") != VERSION:
        raise CapreseError(f"artifact format version {m.get('version')} is not supported by this caprese "
                           f"(reads version {VERSION}); recalibrate or upgrade caprese")
    missing = [k for k in ("base_model", "fingerprint", "method", "density", "layers", "rank") if k not in m]
    if missing:
        raise CapreseError(f"{src / MANIFEST} lacks {', '.join(missing)}; the artifact is damaged, recalibrate")
    base = Path(base_model) if base_model else Path(m["base_model"])
    if check:
        if not base.is_dir():
            raise CapreseError(f"the artifact's base model folder {base} is missing; pass the folder it was "
                               "calibrated on with --base-model")
        if fingerprint(base) != m["fingerprint"]:
            raise CapreseError(f"base model {base} does not match the one {src} was calibrated on (fingerprint "
                               "differs); pass the original model folder with --base-model")
    adapters = {}
    if m["rank"]:
        from safetensors.torch import load_file

        try:
            t = load_file(str(src / ADAPTERS))
        except Exception as e:
            raise CapreseError(f"corrupt or missing {src / ADAPTERS} ({str(e).splitlines()[0] if str(e) else e})"
                               ) from None
        for i in m["layers"]:
            if f"layers.{i}.L" in t:
                adapters[i] = (t[f"layers.{i}.L"], t[f"layers.{i}.R"])
    recipe = m.get("recipe", {})
    quantized = m.get("quantized")
    if recipe.get("weights") is not None:
        if not isinstance(quantized, dict) or not isinstance(quantized.get("sha256"), str):
            raise CapreseError(f"{src / MANIFEST} records quantized weights but no quantized file; the artifact is "
                               "damaged, recalibrate")
        qfile = src / quantized.get("file", QUANTIZED)
        if not qfile.is_file():
            raise CapreseError(f"{qfile} is missing; the artifact is damaged, recalibrate")
    return Artifact(src, str(base), m["fingerprint"], m["method"], m["density"], m["layers"], m["rank"],
                    recipe, m.get("metrics", {}), adapters, quantized)


# fingerprint lives in fingerprint.py; export and runtime read it from here, next to the artifact it guards
__all__ = ["Artifact", "FORMAT", "VERSION", "MANIFEST", "ADAPTERS", "QUANTIZED", "collect_adapters", "fingerprint", "is_artifact",
           "load_artifact", "save_artifact"]
