"""WeightsChoice: what a user asked for with --weights / --block-size / --quant / --quantize-head / --quantize-embed.

Kept apart from QuantRecipe (the resolved, recorded recipe) because "not given" matters: on a calibrated artifact,
`--weights int4` alone means "the int4 artifact, whatever its block size", while an explicit --block-size or
--quant must match too; on a plain folder, the unset fields take the bit width's defaults. Pure data (no torch).

    WeightsChoice("int4").recipe()                          # int4, block 32, RTN, decoder linears
    WeightsChoice("int8", quant="gptq", head=True).recipe()  # int8 per-row, GPTQ, + the LM head
"""

from __future__ import annotations

import dataclasses

from caprese.errors import CapreseError

QUANT_METHODS = ("rtn", "gptq")
GPTQ_EVAL_SAMPLES = 64  # eval / generate --quant gptq on a plain folder: cached synthetic samples it calibrates on


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
    weights: str  # "int4" | "int8"
    block_size: int | str | None = None  # 32 | 64 | 128 | "row"; None: the bit width's default (int4 32, int8 row)
    quant: str | None = None  # "rtn" | "gptq"; None: rtn (or, on an artifact, its own)
    head: bool = False  # also the LM head (with tied embeddings: the embedding too)
    embed: bool = False  # also the embedding
    scale_dtype: str = "fp16"

    def __post_init__(self):
        if self.quant is not None and self.quant not in QUANT_METHODS:
            raise CapreseError(f"--quant {self.quant!r} is not a quantization method: use rtn or gptq")
        self.recipe()  # one-line errors for --weights int3, --block-size 48, ... now

    def recipe(self):
        """The QuantRecipe this choice stands for on a plain model (defaults filled in)."""
        from caprese.calibration.weight_quant import DECODER_ROLES, QuantRecipe
        from caprese.model.quantization import WeightFormat

        fmt = WeightFormat.parse(self.weights, self.block_size, self.scale_dtype)
        roles = DECODER_ROLES + (("lm_head",) if self.head else ()) + (("embed",) if self.embed else ())
        return QuantRecipe(fmt, self.quant or "rtn", roles)

    def check_artifact(self, have, src) -> None:
        """One-line CapreseError unless an artifact calibrated with QuantRecipe `have` (None: unquantized) is what
        this choice asks for: the same bit width, and the block size / method / roles where they were given."""
        want = self.recipe()
        if have is None:
            raise CapreseError(f"{src} was calibrated on unquantized weights; drop --weights, or calibrate with "
                               f"--weights {want.fmt.name}")
        if have.fmt.bits != want.fmt.bits:
            raise CapreseError(f"{src} was calibrated at {have.fmt.name}, not {want.fmt.name}: its bypass is trained "
                               f"for those codes; drop --weights or pass --weights {have.fmt.name}")
        if self.block_size is not None and have.fmt.block_size != want.fmt.block_size:
            raise CapreseError(f"{src} was calibrated with block size {have.fmt.block_name}, not "
                               f"{want.fmt.block_name}; drop --block-size")
        if self.quant is not None and have.method != self.quant:
            raise CapreseError(f"{src} was quantized with {have.method}, not {self.quant}; drop --quant")
        extra = [r for r in want.roles if r not in have.roles]
        if extra:
            raise CapreseError(f"{src} was calibrated without quantizing {', '.join(extra)}; drop "
                               "--quantize-head / --quantize-embed")


def weights_choice(weights: str | None, block_size=None, quant: str | None = None, head: bool = False,
                   embed: bool = False, scale_dtype: str | None = None) -> WeightsChoice | None:
    """From the CLI flags (None when --weights is absent); the refinements without --weights are an error."""
    if weights is None:
        given = [n for n, v in (("--block-size", block_size), ("--quant", quant), ("--quantize-head", head),
                                ("--quantize-embed", embed), ("--scale-dtype", scale_dtype)) if v]
        if given:
            raise CapreseError(f"{', '.join(given)}: only meaningful with --weights; add --weights int4 or int8")
        return None
    return WeightsChoice(weights, block_size, quant, head, embed, scale_dtype or "fp16")
