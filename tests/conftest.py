"""Shared fixtures: tiny random HF model folders (tests/tiny_models.py), built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import tiny_models` whether or not tests/ is a package

from tiny_models import KINDS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning threads made whole
    files ~8x slower. The slow real-model tests run on one thread too: slower alone, but steady under load."""
    import torch

    from caprese import cpu_threads

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pinned = cpu_threads.pin(1)  # the decode loops' default policy (one thread per free CPU) too
    yield
    cpu_threads.pin(pinned)
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(kind)` -> Path of that kind's fp32 model folder (with tokenizer), built on first use."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = make_tiny_model(kind, root / kind)
        return built[kind]

    return get


@pytest.fixture(scope="session", params=KINDS)
def model_kind_dir(request, tiny_model_dir):
    """(kind, folder) for every tiny model kind."""
    return request.param, tiny_model_dir(request.param)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401  (importability is the test)
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA, `tensorrt` tests skip where `import tensorrt` fails: cleanly, with a reason."""
    skip_gpu = None if _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    skip_trt = None if _has_tensorrt() else pytest.mark.skip(reason="needs TensorRT (`import tensorrt` failed)")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_trt is not None and "tensorrt" in item.keywords:
            item.add_marker(skip_trt)


def pytest_terminal_summary(terminalreporter):
    """Timings that tests report but never assert (record_property names ending in _ms_per_token / _ttft_ms),
    in their own section at the end instead of inside the progress line."""
    rows = [(r.nodeid, name, value) for r in terminalreporter.stats.get("passed", [])
            for name, value in getattr(r, "user_properties", ()) if name.endswith(("_ms_per_token", "_ttft_ms"))]
    if rows:
        terminalreporter.section("latency, reported not asserted (shared CPU: compare within a row only)")
        for nodeid, name, value in rows:
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {name} = {value}")

