"""The static TensorRT check on the built-in model's real shapes (9 query / 3 KV heads of 64, 30 layers): every
standard export (dense / GRIFFIN / CATS at fp32 / fp16 / bf16) must give graphs the checker passes.

Every export already refuses a graph with a violation (exporter._write_folder), so an export that completes has
passed; the test re-checks the written files the manifest names for TensorRT, so that a change that stopped the
exporter from checking would fail here too. Short cache (64) and random bypasses: the rules are about nodes, types
and shapes, not about the weights' values (the DequantizeLinear scale rules are the exception, and those graphs
are checked by the quantized export tests).
"""

from __future__ import annotations

import pytest

from export_helpers import method_artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from caprese.model.default_model import fetch_default

    base = fetch_default()
    root = tmp_path_factory.mktemp("smollm2_trt_check")
    return {"dense": base,
            "griffin": method_artifact(base, root / "griffin", "griffin", rank=16, layers="first-half"),
            "cats": method_artifact(base, root / "cats", "cats", rank=16, layers="all")}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", ["dense", "griffin", "cats"])
def test_smollm2_standard_exports_pass_the_tensorrt_check(method, precision, sources, tmp_path):
    from caprese.export.exporter import check_folder, export
    from caprese.export.manifest import load_manifest
    from caprese.export.tensorrt_ops import format_violations

    engine = export(sources[method], tmp_path / "engine", precision=precision, max_seq_len=64).out
    graphs = load_manifest(engine).tensorrt_graphs
    assert graphs, "the manifest names no graph for TensorRT"
    found = check_folder(engine)
    assert set(found) >= {p.name for p in graphs.values()}, f"checked {sorted(found)}, TensorRT gets {graphs}"
    for name, violations in found.items():
        assert violations == [], f"{name}: {format_violations(violations, 10)}"
