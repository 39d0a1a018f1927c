"""The TensorRT backend's binding plan (caprese.runtime.tensorrt_plan), without TensorRT: every engine tensor of
every role is bound, the cache at the static length and in place, the roles on the right engine and profile."""

from __future__ import annotations

import pytest

from caprese.export import contract as C
from caprese.runtime.tensorrt_plan import binding_plan

S, P = 256, 100
LAYOUTS = {
    "dense": C.GraphLayout(2, 64, 128, 2, 16, 384, "fp16", (C.DENSE, C.DENSE)),
    "cats": C.GraphLayout(2, 64, 128, 2, 16, 384, "bf16", (C.CATS, C.DENSE), rank=8),
    "griffin": C.GraphLayout(2, 64, 128, 2, 16, 384, "fp32", (C.GRIFFIN, C.CATS), k=32, rank=8, mlp_bias=True),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_engine_tensor_is_bound_once_per_role(name):
    lay = LAYOUTS[name]
    buffers, roles = binding_plan(lay, S, P)
    assert set(roles) == set(C.GRAPHS)
    for role, b in roles.items():
        io = lay.tensorrt_io(b.engine, S)
        names = [t.name for t in io["inputs"] + io["outputs"]]
        assert sorted(b.tensors) == sorted(names)
        assert set(b.input_shapes) | set(b.per_call) == {t.name for t in io["inputs"]}
        for t in io["inputs"] + io["outputs"]:
            buf = buffers[b.tensors[t.name]]
            assert buf.dtype == t.dtype
            if t.name in b.input_shapes:
                assert b.input_shapes[t.name] == buf.shape
        assert b.per_call == ((C.INPUT_IDS, C.POSITION_IDS) if role == C.PREFILL else ())
        assert buffers[b.tensors[C.INPUT_IDS]].shape == ((1, P) if role == C.PREFILL else (1, 1))


@pytest.mark.parametrize("name", LAYOUTS)
def test_cache_is_static_and_bound_in_place(name):
    lay = LAYOUTS[name]
    buffers, roles = binding_plan(lay, S, P)
    for b in roles.values():
        for past, present in lay.in_place_pairs():
            assert b.tensors[past] == b.tensors[present] == past
            assert buffers[past].shape == (1, lay.num_kv_heads, S, lay.head_dim) and buffers[past].dtype == lay.dtype
        assert buffers[b.tensors[C.ATTENTION_MASK]].shape == (1, S)
    kv = {k for k in buffers if k.startswith(("past_", "present_"))}
    assert kv == {p for p, _ in lay.in_place_pairs()}  # one buffer per cache, shared by both roles


def test_shared_engine_roles_use_its_two_profiles():
    for name in ("dense", "cats"):
        _, roles = binding_plan(LAYOUTS[name], S, P)
        assert (roles[C.PREFILL].engine, roles[C.PREFILL].profile) == (C.TRT_SHARED, 0)
        assert (roles[C.DECODE].engine, roles[C.DECODE].profile) == (C.TRT_SHARED, 1)
    _, roles = binding_plan(LAYOUTS["griffin"], S, P)
    assert {r: (b.engine, b.profile) for r, b in roles.items()} == {C.PREFILL: (C.PREFILL, 0),
                                                                    C.DECODE: (C.DECODE, 0)}


def test_cats_role_inputs():
    """decode_flag: a False buffer for prefill, a True one for decode; both roles read the decode τ buffer (prefill
    ignores it); prefill's τ goes to the statistics buffer, decode's pass-through to scratch."""
    buffers, roles = binding_plan(LAYOUTS["cats"], S, P)
    pre, dec = roles[C.PREFILL].tensors, roles[C.DECODE].tensors
    assert buffers[pre[C.DECODE_FLAG]].fill is False and buffers[dec[C.DECODE_FLAG]].fill is True
    assert buffers[pre[C.DECODE_FLAG]].shape == () and buffers[pre[C.DECODE_FLAG]].dtype == "bool"
    assert pre[C.cats_tau_in(0)] == dec[C.cats_tau_in(0)] == "selection.cats_tau.0"
    assert pre[C.cats_tau(0)] == "stats.cats_tau.0" and dec[C.cats_tau(0)] == "scratch.cats_tau.0"
    griffin_buffers, g = binding_plan(LAYOUTS["griffin"], S, P)
    assert g[C.DECODE].tensors[C.cats_tau(1)] == "selection.cats_tau.1"  # GRIFFIN's decode graph: τ is an input
    assert griffin_buffers["selection.w_gul.0"].shape == (1, 64, 2 * 32 + 8)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="max_prompt_len"):
        binding_plan(LAYOUTS["dense"], 64, 64)
