"""Quantize a caprese Decoder's weights in place (RTN or GPTQ) and return what export writes.

    recipe = QuantRecipe(WeightFormat(bits=4, block_size=32), method="gptq")
    qweights = quantize_decoder(decoder, recipe, samples)       # {"model.layers.0.self_attn.q_proj.weight": qt, ...}

Every quantized nn.Linear / nn.Embedding weight is overwritten with its dequantized values
(`linear_weight(qt, axis)`), so a PyTorch forward computes exactly what the int4 / int8 graphs and the native kernel
compute from the returned QuantizedTensors (the same codes and scales; see caprese/model/quantization.py).

Which weights, by default: every decoder linear weight (q, k, v, o, gate, up, down), the bulk of a small model's
decode traffic besides the LM head and the ones the paper's quantized-FF̂ and GenAI's int4 builder quantize. The LM
head ("lm_head") and the embedding ("embed") are options: the head is ~1/3 of SmolLM2-135M's weights and its
logits decide every greedy token, so quantizing it is a separate accuracy decision (GenAI's int4 does); the
embedding is a row gather (no GEMV to speed up), quantizing it only saves memory. With tied embeddings they are one
matrix: asking for either quantizes both, and the result is returned under both names.

Orientation per role (`QuantRecipe.block_axes`): "in" stores [out, in] blocked along the input features; "out"
stores the transpose [in, out] blocked along the outputs. Default: "out" for the down projection (a GRIFFIN-kept
or CATS-skipped neuron is a whole row of whole blocks), "in" for everything else. The embedding is stored
[vocab, hidden] ("in": a looked-up row is whole blocks).

GPTQ runs in the reference implementation's "true sequential" order: layer after layer, and inside a layer
q/k/v, then o, then gate/up, then down; each group's input Hessians come from the calibration samples passed
through everything before it ALREADY QUANTIZED, so each matrix corrects for the error upstream of it (q/k/v share
one Hessian, gate/up another). A group's pass stops after its last module. The embedding is always RTN (a lookup
has no input Hessian); the LM head's Hessian is the final normed hidden state of the quantized model.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from caprese.calibration.gptq import GPTQConfig, gptq_quantize
from caprese.calibration.hessians import HessianCollector
from caprese.errors import CapreseError
from caprese.model.quantization import (BLOCK_AXES, QuantizedTensor, WeightFormat, linear_weight,
                                        quantize_linear_rtn, quantize_rtn, stored_shape)

DECODER_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ALL_ROLES = DECODER_ROLES + ("lm_head", "embed")
METHODS = ("rtn", "gptq")
DEFAULT_BLOCK_AXES = {"down": "out"}  # every other role: "in"
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # GPTQ's "true sequential" order
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
EMBED_NAME, HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How a model's weights are quantized: what the artifact records and export / runtime read back."""

    fmt: WeightFormat = WeightFormat()
    method: str = "rtn"  # "rtn" | "gptq"
    roles: tuple = DECODER_ROLES
    gptq: GPTQConfig = GPTQConfig()
    block_axes: tuple = tuple(sorted(DEFAULT_BLOCK_AXES.items()))  # (role, "in" | "out") pairs; others: "in"

    def __post_init__(self):
        object.__setattr__(self, "roles", tuple(self.roles))
        axes = self.block_axes.items() if isinstance(self.block_axes, dict) else self.block_axes
        object.__setattr__(self, "block_axes", tuple(sorted((str(r), str(a)) for r, a in axes)))
        if self.method not in METHODS:
            raise CapreseError(f"quantization method {self.method!r} is not supported: use rtn or gptq")
        bad = [r for r in self.roles if r not in ALL_ROLES]
        if bad or not self.roles:
            raise CapreseError(f"unknown weight role(s) {', '.join(map(repr, bad)) or '(none given)'}: "
                               f"choose from {', '.join(ALL_ROLES)}")
        for role, axis in self.block_axes:
            if role not in ALL_ROLES or axis not in BLOCK_AXES:
                raise CapreseError(f"bad block axis {role}={axis!r}: roles {', '.join(ALL_ROLES)}, axes in | out")
            if role == "embed" and axis != "in":
                raise CapreseError("the embedding is stored [vocab, hidden] with blocks along hidden (axis 'in')")
        self.gptq.validate()

    def block_axis(self, role: str) -> str:
        return dict(self.block_axes).get(role, "in")

    def to_dict(self) -> dict:
        return {"format": self.fmt.to_dict(), "method": self.method, "roles": list(self.roles),
                "gptq": self.gptq.to_dict(), "block_axes": dict(self.block_axes)}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        try:
            return cls(WeightFormat.from_dict(d["format"]), d["method"], tuple(d["roles"]),
                       GPTQConfig.from_dict(d.get("gptq", {})), tuple(sorted(d.get("block_axes", {}).items())))
        except (KeyError, TypeError, AttributeError) as e:
            raise CapreseError(f"corrupt quantization recipe ({e!r}); re-quantize the model") from None


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    """One quantizable weight of a decoder: its HF parameter name, role, module and layer (None: head/embed)."""

    name: str
    role: str
    module: nn.Module
    layer: int | None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def weight_slots(decoder, roles=ALL_ROLES) -> list[WeightSlot]:
    """The decoder's quantizable weights in `roles`, in layer order; names are the HF checkpoint's."""
    out = []
    for i, layer in enumerate(decoder.layers):
        for role, attr in _ATTN.items():
            if role in roles:
                out.append(WeightSlot(f"model.layers.{i}.self_attn.{attr}.weight", role,
                                      getattr(layer.self_attn, attr), i))
        for role, attr in _MLP.items():
            if role in roles:
                out.append(WeightSlot(f"model.layers.{i}.mlp.{attr}.weight", role, getattr(layer.mlp, attr), i))
    if "lm_head" in roles:
        out.append(WeightSlot(HEAD_NAME, "lm_head", decoder.lm_head, None))
    if "embed" in roles:
        out.append(WeightSlot(EMBED_NAME, "embed", decoder.model.embed_tokens, None))
    return out


def _stored(slot: WeightSlot, recipe: QuantRecipe) -> tuple[int, int]:
    w = slot.weight
    if slot.role == "embed":
        return tuple(w.shape)
    return stored_shape(w.shape[0], w.shape[1], recipe.block_axis(slot.role))


def check_decoder(decoder, recipe: QuantRecipe) -> None:
    """One-line CapreseError, before anything is modified, if a weight of the recipe's roles cannot be blocked."""
    for slot in weight_slots(decoder, recipe.roles):
        axis = "hidden size" if slot.role == "embed" else f"{recipe.block_axis(slot.role)}put features"
        recipe.fmt.check_shape(_stored(slot, recipe), slot.name, axis)


def _samples_ids(samples) -> list[list[int]]:
    ids = [list(s.ids) if hasattr(s, "ids") else [int(t) for t in s] for s in samples]
    ids = [s for s in ids if s]
    if not ids:
        raise CapreseError("GPTQ needs calibration samples (token sequences); none were given")
    return ids


def _ensure_cache(decoder, length: int) -> None:
    cache = decoder.layers[0].self_attn.cache
    if (decoder.max_len < length or getattr(decoder, "batch", None) != 1 or cache is None
            or cache.k.is_inference()):
        with torch.inference_mode(False):
            decoder.setup_caches(1, length)


class _StopForward(Exception):
    """Raised after the last module of a GPTQ group ran: the rest of the block is not needed for its Hessians."""


def _stop_forward(module, args, output):
    raise _StopForward


def _assign(slot: WeightSlot, qt: QuantizedTensor, recipe: QuantRecipe) -> None:
    w = slot.weight
    axis = "in" if slot.role == "embed" else recipe.block_axis(slot.role)
    with torch.no_grad():
        w.copy_(linear_weight(qt, axis, w.dtype))


def _quantize_slot(slot: WeightSlot, recipe: QuantRecipe, hessian: torch.Tensor | None) -> QuantizedTensor:
    w = slot.weight.detach()
    if slot.role == "embed":
        return quantize_rtn(w, recipe.fmt, slot.name)
    if hessian is None:
        return quantize_linear_rtn(w, recipe.fmt, recipe.block_axis(slot.role), slot.name)
    return gptq_quantize(w, hessian, recipe.fmt, recipe.block_axis(slot.role), recipe.gptq, slot.name)


@torch.no_grad()
def quantize_decoder(decoder, recipe: QuantRecipe, samples=None, progress: bool = False
                     ) -> dict[str, QuantizedTensor]:
    """Quantize the recipe's weights of `decoder` in place; return {HF parameter name: QuantizedTensor}.

    samples (GPTQ only): calibration Samples (caprese.calibration.data) or token-id sequences; every token of
    every sample feeds the Hessians. The QuantizedTensor of a role is in its recipe orientation (block_axis)."""
    check_decoder(decoder, recipe)
    slots = weight_slots(decoder, recipe.roles)
    tied = decoder.lm_head.weight is decoder.model.embed_tokens.weight
    if tied and {"lm_head", "embed"} & set(recipe.roles):  # one matrix: quantize it once, as the head if asked
        keep = "lm_head" if "lm_head" in recipe.roles else "embed"
        slots = [s for s in slots if s.role not in ("lm_head", "embed") or s.role == keep]
        if recipe.block_axis("lm_head") != "in":
            raise CapreseError("tied embeddings: the LM head is the embedding's [vocab, hidden] matrix, so its "
                               "block axis must be 'in'")
    out: dict[str, QuantizedTensor] = {}

    def done(slot: WeightSlot, qt: QuantizedTensor) -> None:
        _assign(slot, qt, recipe)
        out[slot.name] = qt
        if tied and slot.role in ("lm_head", "embed"):
            out[HEAD_NAME] = out[EMBED_NAME] = qt

    if recipe.method == "rtn":
        for slot in slots:
            done(slot, _quantize_slot(slot, recipe, None))
        return out

    from tqdm.auto import tqdm

    ids = _samples_ids(samples)
    _ensure_cache(decoder, max(len(s) for s in ids))
    device = decoder.model.embed_tokens.weight.device
    by_layer: dict[int | None, list[WeightSlot]] = {}
    for slot in slots:
        by_layer.setdefault(slot.layer, []).append(slot)
    for slot in by_layer.pop(None, []):
        if slot.role == "embed":  # RTN, and BEFORE the forward passes so they see the quantized embedding
            done(slot, _quantize_slot(slot, recipe, None))
        else:
            by_layer.setdefault(None, []).append(slot)
    head = None in by_layer
    deepest = len(decoder.layers) - 1 if head else max((k for k in by_layer if k is not None), default=-1)
    states = [decoder.embed(torch.tensor([s], device=device)) for s in ids]
    bar = tqdm(range(deepest + 1), desc="GPTQ", file=sys.stderr, disable=not progress, leave=False)
    for i in bar:
        mine = by_layer.get(i, [])
        for group in SEQUENTIAL_GROUPS:  # q/k/v, then o on the quantized q/k/v's output, then gate/up, then down
            slots_g = [s for s in mine if s.role in group]
            if not slots_g:
                continue
            stop = max(slots_g, key=lambda s: DECODER_ROLES.index(s.role)).module  # the group's last call
            with HessianCollector({s.name: s.module for s in slots_g}) as hc:
                handle = stop.register_forward_hook(_stop_forward)
                try:
                    for x in states:
                        try:
                            decoder.blocks(x, 0, i, i + 1, phase="prefill")
                        except _StopForward:
                            pass
                finally:
                    handle.remove()
            for slot in slots_g:
                if slot.name not in hc.hessians:
                    raise CapreseError(f"{slot.name}: the calibration forward never called this layer, so GPTQ has "
                                       f"no statistics for it; quantize the dense model (before installing a method)")
                done(slot, _quantize_slot(slot, recipe, hc.hessians[slot.name]))
            del hc
        if i < deepest or head:  # a later layer or the head needs this layer's (quantized) output
            states = [decoder.blocks(x, 0, i, i + 1, phase="prefill") for x in states]
    bar.close()
    for slot in by_layer.get(None, []):  # the LM head, on the final normed hidden states
        h = torch.zeros(slot.weight.shape[1], slot.weight.shape[1], dtype=torch.float64, device=device)
        for x in states:
            f = decoder.model.norm(x).reshape(-1, x.shape[-1]).to(torch.float64)
            h.addmm_(f.t(), f)
        done(slot, _quantize_slot(slot, recipe, h))
    return out
