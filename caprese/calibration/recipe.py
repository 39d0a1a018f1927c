"""What defines a calibration artifact (CalibrationRecipe) and how one run computes it (CalibrationOptions).

`caprese calibrate` and `caprese.calibration.calibrate.calibrate()` take the same two objects: the command turns
its flags into them in one function (caprese/cli/calibrate_command.py: `recipe_from_flags`, `options_from_flags`),
and its flag defaults are these fields' defaults. The artifact's caprese.json records the recipe resolved against
the model (`resolve`: every None filled in, the layer indices listed). Pure data: importing it loads no torch.

Per-method layer defaults (`METHOD_LAYERS`, also what `caprese eval` / `generate --method` use):
  griffin    first-half  the paper's Caprese(GRIFFIN): pruning every layer costs too much math accuracy.
  cats       all         the paper's Caprese(CATS): all layers at 50%; its approximation is mild enough.
  magnitude  first-half  not a Caprese configuration in the paper but its static baseline for GRIFFIN: the same
                         compact top-k FFN with a fixed selection, strictly lossier than GRIFFIN's per-prompt one,
                         so it gets GRIFFIN's layers and compares with it like for like.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from caprese.errors import CapreseError

METHOD_LAYERS = {"griffin": "first-half", "cats": "all", "magnitude": "first-half"}
METHODS = tuple(METHOD_LAYERS)
# "none": no efficient method, the (quantized) dense FFN + the bypass: the paper's quantized-FF̂ case. Calibration
# only, and only with quantized weights (`weights`); all layers by default, since quantization touches every one.
NO_METHOD = "none"
CALIBRATION_METHODS = METHODS + (NO_METHOD,)
STAGES = ("layerwise", "e2e", "both")
LAYERWISE_MODES = ("parallel", "sequential")
# mse: the paper's final-hidden-state MSE; kl: KL(teacher || student) of the next-token distributions (the LM
# head over both final hidden states), which weighs the directions the head reads (docs/quantization.md).
E2E_LOSSES = ("mse", "kl")
# whose replies the E2E loss is taken on (E2EConfig.responses): the samples' own, the student's after the
# layer-wise stage, or the student's re-answered before every epoch (on-policy)
E2E_RESPONSES = ("dense", "student", "on-policy")
CAPTURE_STORES = ("fp32", "bf16")
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_METHOD, DEFAULT_DENSITY, DEFAULT_RANK = "griffin", 0.5, 64


def default_layers(method: str) -> str:
    """The layer set `method` approximates when none is given (see the module docstring for why)."""
    if method == NO_METHOD:
        return "all"
    if method not in METHOD_LAYERS:
        raise CapreseError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHOD_LAYERS[method]


def layers_default_help() -> str:
    """`griffin: first-half, cats: all, magnitude: first-half` for --help texts."""
    return ", ".join(f"{m}: {spec}" for m, spec in METHOD_LAYERS.items())


def parse_layers(layers: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """'all', 'first-half' (the paper's GRIFFIN default), 'second-half', or a list like '0,2,5-9' (ValueError)."""
    if isinstance(layers, (list, tuple)):
        out = sorted(set(int(i) for i in layers))
    elif layers == "all":
        out = list(range(num_layers))
    elif layers == "first-half":
        out = list(range(num_layers // 2))
    elif layers == "second-half":
        out = list(range(num_layers // 2, num_layers))
    else:
        out = set()
        for part in str(layers).split(","):
            if not part.strip():
                continue
            try:
                lo, hi = (int(b) for b in (part.split("-") if "-" in part else (part, part)))  # exactly two ints
            except ValueError:
                raise ValueError(f"layers must be all, first-half, second-half or a list like 0,2,5-9; got "
                                 f"{layers!r}") from None
            if hi < lo:
                raise ValueError(f"layer range {part.strip()!r} runs backwards; write it low-high (e.g. {hi}-{lo})")
            out.update(range(lo, hi + 1))
        out = sorted(out)
    if not out:
        raise ValueError(f"layers {layers!r} name no layer; give all, first-half, second-half or a list like 0,2,5-9")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are outside 0..{num_layers - 1}")
    return out


def _positive(stage: str, epochs, batch_size, lr) -> None:
    if not all(isinstance(v, int) and v >= 1 for v in (epochs, batch_size)) or not lr > 0:
        raise CapreseError(f"{stage} epochs and batch size must be >= 1 and lr > 0; got epochs {epochs}, "
                           f"batch size {batch_size}, lr {lr}")


def _warmup(v) -> None:
    if not (isinstance(v, (int, float)) and 0 <= v < 1):
        raise CapreseError(f"warm-up fraction must be in [0, 1); got {v}")


@dataclasses.dataclass(frozen=True)
class LayerwiseConfig:
    """Layer-wise stage (paper: Adam, lr 1e-3, batch 128, 20 epochs, linear schedule, 2% warm-up)."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128  # rows (response tokens) per Adam step
    warmup: float = 0.02  # fraction of all steps spent warming up
    seed: int = 0  # L's init (seed + layer) and the per-epoch shuffles
    store: str = "fp32"  # on-disk dtype of the captured x and r: fp32 | bf16
    # "parallel": the paper's (original-model inputs, FF(x) - FF^(x), layers independent);
    # "sequential": the student's inputs against the dense layer output, layer after layer (sequential.py)
    mode: str = "parallel"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _positive("layer-wise", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        _warmup(self.warmup)
        if self.store not in CAPTURE_STORES:
            raise CapreseError(f"capture store must be fp32 or bf16; got {self.store!r}")
        if self.mode not in LAYERWISE_MODES:
            raise CapreseError(f"layer-wise mode must be one of {', '.join(LAYERWISE_MODES)}; got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """End-to-end stage (paper: Adam, lr 4e-6 .. 2e-4, smaller for larger models, batch 16, 3 epochs, 2% warm-up,
    final-hidden MSE on the calibration samples' responses; `loss="kl"` and `responses="student"`, the student's
    own greedy replies to the same prompts (on-policy distillation), are caprese's options)."""

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16  # sequences per Adam step (gradients accumulated in fp32)
    warmup: float = 0.02
    seed: int = 0  # the per-epoch shuffles
    loss: str = "mse"  # "mse" | "kl"
    responses: str = "dense"  # "dense": the samples as given | "student": re-answered by the student first |
    # "on-policy": re-answered by the student as it stands before every epoch

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _positive("end-to-end", epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        _warmup(self.warmup)
        if self.loss not in E2E_LOSSES:
            raise CapreseError(f"end-to-end loss must be one of {', '.join(E2E_LOSSES)}; got {self.loss!r}")
        if self.responses not in E2E_RESPONSES:
            raise CapreseError(f"end-to-end responses must be one of {', '.join(E2E_RESPONSES)}; "
                               f"got {self.responses!r}")


def check_density(d) -> float:
    """The fraction of FFN neurons a method keeps: a number in (0, 1] (a string "0.5" is refused, not compared)."""
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise CapreseError(f"density must be in (0, 1] (a number); got {d!r}")
    return d


@dataclasses.dataclass(frozen=True)
class CalibrationRecipe:
    """Everything the adapters depend on besides the base model and the samples.

    method / density / layers / rank: None means the default (griffin, 0.5, the method's layers from
    METHOD_LAYERS, 64; the paper uses r = 256 for 8B/9B models) or, with `init`, the init artifact's; `resolve`
    fills them in. stage: "layerwise", "e2e" (from `init`, a layer-wise artifact, or from the finished layers
    of a kept work dir) or "both".

    weights: None (the base model's weights as they are) or a caprese.calibration.weight_quant.QuantRecipe
    (int4 | int8, block size, RTN | GPTQ, which roles): the STUDENT then computes with the quantized weights of
    every quantized linear (attention too: export quantizes all of them) while the teacher stays unquantized;
    method "none" (quantization alone + the bypass) needs it. Typed loosely so this module imports no torch.
    """

    method: str | None = None
    density: float | None = None
    layers: str | tuple[int, ...] | None = None
    rank: int | None = None
    stage: str = "both"
    init: str | Path | None = None
    layerwise: LayerwiseConfig = dataclasses.field(default_factory=LayerwiseConfig)
    e2e: E2EConfig = dataclasses.field(default_factory=E2EConfig)
    weights: Any = None  # QuantRecipe | None (see the class docstring)

    def __post_init__(self):
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.stage not in STAGES:
            raise CapreseError(f"unknown stage {self.stage!r}; choose from {', '.join(STAGES)}")
        if self.method is not None and self.method not in CALIBRATION_METHODS:
            raise CapreseError(f"unknown method {self.method!r}; choose from {', '.join(CALIBRATION_METHODS)}")
        if self.density is not None:
            check_density(self.density)
        r = self.rank
        if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            raise CapreseError(f"rank must be at least 1 (an integer) and below the model's hidden size; got {r!r}")
        if self.init is not None and self.stage != "e2e":
            raise CapreseError("--init (a layer-wise artifact to start from) only goes with --stage e2e")
        if not isinstance(self.layerwise, LayerwiseConfig) or not isinstance(self.e2e, E2EConfig):
            raise TypeError("layerwise / e2e must be a LayerwiseConfig / an E2EConfig")
        if self.weights is not None:
            from caprese.calibration.weight_quant import QuantRecipe

            if not isinstance(self.weights, QuantRecipe):
                raise TypeError("weights must be a caprese.calibration.weight_quant.QuantRecipe or None")
        if self.method == NO_METHOD and self.weights is None and self.init is None:
            raise CapreseError("--method none calibrates a bypass for quantized weights alone: give --weights "
                               "int4 or int8 (or an efficient method)")

    @property
    def layers_spec(self) -> str | None:
        """The layers as the CLI writes them ('all', '0,2,5'); None while unresolved."""
        return self.layers if self.layers is None or isinstance(self.layers, str) else ",".join(map(str, self.layers))

    def resolve(self, num_layers: int, hidden_size: int, init: Any = None) -> CalibrationPlan:
        """Fill in every None (from the defaults, or from `init`, the loaded init Artifact) and check the recipe
        against a model with `num_layers` layers and hidden size `hidden_size`; one-line CapreseErrors."""
        method, density, layers, rank, weights = self.method, self.density, self.layers, self.rank, self.weights
        if init is not None:
            if not init.rank or not init.adapters:
                raise CapreseError(f"{self.init} has no bypass adapters (rank 0); calibrate it with --stage "
                                   "layerwise first")
            for name, given, have in (("method", method, init.method), ("density", density, init.density),
                                      ("rank", rank, init.rank)):
                if given is not None and given != have:
                    raise CapreseError(f"--{name} {given} differs from the init artifact's {have}; drop --{name}")
            if layers is not None and _indices(layers, num_layers) != list(init.layers):
                raise CapreseError(f"--layers {self.layers_spec} differs from the init artifact's layers "
                                   f"{init.layers}; drop --layers")
            have_w = init.weights
            if weights is not None and (have_w is None or weights.to_dict() != have_w.to_dict()):
                raise CapreseError(f"--weights {describe_weights(weights)} differs from the init artifact's "
                                   f"{describe_weights(have_w)}; drop --weights")
            method, density, rank, weights = init.method, init.density, init.rank, have_w
            spec = init.recipe.get("layers")
            layers = spec if isinstance(spec, str) else tuple(init.layers)
        method = DEFAULT_METHOD if method is None else method
        if method == NO_METHOD and weights is None:
            raise CapreseError("--method none calibrates a bypass for quantized weights alone: give --weights "
                               "int4 or int8 (or an efficient method)")
        density = (1.0 if method == NO_METHOD else DEFAULT_DENSITY) if density is None else density
        rank = DEFAULT_RANK if rank is None else rank
        layers_default = layers is None
        layers = default_layers(method) if layers is None else layers
        if rank >= hidden_size:
            raise CapreseError(f"rank must be at least 1 and below the hidden size ({hidden_size}); got {rank}")
        indices = _indices(layers, num_layers)
        if init is not None and any(i not in init.adapters for i in indices):
            raise CapreseError(f"{self.init} lacks adapters for some of its layers; recalibrate it")
        resolved = dataclasses.replace(self, method=method, density=float(density), layers=layers, rank=rank,
                                       weights=weights)
        return CalibrationPlan(resolved, tuple(indices), init, layers_default)

    def to_dict(self) -> dict:
        """JSON-ready, for the artifact (layers as the CLI spec string, init as an absolute path)."""
        d = dataclasses.asdict(self)
        d["weights"] = None if self.weights is None else self.weights.to_dict()
        d["layers"] = self.layers_spec
        d["init"] = str(Path(self.init).resolve()) if self.init is not None else None
        return d


def describe_weights(weights) -> str:
    """'int4 (block 32, gptq)' for a QuantRecipe, 'unquantized weights' for None: for messages and labels."""
    if weights is None:
        return "unquantized weights"
    return f"{weights.fmt.name} (block {weights.fmt.block_name}, {weights.method})"


def _indices(layers, num_layers: int) -> list[int]:
    try:
        return parse_layers(layers, num_layers)
    except ValueError as e:
        raise CapreseError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class CalibrationPlan:
    """A recipe resolved against one model: every field concrete, the layer indices, the init artifact."""

    recipe: CalibrationRecipe
    layers: tuple[int, ...]
    init: Any = None  # caprese.calibration.artifact.Artifact for --stage e2e --init
    layers_default: bool = False  # the layers are the method's default (METHOD_LAYERS), not given

    method = property(lambda self: self.recipe.method)
    density = property(lambda self: self.recipe.density)
    rank = property(lambda self: self.recipe.rank)
    stage = property(lambda self: self.recipe.stage)


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How one run computes a recipe: where, at what precision, with what memory, what it prints and keeps.

    precision is the dtype the base model runs in (the adapters train in fp32 either way; the paper trains in
    bf16); the artifact records it next to the recipe. Under torchrun every process calls calibrate() with the
    same arguments: the processes are found from the environment, not from here.
    """

    precision: str = "fp32"
    device: str = "cpu"  # cpu, cuda, cuda:1 ... (under torchrun a bare cuda means cuda:LOCAL_RANK)
    work_dir: str | Path | None = None  # captured activations, finished layers, e2e checkpoint; default OUT.work
    keep_work: bool = False  # keep the work dir after a successful save (it is what a rerun resumes from)
    force: bool = False  # overwrite an existing OUT
    progress: bool = True  # bars and log lines on stderr
    max_ram_bytes: int = 1 << 30  # layer-wise: a layer's captured x + r below this trains from memory, else disk
    teacher_cache_bytes: int = 1 << 30  # e2e, per process: teacher states kept beyond this are recomputed

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CapreseError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        for name in ("max_ram_bytes", "teacher_cache_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise CapreseError(f"{name} must be a byte count >= 0; got {v!r}")


__all__ = ["CalibrationRecipe", "CalibrationOptions", "CalibrationPlan", "LayerwiseConfig", "E2EConfig",
           "E2E_LOSSES", "E2E_RESPONSES", "METHOD_LAYERS", "METHODS", "CALIBRATION_METHODS", "NO_METHOD", "STAGES",
           "check_density", "default_layers", "describe_weights", "layers_default_help", "parse_layers"]
