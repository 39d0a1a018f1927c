"""Open what a user points `generate` / `eval` at: a plain HF folder (optionally + a method) or an artifact."""

from __future__ import annotations

from pathlib import Path

from caprese.calibration.artifact import is_artifact, load_artifact
from caprese.calibration.methods import apply_method
from caprese.calibration.quantized_student import check_model_shapes, prepare_student, quant_label
from caprese.calibration.recipe import DEFAULT_DENSITY, METHODS, check_density, default_layers
from caprese.calibration.weights_choice import GPTQ_EVAL_SAMPLES, WeightsChoice
from caprese.errors import CapreseError
from caprese.model.text_model import TextModel


def open_source(src: str | Path, method: str | None = None, density: float | None = None, layers: str | None = None,
                precision: str = "fp32", device: str = "cpu", base_model: str | None = None,
                weights: WeightsChoice | None = None, progress: bool = False) -> TextModel:
    """A TextModel for SRC. An artifact brings its own method, adapters and quantized weights; a plain folder
    takes `method` (no adapters: the plain GRIFFIN / CATS / magnitude baseline) at `density` (None: 0.5) on
    `layers` (None: the method's default, recipe.METHOD_LAYERS), or runs dense when method is None (then density
    and layers must be None too), and `weights` (the quantized baseline: its decoder weights replaced by their
    dequantized values; GPTQ calibrates on cached synthetic samples).
    On an artifact, `weights` must be what it was calibrated with (WeightsChoice.check_artifact)."""
    if is_artifact(src):
        art = load_artifact(src, base_model)
        if method is not None and method != art.method:
            raise CapreseError(f"{src} was calibrated with --method {art.method}; drop --method or pass {art.method}")
        if density is not None or layers is not None:
            raise CapreseError(f"{src} is a calibration artifact: its density ({art.density}) and layers were fixed "
                               "at calibration; drop --density / --layers")
        if weights is not None:
            weights.check_artifact(art.weights, src)
        tm = TextModel.load(art.base_model, precision, device)
        art.apply(tm.decoder)
        q = quant_label(art.weights)
        tm.label = f"caprese({art.method}, d={art.density}, r={art.rank}{', ' + q if q else ''})"
        return tm
    plain = method is None or method == "dense"
    if plain and (density is not None or layers is not None):
        raise CapreseError("--density and --layers choose what --method prunes; add --method "
                           f"{' / '.join(METHODS)} or drop them")
    if not plain:
        if method not in METHODS:
            raise CapreseError(f"unknown method {method!r}; choose from dense, {', '.join(METHODS)}")
        density = DEFAULT_DENSITY if density is None else check_density(density)
        layers = default_layers(method) if layers is None else layers
    tm = TextModel.load(src, precision, device)
    tm.label = "dense"
    student = None
    if weights is not None:  # quantize the dense model (GPTQ's statistics) before a method is installed
        recipe = weights.recipe()
        check_model_shapes(tm.decoder.spec, recipe)
        samples = None
        if recipe.method == "gptq":
            from caprese.calibration.data import synthetic_samples
            from caprese.model.default_model import cache_root

            samples = synthetic_samples(tm, GPTQ_EVAL_SAMPLES, cache_root() / "synthetic", progress=progress)
        student = prepare_student(tm.decoder, recipe, samples, progress)
    if not plain:
        try:
            apply_method(tm.decoder, method, density, layers, rank=0)  # static selections: unquantized weights
        except ValueError as e:
            raise CapreseError(str(e)) from None
        tm.label = f"{method}(d={density}, {layers})"
    if student is not None:
        student.fix_student()
        tm.label = f"{tm.label} {quant_label(student.recipe)}"
    return tm
