"""caprese.cpu_threads: the default intra-op thread count follows the CPUs other processes leave free; an explicit
count always wins; the torch decode loop and the ONNX Runtime backend use it. The speed it buys under load is
measured by tools/bench_threads.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from caprese import cpu_threads
from caprese.model.generation import generate
from caprese.model.loading import load_decoder


@pytest.fixture
def policy(monkeypatch):
    """The policy itself: no pin (the conftest pins 1 thread), no thread variables, no earlier reading."""
    monkeypatch.setattr(cpu_threads, "_pinned", None)
    monkeypatch.setattr(cpu_threads, "_last", None)
    monkeypatch.setattr(cpu_threads, "_last_answer", None)
    for var in ("CAPRESE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def fake_cpus(monkeypatch, n: int, readings):
    """n usable CPUs whose /proc/stat readings are (wall s, busy jiffies, total jiffies, our CPU s) in turn."""
    it = iter(readings)
    monkeypatch.setattr(cpu_threads, "_affinity", lambda: list(range(n)))
    monkeypatch.setattr(cpu_threads, "_quota", lambda: None)
    monkeypatch.setattr(cpu_threads, "_reading", lambda: next(it))
    monkeypatch.setattr(cpu_threads, "_sleep", lambda s: None)


@pytest.mark.parametrize("n, busy, own, want", [
    (2, 2.0, 0.0, 1),  # two busy processes on 2 CPUs: one thread, never zero
    (2, 1.0, 0.0, 1),  # one busy process: the one free CPU
    (2, 0.4, 0.0, 2),  # a light background (0.4 CPU): both
    (2, 0.05, 0.0, 2),  # idle
    (2, 2.0, 1.9, 2),  # the CPUs were busy with OUR threads: that is no reason to shrink
    (8, 3.0, 0.0, 5),
    (8, 7.6, 0.0, 1),
])
def test_threads_are_the_cpus_others_leave_free(policy, n, busy, own, want):
    # one 0.1 s fresh sample: jiffies at USER_HZ 100 over n CPUs
    fake_cpus(policy, n, [(0.0, 0.0, 0.0, 0.0), (0.1, 10 * busy, 10 * n, 0.1 * own)])
    assert cpu_threads.default_threads() == want


def test_a_later_call_reads_the_interval_since_the_last_one(policy):
    """No sleep on later calls: the difference since the previous reading (a long loop follows the load)."""
    slept = []
    fake_cpus(policy, 2, [(0.0, 0, 0, 0.0), (0.1, 1, 20, 0.0),  # idle -> 2
                          (3.1, 1 + 600, 20 + 600, 0.0),  # the last 3 s: both CPUs busy with others -> 1
                          (5.1, 601 + 200, 620 + 400, 2.0)])  # 2 s, busy 1 CPU, all of it ours -> 2
    policy.setattr(cpu_threads, "_sleep", slept.append)
    policy.setattr(cpu_threads, "_clock", iter([3.1, 5.1]).__next__)  # the 2nd and 3rd calls' age check
    assert [cpu_threads.default_threads() for _ in range(3)] == [2, 1, 2]
    assert slept == [cpu_threads.SAMPLE_S]  # only the first call sampled


def test_explicit_counts_win(policy):
    fake_cpus(policy, 2, [])  # any reading would raise StopIteration: none is taken
    assert cpu_threads.resolve(3) == 3
    policy.setenv("OMP_NUM_THREADS", "4")
    assert cpu_threads.default_threads() == 4
    policy.setenv("CAPRESE_THREADS", "2")
    assert cpu_threads.default_threads() == 2
    assert cpu_threads.pin(1) is None and cpu_threads.default_threads() == 1 and cpu_threads.pin(None) == 1
    with pytest.raises(ValueError):
        cpu_threads.pin(0)


def test_real_busy_processes_leave_one_thread(policy):
    """Start one spinning process per usable CPU: the policy's fresh sample sees no free CPU and answers 1."""
    n = cpu_threads.usable_cpus()
    code = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert cpu_threads.default_threads() == 1
        print(f"\n{n} busy processes on {n} usable CPUs: 1 thread, decided in {time.perf_counter() - t0:.3f} s")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_torch_decode_loop_uses_the_policy_and_restores(policy, tiny_model_dir):
    """generate() runs on the policy's count (re-read during the loop), an explicit count wins, and the
    process's own torch count is back afterwards."""
    dec = load_decoder(tiny_model_dir("llama"))
    answers = iter([2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    policy.setattr(cpu_threads, "default_threads", lambda: next(answers))
    policy.setattr(cpu_threads.TorchThreads, "RETUNE_S", 0.0)  # re-read every step
    seen: list[int] = []
    torch.set_num_threads(1)
    generate(dec, [5, 6, 7], 6, eos_ids=(), on_token=lambda t: seen.append(torch.get_num_threads()))
    assert seen[0] == 2 and seen[-1] == 1  # started on 2, followed the load down to 1
    assert torch.get_num_threads() == 1
    seen.clear()
    generate(dec, [5, 6, 7], 4, eos_ids=(), on_token=lambda t: seen.append(torch.get_num_threads()), threads=3)
    assert seen == [3] * 4 and torch.get_num_threads() == 1


def test_onnxruntime_backend_uses_the_policy(policy, tmp_path_factory, tiny_model_dir):
    from export_helpers import get_export

    from caprese.runtime.generator import Generator

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama")
    policy.setattr(cpu_threads, "usable_cpus", lambda: 4)
    policy.setattr(cpu_threads, "default_threads", lambda: 3)  # one CPU busy: 3 threads that do not spin
    d = Generator.load(engine, "onnxruntime").backend.describe()
    assert d["threads"] == 3 and d["spinning"] is False
    policy.setattr(cpu_threads, "default_threads", lambda: 4)  # all free: ONNX Runtime's own spinning pool
    assert Generator.load(engine, "onnxruntime").backend.describe()["spinning"] is True
    d = Generator.load(engine, "onnxruntime", threads=2).backend.describe()  # explicit: as asked, ORT's default
    assert d["threads"] == 2 and d["spinning"] is True
    assert Generator.load(engine, "onnxruntime", threads=2, spinning=False).backend.describe()["spinning"] is False


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_usable_cpus_is_the_affinity():
    assert 1 <= cpu_threads.usable_cpus() <= len(os.sched_getaffinity(0))


def test_cli_threads_flag_is_an_explicit_count(policy, tiny_model_dir, monkeypatch, capsys):
    """`caprese generate/eval --threads N` reach the decode loop as an explicit count (no flag: the policy).
    N = 1: more threads than free CPUs is the very cliff this module avoids, on a shared test machine."""
    from caprese.cli.main import main as caprese_main
    from cli_helpers import run_cli

    seen: list[int | None] = []
    enter = cpu_threads.TorchThreads.__enter__
    monkeypatch.setattr(cpu_threads.TorchThreads, "__enter__",
                        lambda self: (seen.append(self.explicit), enter(self))[1])
    folder = tiny_model_dir("llama")
    rc, _, err = run_cli(caprese_main, ["generate", folder, "-p", "hi", "-n", "3", "--threads", "1", "--json"],
                         monkeypatch, capsys)
    assert rc == 0, err
    task = folder.parent / "task.jsonl"
    task.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n')
    rc, _, err = run_cli(caprese_main, ["eval", folder, "--task", f"jsonl:{task}", "-n", "3", "--threads", "1",
                                        "--quiet", "--json"], monkeypatch, capsys)
    assert rc == 0, err
    rc, _, err = run_cli(caprese_main, ["generate", folder, "-p", "hi", "-n", "3", "--json"], monkeypatch, capsys)
    assert rc == 0, err
    assert seen == [1, 1, None]
