"""The graph I/O and naming contract (caprese.export.contract) holds for every exported graph, and weights are
stored once: both graphs' initializers point into one weights.bin at the offsets the manifest records."""

from __future__ import annotations

import json

import onnx
import pytest

from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from export_helpers import get_export

CASES = [("llama", "dense"), ("llama", "griffin"), ("qwen2", "cats"), ("gemma2", "griffin"), ("qwen3", "dense"),
         ("qwen2", "griffin", 8, "all", "fp32", "onnxruntime")]  # --target onnxruntime: same I/O, names
ELEM = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64}


def _dims(vi):
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim)


@pytest.fixture(params=CASES, ids=lambda c: "-".join(map(str, c)))
def engine(request, tmp_path_factory, tiny_model_dir):
    return get_export(tmp_path_factory, tiny_model_dir, *request.param)[0]


def test_graph_io_equals_contract(engine):
    m = load_manifest(engine)
    for graph in C.GRAPHS:
        model = onnx.load(str(m.file(graph)), load_external_data=False)
        for got, want in ((model.graph.input, m.layout.inputs(graph)), (model.graph.output, m.layout.outputs(graph))):
            assert [v.name for v in got] == [t.name for t in want]
            for v, t in zip(got, want):
                assert v.type.tensor_type.elem_type == ELEM[t.dtype], v.name
                assert _dims(v) == tuple(t.shape), v.name
        ms = [(C.MS_DOMAIN, 1)] if m.data["target"] == C.TARGET_ONNXRUNTIME else []
        assert [(o.domain, o.version) for o in model.opset_import] == [("", C.OPSET)] + ms
    assert m.data["io"] == m.layout.io_dict()
    assert m.data["in_place"] == [list(p) for p in m.layout.in_place_pairs()]


def test_node_names_follow_contract(engine):
    m = load_manifest(engine)
    for graph in C.GRAPHS:
        model = onnx.load(str(m.file(graph)), load_external_data=False)
        names = [n.name for n in model.graph.node]
        assert len(names) == len(set(names)), "node names must be unique"
        for n in model.graph.node:
            match = C.NODE_NAME_RE.match(n.name)
            assert match, n.name
            if match.group("layer") is not None:
                assert int(match.group("layer")) < m.layout.num_layers
            assert n.domain in ("", "ai.onnx") or (m.data["target"] == C.TARGET_ONNXRUNTIME and
                                                   n.domain == C.MS_DOMAIN), n.name
        scopes = {n.name.rsplit("/", 1)[0] for n in model.graph.node}
        for i in range(m.layout.num_layers):
            assert f"/model/layers.{i}/attn" in scopes and f"/model/layers.{i}/mlp" in scopes


def test_weights_stored_once_and_shared(engine):
    m = load_manifest(engine)
    table = m.data["weights"]
    refs = {}
    for graph in C.GRAPHS:
        model = onnx.load(str(m.file(graph)), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                assert len(init.raw_data) <= 64, f"{init.name}: only small constants may be inline"
                continue
            ext = {kv.key: kv.value for kv in init.external_data}
            assert ext["location"] == C.WEIGHTS_FILE
            entry = table[init.name]
            assert (int(ext["offset"]), int(ext["length"])) == (entry["offset"], entry["length"])
            assert list(init.dims) == entry["shape"]
            refs.setdefault(init.name, set()).add(graph)
    spans = sorted((e["offset"], e["offset"] + e["length"]) for e in table.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "tensors overlap in weights.bin"
    assert all(s % C.WEIGHT_ALIGNMENT == 0 for s, _ in spans)
    size = m.file("weights").stat().st_size
    assert size < sum(e["length"] for e in table.values()) + C.WEIGHT_ALIGNMENT * len(table)
    shared = [n for n, gs in refs.items() if gs == set(C.GRAPHS)]
    assert "model.embed_tokens.weight" in shared and "model.layers.0.self_attn.qkv_proj.weight.t" in shared
    for t in m.spec.layers:  # GRIFFIN: what the runtime folds is in the table
        if t.fold is not None:
            assert {w.name for w in t.fold.roles().values()} <= set(table)


def test_layout_round_trip_and_validation():
    lay = C.GraphLayout(2, 8, 16, 2, 4, 32, "fp16", (C.GRIFFIN, C.DENSE), k=8, rank=2, mlp_bias=True)
    assert C.GraphLayout.from_dict(json.loads(json.dumps(lay.to_dict()))) == lay
    names = [t.name for t in lay.inputs(C.DECODE)]
    assert names[-3:] == ["w_gul.0", "w_dr.0", "b_gul.0"]
    assert lay.inputs(C.DECODE)[-3].shape == (C.BATCH, 8, 2 * 8 + 2)
    assert lay.inputs(C.DECODE)[0].shape == (C.BATCH, 1)
    assert [t.name for t in lay.outputs(C.PREFILL)][-1] == "griffin_stat.0"
    with pytest.raises(ValueError):
        C.GraphLayout(2, 8, 16, 2, 4, 32, "fp8", (C.DENSE, C.DENSE))
    with pytest.raises(ValueError):
        C.GraphLayout(2, 8, 16, 2, 4, 32, "fp32", (C.GRIFFIN, C.DENSE), k=0)
    with pytest.raises(ValueError):
        C.node_name("ffn", "MatMul", 0)
    assert C.node_name("mlp", "MatMul_down", 3) == "/model/layers.3/mlp/MatMul_down"
    assert not C.NODE_NAME_RE.match("/model/layers.0/mlp/has space")


def test_layer_of_tells_names_apart_exactly():
    """Code outside contract.py asks layer_of, not a prefix: cats_tau_in.2 is not a cats_tau, nor w_gul.1x a w_gul."""
    assert C.layer_of(C.past_key(3), C.past_key, C.past_value) == 3
    assert C.layer_of(C.past_value(12), C.past_key, C.past_value) == 12
    assert C.layer_of(C.cats_tau_in(2), C.cats_tau) is None and C.layer_of(C.cats_tau_in(2), C.cats_tau_in) == 2
    assert C.layer_of(C.present_key(0), C.past_key) is None
    for name in ("w_gul.1x", "w_gul.", "w_gul", C.LOGITS, C.INPUT_IDS):
        assert C.layer_of(name, *C.SELECTION_INPUTS) is None
    assert all(C.layer_of(f(5), *C.SELECTION_INPUTS) == 5 for f in C.SELECTION_INPUTS)
