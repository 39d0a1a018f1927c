"""Open what a user points `generate` / `eval` at: a plain HF folder (optionally + a method) or an artifact."""

from __future__ import annotations

from pathlib import Path

from caprese.calibration.artifact import is_artifact, load_artifact
from caprese.calibration.methods import apply_method
from caprese.calibration.recipe import METHODS, default_layers
from caprese.errors import CapreseError
from caprese.model.text_model import TextModel


def open_source(src: str | Path, method: str | None = None, density: float = 0.5, layers: str | None = None,
                precision: str = "fp32", device: str = "cpu", base_model: str | None = None) -> TextModel:
    """A TextModel for SRC. An artifact brings its own method and adapters; a plain folder takes `method`
    (no adapters: the plain GRIFFIN / CATS / magnitude baseline) on `layers` (None: the method's default,
    recipe.METHOD_LAYERS), or runs dense when method is None."""
    if is_artifact(src):
        art = load_artifact(src, base_model)
        if method is not None and method != art.method:
            raise CapreseError(f"{src} was calibrated with --method {art.method}; drop --method or pass {art.method}")
        tm = TextModel.load(art.base_model, precision, device)
        art.apply(tm.decoder)
        tm.label = f"caprese({art.method}, d={art.density}, r={art.rank})"
        return tm
    plain = method is None or method == "dense"
    if not plain:
        if method not in METHODS:
            raise CapreseError(f"unknown method {method!r}; choose from dense, {', '.join(METHODS)}")
        layers = default_layers(method) if layers is None else layers
    tm = TextModel.load(src, precision, device)
    tm.label = "dense"
    if not plain:
        try:
            apply_method(tm.decoder, method, density, layers, rank=0)
        except ValueError as e:
            raise CapreseError(str(e)) from None
        tm.label = f"{method}(d={density}, {layers})"
    return tm
