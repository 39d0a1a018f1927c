"""The quantized student and the unquantized teacher in ONE decoder: each quantized weight's `.data` swapped.

Calibration with `--weights` (issue 15) distils the bypass of a student that computes what export will run (the
dequantized weights of every quantized linear: attention, FFN and, on request, the LM head / embedding) against
the UNQUANTIZED dense teacher. Both use the same modules; `StudentWeights` holds, per quantized parameter, the
original tensor and the dequantized one, and swaps `param.data` between them (a pointer swap, no copy):

    sw = prepare_student(decoder, recipe, samples)   # quantize (RTN / GPTQ on the dense model); state "teacher"
    with sw.student():                               # every quantized weight dequantized
        ...forward, backward...                      # keep it open through backward: autograd saved the weights
        with sw.teacher(): ...                       # nested: the original weights (no grad needed there)
    with sw.student_ffn(i): ...                      # only layer i's gate / up / down (parallel layer-wise capture)

Cost: the quantized weights once more in the model's dtype (the originals are kept for the teacher). Static
selections (magnitude pruning) come from the UNQUANTIZED weights: install methods while the teacher's weights are
in place (the state after `prepare_student`), as `Artifact.apply` and `open_source` do.
"""

from __future__ import annotations

import contextlib

import torch

from caprese.calibration.weight_quant import (DECODER_ROLES, EMBED_NAME, HEAD_NAME, QuantRecipe, WeightSlot,
                                              quantize_decoder, weight_slots)
from caprese.errors import CapreseError
from caprese.model.quantization import BLOCK_SIZES, ROW, QuantizedTensor, linear_weight, stored_shape

_FFN_ROLES = ("gate", "up", "down")


class StudentWeights:
    """Per quantized parameter (tied ones once): (parameter, original tensor, dequantized tensor, layer, role)."""

    def __init__(self, decoder, recipe: QuantRecipe, qweights: dict[str, QuantizedTensor],
                 originals: dict[str, torch.Tensor] | None):
        self.decoder, self.recipe, self.qweights = decoder, recipe, qweights
        self._pairs = []
        seen = set()
        for slot in weight_slots(decoder, recipe.roles):
            p = slot.module.weight
            if id(p) in seen:  # a tied LM head / embedding: one parameter
                continue
            seen.add(id(p))
            qt = qweights.get(slot.name)
            if qt is None:
                raise CapreseError(f"quantized weights lack {slot.name}; re-quantize the model")
            q = dequantized(slot, qt, recipe).to(dtype=p.dtype, device=p.device)
            orig = None if originals is None else originals[slot.name]
            self._pairs.append((p, orig, q, slot.layer, slot.role))
        self.state = "teacher" if originals is not None else "student"
        self._set_all(self.state)

    def _set(self, pair, state: str) -> None:
        p, orig, q = pair[:3]
        if state == "teacher" and orig is None:
            raise RuntimeError("these student weights keep no originals (fixed to the student)")
        p.data = orig if state == "teacher" else q

    def _set_all(self, state: str, pairs=None) -> None:
        for pair in self._pairs if pairs is None else pairs:
            self._set(pair, state)
        self._changed()

    def _changed(self) -> None:
        from caprese.calibration.methods import efficient_layers

        for ffn in efficient_layers(self.decoder).values():
            ffn.weights_changed()

    @contextlib.contextmanager
    def _use(self, state: str, pairs=None):
        before = self.state if pairs is None else None
        self._set_all(state, pairs)
        if pairs is None:
            self.state = state
        try:
            yield self
        finally:
            if pairs is None:
                self.state = before
                self._set_all(before)
            else:
                self._set_all(self.state, pairs)

    def student(self):
        """Context: every quantized weight dequantized (what export runs)."""
        return self._use("student")

    def teacher(self):
        """Context: every weight original (the unquantized dense model)."""
        return self._use("teacher")

    def student_ffn(self, layer: int):
        """Context: only layer `layer`'s FFN weights dequantized (a stand-alone FF̂ inside a teacher forward)."""
        return self._use("student", [pr for pr in self._pairs if pr[3] == layer and pr[4] in _FFN_ROLES])

    def fix_student(self) -> None:
        """Leave the student's weights in place for good and drop the originals (eval / generate)."""
        self._set_all("student")
        self.state = "student"
        self._pairs = [(p, None, q, i, r) for p, _, q, i, r in self._pairs]


def dequantized(slot: WeightSlot, qt: QuantizedTensor, recipe: QuantRecipe) -> torch.Tensor:
    """The weight (in the module's layout) that `qt`, stored in the recipe's orientation for slot's role, stands for."""
    axis = "in" if slot.role == "embed" else recipe.block_axis(slot.role)
    w = slot.module.weight
    want = tuple(w.shape) if slot.role == "embed" else stored_shape(w.shape[0], w.shape[1], axis)
    if tuple(qt.shape) != want:
        raise CapreseError(f"{slot.name}: quantized shape {list(qt.shape)} does not match the model's {list(want)}; "
                           "the quantized weights belong to another model")
    return linear_weight(qt, axis, torch.float32)


@torch.no_grad()
def prepare_student(decoder, recipe: QuantRecipe, samples=None, progress: bool = False,
                    qweights: dict[str, QuantizedTensor] | None = None) -> StudentWeights:
    """Quantize `decoder`'s weights as `recipe` says (GPTQ on `samples`, on the DENSE decoder: call it before a
    method is installed), keep the originals, and return the swapper in the "teacher" state. `qweights` (from an
    artifact or a work dir): use these codes instead of quantizing again."""
    slots = weight_slots(decoder, recipe.roles)
    originals = {s.name: s.module.weight.detach().clone() for s in slots}
    if qweights is None:
        qweights = quantize_decoder(decoder, recipe, samples, progress=progress)
    return StudentWeights(decoder, recipe, qweights, originals)


def install_quantized(decoder, recipe: QuantRecipe, qweights: dict[str, QuantizedTensor]) -> StudentWeights:
    """Write the dequantized weights into `decoder` for good (no originals kept): eval / generate of a quantized
    artifact or baseline."""
    with torch.no_grad():
        return StudentWeights(decoder, recipe, qweights, None)


def check_model_shapes(spec, recipe: QuantRecipe) -> None:
    """One-line CapreseError, from config.json alone, when a weight of the recipe's roles cannot be blocked
    (a block size that does not divide its input features, or its output features for the down projection)."""
    d, f, qdim, kvdim = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim, \
        spec.num_kv_heads * spec.head_dim
    shapes = {"q": (qdim, d), "k": (kvdim, d), "v": (kvdim, d), "o": (d, qdim), "gate": (f, d), "up": (f, d),
              "down": (d, f), "lm_head": (spec.vocab_size, d)}
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    fmt = recipe.fmt
    for role in recipe.roles:
        if role == "embed":
            stored, name, what = (spec.vocab_size, d), EMBED_NAME, "hidden size"
        else:
            axis = recipe.block_axis(role)
            stored = stored_shape(*shapes[role], axis)
            name = HEAD_NAME if role == "lm_head" else f"model.layers.*.{names[role]}.weight"
            what = f"{axis}put features"
        n = stored[1]
        if fmt.block_size != ROW and n % fmt.block_size:
            fits = [str(b) for b in BLOCK_SIZES if n % b == 0] + ["row"]
            raise CapreseError(f"{name}: {what} = {n} is not a multiple of the block size {fmt.block_size}; use "
                               f"--block-size {' or '.join(fits)}")
        fmt.check_shape(stored, name, what)


def quant_label(recipe: QuantRecipe | None) -> str:
    """'int4-gptq/b32' (or '' for None): appended to model labels in tables."""
    if recipe is None:
        return ""
    extra = "" if tuple(recipe.roles) == DECODER_ROLES else "+" + "+".join(
        r for r in recipe.roles if r not in DECODER_ROLES)
    return f"{recipe.fmt.name}-{recipe.method}/b{recipe.fmt.block_name}{extra}"

