"""Which buffer every TensorRT engine tensor is bound to, per role (prefill / decode), batch 1: plain Python, so
the binding is unit-tested without TensorRT (tests/test_tensorrt_plan.py); caprese.runtime.tensorrt_backend
allocates the buffers and binds them.

- One execution context per role. The shared engine of dense / CATS / BYPASS layouts has two optimization profiles:
  the prefill context selects profile 0 and the decode context profile 1, once, at creation (TensorRT: each
  execution context in concurrent use needs its own profile), so nothing is switched per call. GRIFFIN has two
  engines of one profile each.
- The KV cache is one [1, H_kv, S, D] buffer per layer for K and for V at the engines' STATIC length S, bound to
  past_* AND present_* of every role (IKVCacheUpdateLayer writes in place: both names at the same address).
- Token inputs: prefill binds [1, max_prompt_len] buffers and sets the shape [1, n] per call; decode binds [1, 1].
- The shared CATS / BYPASS graph: decode_flag is a constant buffer per role (False / True); cats_tau_in.{i} reads the
  decode threshold buffer (ignored by the prefill role); the decode role's cats_tau.{i} outputs go to scratch.
"""

from __future__ import annotations

import dataclasses

from caprese.export import contract as C
from caprese.runtime.buffers import Buffer, selection_name

@dataclasses.dataclass(frozen=True)
class RoleBinding:
    role: str
    engine: str
    profile: int  # the optimization profile this role's execution context selects
    tensors: dict  # engine tensor name -> buffer key
    input_shapes: dict  # input name -> the shape set on the context once (token inputs of prefill: per call)
    per_call: tuple = ()  # inputs whose shape is set per call ([1, n] token inputs of prefill)


def _key(role: str, spec: C.TensorSpec, is_input: bool, kv: dict) -> str:
    n = spec.name
    if n in (C.INPUT_IDS, C.POSITION_IDS, C.DECODE_FLAG):
        return f"{role}.{n}"
    if n in kv:
        return kv[n]
    i = C.layer_of(n, C.cats_tau_in)
    if i is not None:
        return "selection." + C.cats_tau(i)
    if is_input and selection_name(n):
        return f"selection.{n}"
    if not is_input and C.layer_of(n, C.griffin_stat, C.cats_tau) is not None:
        return f"stats.{n}" if role == C.PREFILL else f"scratch.{n}"
    return n  # write_indices, attention_mask, logits


def binding_plan(layout: C.GraphLayout, cache_len: int, max_prompt_len: int) -> tuple[dict, dict]:
    """({buffer key: Buffer}, {role: RoleBinding}) for batch 1 at the static cache length."""
    if not 1 <= max_prompt_len < cache_len:
        raise ValueError(f"need 1 <= max_prompt_len ({max_prompt_len}) < cache_len ({cache_len})")
    kv = {}
    for past, present in layout.in_place_pairs():
        kv[past] = kv[present] = past
    buffers: dict[str, Buffer] = {}
    roles: dict[str, RoleBinding] = {}
    for engine, served in layout.tensorrt_engines().items():
        io = layout.tensorrt_io(engine, cache_len)
        for profile, role in enumerate(served):
            seq = max_prompt_len if role == C.PREFILL else 1
            tensors, shapes, per_call = {}, {}, []
            for is_input, specs in ((True, io["inputs"]), (False, io["outputs"])):
                for spec in specs:
                    shape = tuple(1 if d == C.BATCH else seq if d == C.SEQ else int(d) for d in spec.shape)
                    key = _key(role, spec, is_input, kv)
                    fill = (role == C.DECODE) if spec.name == C.DECODE_FLAG else \
                        1 if spec.name == C.ATTENTION_MASK else None
                    want = Buffer(key, spec.dtype, shape, fill)
                    if buffers.setdefault(key, want) != want:
                        raise ValueError(f"buffer {key} bound with two shapes/dtypes: {buffers[key]} and {want}")
                    tensors[spec.name] = key
                    if is_input:
                        if C.SEQ in spec.shape and role == C.PREFILL:
                            per_call.append(spec.name)
                        else:
                            shapes[spec.name] = shape
            roles[role] = RoleBinding(role, engine, profile, tensors, shapes, tuple(per_call))
    return buffers, roles
