"""The native backend (one call of caprese's C kernel per decode step) against ONNX Runtime running the same
engine's decode graph: the logits of every decode step, the greedy tokens, GRIFFIN re-selection, CATS' skipped
rows, 1 to 16 threads, every model family of the tiny set, chat turns that regrow the cache; the screened LM head
of greedy steps against the full one (same tokens, bytes counted, a head built to defeat the int8 screen); the
AVX2 and scalar builds next to the default one; the thread pool (same bits for any thread count, a helper that
stalls inside its chunks, helpers switched off); the struct layout check; the load-time head choice; and its
one-line refusals and build errors.

Tolerance (fp32 on both sides): the kernel sums the products in another order than MLAS (row chunks whose parts
are added in chunk order, four rows at a time; attention scores a block of slots at a time, merged by max and
sum), keeps the RMSNorm sum of squares in float64 and uses its own exp in the activations and softmax, so the two
differ by float32 rounding only. Logits of these tiny models are O(1); max |Δ| seen here is 2e-6 to 1e-5 (every
ISA), and the bound is 5e-5 + 5e-5·|logit|: an error in any real computation (a wrong row, norm, rotary sign or
mask) moves logits by 1e-2 or more. Between thread counts the kernel's logits are compared bit for bit: each
chunk's arithmetic depends only on its index, whoever runs it."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import time

import pytest
import torch

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.runtime import Generator
from caprese.runtime.generator import sampling_from
from caprese.runtime.native import head_choice, library
from cli_helpers import assert_one_line_error, run_cli
from export_helpers import get_export, one_torch_thread, prompt_ids
from test_decoder_parity import ONE_ROW_CASES

# every test but the build-error one compiles the kernel: they need the C compiler the backend needs
needs_cc = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler (the native kernel is built with one)")
NEW = 40  # 39 decode steps: GRIFFIN re-selections at steps 8, 16, 24, 32; past mistral's/qwen2's window of 8
ATOL = RTOL = 5e-5
_GENERATORS: dict = {}


def _flags() -> set[str]:
    try:
        return set(library._cpu_flags().split())
    except Exception:  # pragma: no cover
        return set()


# the builds this CPU can run besides its default one: each is compiled once (a few seconds)
OTHER_ISAS = [isa for isa, ok in (("avx2", library.X86 and {"avx2", "fma"} <= _flags()
                                   and library.best_isa() != "avx2"),
                                  ("scalar", library.X86 and library.best_isa() != "scalar")) if ok]
ISAS = [None, *OTHER_ISAS]  # None: the default (the CPU's widest)


def generator(engine, backend: str, threads: int = 1, head: str = "full", isa: str | None = None) -> Generator:
    """A cached Generator; the native one computes every logit unless head="screened" (the default "auto"
    decides by a timing probe), so that the logits of greedy steps can be recorded and compared."""
    key = (str(engine), backend, threads, head, isa)
    if key not in _GENERATORS:
        options = {"head": head, "isa": isa} if backend == "native" else {}
        _GENERATORS[key] = Generator.load(engine, backend=backend, threads=threads, **options)
    return _GENERATORS[key]


def recorded(g: Generator, prompt: list[int], rho: int):
    """(result, logits of every decode step [steps, V]) of a greedy generation, each step through decode() (a
    backend's own greedy shortcut, e.g. the native kernel's argmax over a quantized head, returns no logits)."""
    from caprese.runtime.backend import Backend

    seen, decode = [], g.backend.decode

    def record(token, slot):
        out = decode(token, slot)
        seen.append(out.clone())
        return out

    g.backend.decode = record
    g.backend.decode_greedy = lambda token, slot: Backend.decode_greedy(g.backend, token, slot)
    g.backend.decode_greedy_n = lambda *a: Backend.decode_greedy_n(g.backend, *a)  # a step at a time, recorded
    try:
        with one_torch_thread():
            r = g.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    finally:
        del g.backend.decode, g.backend.decode_greedy, g.backend.decode_greedy_n
    return r, torch.cat(seen)


CASES = [  # (kind, method, rho, target, what it exercises)
    ("llama", "dense", 0, "tensorrt"),  # q/k/v/o + MLP biases, untied head, head_dim 24, GQA 3:1
    ("llama", "griffin", 8, "tensorrt"),  # GRIFFIN folded buffers + b_gul, re-selection every 8 steps
    ("llama", "cats", 0, "tensorrt"),  # CATS threshold with a bypass and MLP biases: sparse up / down rows
    ("llama3", "dense", 0, "tensorrt"),  # Llama 3.1 RoPE scaling (in the tables), MQA, tied embeddings
    ("mistral", "dense", 0, "tensorrt"),  # sliding window 8 on every layer
    ("qwen2", "griffin", 8, "tensorrt"),  # q/k/v biases, a window on layer 1 only
    ("qwen2", "cats", 0, "tensorrt"),
    ("qwen3", "dense", 0, "tensorrt"),  # per-head q/k RMSNorm
    ("gemma2", "dense", 0, "tensorrt"),  # 1 + w norms, post norms, gelu-tanh, soft-caps, embedding scale
    ("gemma2", "griffin", 8, "tensorrt"),
    ("gemma2-untied", "dense", 0, "tensorrt"),  # Gemma 2 with its own lm_head (the head the native kernel reads)
    ("llama-hd96", "dense", 0, "tensorrt"),  # head_dim 96: the attention's 64- and 32-column value passes
    ("qwen2", "dense", 0, "onnxruntime"),  # --target onnxruntime: gate and up as two matrices
    ("qwen2", "griffin", 8, "onnxruntime"),
]


# the other builds run the cases that reach their distinct code paths: fused / split gate-up, GRIFFIN, CATS' row
# lists, q/k norms, Gemma 2 (soft-caps, gelu-tanh), a sliding window
ISA_CASES = [(None, *c) for c in CASES] + [
    (isa, *c) for isa in OTHER_ISAS for c in CASES if c[:2] in (("llama", "cats"), ("qwen2", "griffin"),
                                                                ("qwen3", "dense"), ("gemma2", "dense"),
                                                                ("mistral", "dense"), ("llama-hd96", "dense"))]


@needs_cc
@pytest.mark.parametrize("isa,kind,method,rho,target", ISA_CASES)
def test_native_decode_equals_onnxruntime(isa, kind, method, rho, target, tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method, target=target)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, rho)
    nat = generator(engine, "native", isa=isa)
    got, got_logits = recorded(nat, prompt, rho)
    diff = (got_logits - ref_logits).abs().max().item()
    print(f"{kind} {method} {target} [{nat.backend.describe()['isa']}]: max |logits native - onnxruntime| = "
          f"{diff:.2e} over {len(got_logits)} steps")
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=RTOL)
    assert got.stats.backend == "native" and got.stats.tokens_generated == NEW
    assert nat.backend.describe()["isa"] == (isa or library.best_isa())


def test_prefill_pool_stops_spinning_after_each_run(tmp_path_factory, tiny_model_dir):
    """The native backend's prefill sessions (ONNX Runtime) stop their pool's spinning as each run returns: a
    spinning pool took a CPU from the decode steps after it. The onnxruntime backend, whose decode steps are its
    own runs, keeps ONNX Runtime's default."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    nat = Generator.load(engine, "native", threads=2).backend
    opts = nat.prefill_runner.sessions[C.PREFILL].get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert nat.describe()["prefill_stop_spinning"] is True
    ort = Generator.load(engine, "onnxruntime", threads=2).backend
    for sess in ort.graphs.sessions.values():  # the key is not set at all
        with pytest.raises(Exception, match="force_spinning_stop"):
            sess.get_session_options().get_session_config_entry("session.force_spinning_stop")
    assert ort.describe()["stop_spinning"] is False


@needs_cc
@pytest.mark.parametrize("kind,method,threads", [("llama", "griffin", 2), ("gemma2", "dense", 3),
                                                 ("mistral", "cats", 16)])
def test_threads_split_rows_and_slots_like_one(kind, method, threads, tmp_path_factory, tiny_model_dir):
    """Several threads: matrix rows split (partial sums added by the readers) and the attention's slots split
    (shares merged by their max and sum; with 16 threads over mistral's window of 8 some shares are empty):
    ONNX Runtime's logits all the same."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    prompt = prompt_ids(14, seed=4)[0].tolist()
    rho = 8 if method == "griffin" else 0
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, rho)
    got, got_logits = recorded(generator(engine, "native", threads=threads), prompt, rho)
    assert generator(engine, "native", threads=threads).backend.describe()["threads"] == threads
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=RTOL)


@needs_cc
def test_conversation_regrows_the_cache_and_matches_onnxruntime(tmp_path_factory, tiny_model_dir):
    """Multi-turn chat with a KV cache sized exactly to each turn's need: every turn reallocates the buffers
    (keeping the cached slots), and the kernel must follow them to their new addresses."""
    from caprese.runtime.conversation import Conversation

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    ref = Conversation(Generator.load(engine, backend="onnxruntime", threads=1, kv_policy=1))
    nat_g = Generator.load(engine, backend="native", threads=1, kv_policy=1)
    got = Conversation(nat_g)
    capacities, reused = [], []
    with one_torch_thread():
        for turn in ("hello there", "and again", "one more"):  # the tiny engines hold 96 tokens
            want = ref.say(turn, 6).consume()
            have = got.say(turn, 6).consume()
            assert have.tokens == want.tokens
            capacities.append(nat_g.backend.capacity)
            reused.append(have.stats.reused_tokens)
    assert capacities == sorted(capacities) and len(set(capacities)) == 3  # grown at every turn
    assert reused[0] == 0 and min(reused[1:]) > 0  # later turns kept the cached slots


@needs_cc
def test_cats_rows_below_the_threshold_are_not_read(tmp_path_factory, tiny_model_dir):
    """CATS: the up- and down-projection rows of exactly the neurons the reference decoder zeroes are skipped
    (counted by a hook on its down_proj inputs at the same step), and the report counts only what was read; a
    dense engine skips nothing."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "cats")
    prompt = prompt_ids(14, seed=3)[0].tolist()
    ref_g = generator(engine, "torch")
    zeros: dict[int, int] = {}
    hooks = [f.dense.down_proj.register_forward_hook(
        lambda mod, inp, out, i=i: zeros.__setitem__(i, int((inp[0] == 0).sum())) if inp[0].shape[1] == 1 else None)
        for i, f in ref_g.backend.ffns.items()]
    try:
        with one_torch_thread():
            ref = ref_g.generate(prompt, 12, ignore_eos=True)
            got = generator(engine, "native").generate(prompt, 12, ignore_eos=True)
    finally:
        for h in hooks:
            h.remove()
    assert got.tokens == ref.tokens
    lay = generator(engine, "native").manifest.layout
    row = lay.hidden_size * 4
    skipped = generator(engine, "native").backend.skipped_bytes()  # of the last decode step
    assert len(zeros) == len(lay.layers_of(C.CATS)) and sum(zeros.values()) > 0
    assert skipped == 2 * sum(zeros.values()) * row  # an up row and a down row per zeroed neuron
    ort = generator(engine, "onnxruntime")
    saved = ort.traffic.weight_bytes - got.stats.weight_bytes_per_step
    assert 0 < saved < 2 * lay.num_layers * lay.intermediate_size * row
    dense, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    with one_torch_thread():
        r = generator(dense, "native").generate(prompt, 4, ignore_eos=True)
    assert generator(dense, "native").backend.skipped_bytes() == 0
    assert r.stats.weight_bytes_per_step == generator(dense, "onnxruntime").traffic.weight_bytes


def head_traffic(g: Generator, rows: int) -> int:
    """Bytes a screened step does not read of the fp32 head: V x D x (4 - 1) less the per-row scale and bound,
    less the fp32 rows recomputed."""
    lay = g.manifest.layout
    return lay.vocab_size * lay.hidden_size * 3 - lay.vocab_size * 8 - rows * lay.hidden_size * 4


@needs_cc
@pytest.mark.parametrize("kind,method,rho,target", CASES)
def test_screened_head_picks_the_full_heads_tokens(kind, method, rho, target, tmp_path_factory, tiny_model_dir):
    """Greedy steps on the default head (int8 screen + fp32 recomputation of the candidates) give the tokens of
    the full fp32 head, on every family and method (Gemma 2's final soft-cap included), and the report counts
    the head's bytes as read: the int8 copy, its scales and bounds, the recomputed rows. Top-k sampling with a
    seed gives the full head's samples (its candidates' logits are the same bits)."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method, target=target)
    prompt = prompt_ids(14, seed=3)[0].tolist()
    full = generator(engine, "native")
    screened = generator(engine, "native", head="screened")
    with one_torch_thread():
        want = full.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
        got = screened.generate(prompt, NEW, reselect_every=rho, ignore_eos=True)
    assert got.tokens == want.tokens
    b = screened.backend
    assert b.describe()["head"] == "screened" and 1 <= b.head_rows <= screened.manifest.layout.vocab_size
    cats = full.backend.skipped_bytes()  # the same last step, the same CATS rows skipped
    assert b.skipped_bytes() == cats + head_traffic(screened, b.head_rows)
    assert got.stats.weight_bytes_per_step < want.stats.weight_bytes_per_step
    # top-k sampling reads the screened top-k logits: the same samples as from the full head, same seed
    sampling = sampling_from(temperature=0.9, top_k=5, top_p=0.9, seed=11)
    with one_torch_thread():
        want_s = full.generate(prompt, NEW, sampling, reselect_every=rho, ignore_eos=True)
        got_s = screened.generate(prompt, NEW, sampling, reselect_every=rho, ignore_eos=True)
    assert got_s.tokens == want_s.tokens and len(set(got_s.tokens)) > 1
    # one more step by hand on both: where the screened logits are finite they are the full head's, bit for bit,
    # and the full head's 5 largest are among them
    token, slot = got_s.tokens[-1], len(prompt) + NEW - 1
    ref = full.backend.decode(token, slot).clone()
    top = b.decode_top(token, slot, 5).clone()
    finite = torch.isfinite(top)
    assert set(ref[0].topk(5).indices.tolist()) <= set(finite[0].nonzero()[:, 0].tolist())
    assert torch.equal(top[finite], ref[finite]) and finite.sum() == b.head_rows


def _defeat_the_screen(engine, dst, seed: int = 0):
    """A copy of `engine` whose LM head rows are one random row plus noise of 1e-3 (a third of the int8 step):
    the int8 copy cannot tell the rows apart, so nearly every row is a candidate and the fp32 pass decides."""
    import numpy as np

    moved = shutil.copytree(engine, dst)
    m = json.loads((moved / "manifest.json").read_text())
    e = m["weights"]["lm_head.weight"]
    V, D = e["shape"]
    w = np.memmap(moved / m["files"]["weights"], dtype=np.float32, mode="r+", offset=int(e["offset"]), shape=(V, D))
    rng = np.random.default_rng(seed)
    w[:] = rng.normal(0, 0.15, (1, D)) + rng.normal(0, 1e-3, (V, D))
    w.flush()
    del w
    return moved


@needs_cc
@pytest.mark.parametrize("method,rho,threads", [("dense", 0, 1), ("griffin", 8, 2)])
def test_greedy_steps_in_one_call_equal_one_at_a_time(method, rho, threads, tmp_path_factory, tiny_model_dir):
    """Greedy steps run in blocks by one kernel call (caprese_decode_n, NativeBackend.greedy_block) give the
    tokens, the per-step byte counts and the stop of steps run one call each: blocks end before each GRIFFIN
    re-selection, and at an end-of-sequence token, where the reply stops at the same place."""
    from caprese.runtime.backend import Backend

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    g = Generator.load(engine, backend="native", threads=threads, head="screened")
    b = g.backend
    assert b.greedy_block > 1
    prompt = prompt_ids(14, seed=3)[0].tolist()
    calls = []
    block_n = b.decode_greedy_n

    def counted(*a):
        out = block_n(*a)
        calls.append(len(out.tokens))
        return out

    def run(blocks: bool, eos=None):
        b.decode_greedy_n = counted if blocks else (lambda *a: Backend.decode_greedy_n(b, *a))
        saved = g.eos_ids
        g.eos_ids = eos if eos is not None else saved
        try:
            with one_torch_thread():
                r = g.stream(prompt, NEW, reselect_every=rho, ignore_eos=eos is None)
                list(r.tokens())
                return r.result, list(r._run.attended), list(r._run.skipped)
        finally:
            del b.decode_greedy_n
            g.eos_ids = saved

    one, one_att, one_skip = run(False)
    calls.clear()
    got, att, skip = run(True)
    assert got.tokens == one.tokens and att == one_att and skip == one_skip
    assert len(got.stats.step_ms) == len(got.tokens) - 1 and all(ms > 0 for ms in got.stats.step_ms)
    assert max(calls) > 1 and sum(calls) == len(att)  # blocks ran, and every decode step was in one
    if rho:
        assert max(calls) <= rho - 1  # a block never spans a re-selection
    stop = got.tokens[12]  # a reply that ends there: both ways stop after its first occurrence
    first = got.tokens.index(stop)
    assert first >= 2  # inside the decode steps, not at the prefill's token
    a = run(False, [stop])[0]
    calls.clear()
    b_ = run(True, [stop])[0]
    assert a.stop_reason == b_.stop_reason == "eos" and a.tokens == b_.tokens == got.tokens[:first]
    steps = b_.stats.tokens_generated - 1  # after the prefill's token, less the re-selections (prefills)
    steps -= sum(1 for i in range(steps) if rho and (i + 1) % rho == 0)
    assert sum(calls) == steps  # the kernel stopped at it: no step past it
    with pytest.raises(RuntimeError, match="past the KV cache"):
        b.decode_greedy_n(got.tokens[0], b.capacity - 2, 4, set())
    stream, seen = g.stream(prompt, NEW, ignore_eos=True), []  # stop() inside a block: no token after it
    for t in stream.tokens():
        seen.append(t)
        if len(seen) == 3:
            stream.stop()
    assert stream.result.stop_reason == "interrupted" and seen == got.tokens[:3]
    assert g.cached == prompt + got.tokens[:2]


@needs_cc
@pytest.mark.parametrize("temperature,top_k,top_p", ONE_ROW_CASES)
def test_kernel_sampler_matches_float64_reference(temperature, top_k, top_p):
    """The kernel's sampler (caprese_sample_logits, what caprese_decode_n draws with) follows the float64
    reference of tests/test_decoder_parity.py: support and frequencies."""
    import ctypes

    import numpy as np

    from test_decoder_parity import _PROBS, reference_filtered_probs

    lib = library.load()
    logits = np.log(_PROBS).astype(np.float32)
    want = reference_filtered_probs(np.log(_PROBS), temperature, top_k, top_p)
    n = 20_000
    us = np.random.default_rng(5).random(n)
    ptr = logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    toks = np.array([lib.caprese_sample_logits(ptr, len(logits), temperature, top_k, top_p, float(u)) for u in us])
    freq = np.bincount(toks, minlength=len(_PROBS)) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9)


@needs_cc
def test_kernel_sampler_top_p_reaches_past_the_first_candidates():
    """tests/test_decoder_parity.py's widening case (half the mass on one token, the rest over 100,000 tokens far
    below the first candidate threshold) on the kernel's sampler."""
    import ctypes

    import numpy as np

    from test_decoder_parity import top_p_widening_case

    lib = library.load()
    logits, want, kept, near_cut = top_p_widening_case()
    x = logits.astype(np.float32)
    ptr = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    n = 600
    toks = np.array([lib.caprese_sample_logits(ptr, len(x), 1.0, 0, 0.75, float(u))
                     for u in np.random.default_rng(6).random(n)])
    assert set(toks.tolist()) <= kept | near_cut and len(set(toks.tolist())) > n // 3  # the tail was reached
    assert abs(np.mean(toks == 7) - want[7]) < 5 * np.sqrt(want[7] * (1 - want[7]) / n)
    none = np.full(8, -np.inf, dtype=np.float32)  # nothing to sample: -1 (the step's "no finite logit")
    assert lib.caprese_sample_logits(none.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 8, 1.0, 0, 0.9, 0.5) == -1
    # a temperature that rounds to 0 in fp32 (Sampling refuses it; the kernel must not read before its buffer):
    # every positive logit / T is inf, inf - inf NaN, so top-p keeps nothing: -1, not c[-1]
    x3 = np.array([1.0, 2.0, -1.0, 3.0], dtype=np.float32)
    for top_k, top_p in ((0, 0.9), (2, 0.9)):
        assert lib.caprese_sample_logits(x3.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 4, 1e-46, top_k, top_p,
                                          0.5) == -1


@needs_cc
@pytest.mark.parametrize("method,rho,head", [("dense", 0, "screened"), ("griffin", 8, "full")])
def test_sampled_steps_in_one_call(method, rho, head, tmp_path_factory, tiny_model_dir):
    """Sampled steps run in blocks by one kernel call (caprese_decode_n): a seed gives the same reply twice
    and another seed another; top-k 1 gives the greedy reply (a screened head's top-k step on the dense engine, the
    full head's logits on GRIFFIN, re-selecting every 8 steps); blocks end at re-selections."""
    from caprese.model.sampling import Sampling

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", method)
    g = Generator.load(engine, backend="native", threads=2, head=head)
    b = g.backend
    calls, sample_n = [], b.decode_sample_n

    def counted(*a):
        out = sample_n(*a)
        calls.append(len(out.tokens))
        return out

    b.decode_sample_n = counted
    prompt = prompt_ids(14, seed=3)[0].tolist()
    s = Sampling(temperature=1.3, top_k=40, top_p=0.95, seed=11)
    with one_torch_thread():
        a = g.generate(prompt, NEW, s, reselect_every=rho, ignore_eos=True).tokens
        again = g.generate(prompt, NEW, s, reselect_every=rho, ignore_eos=True).tokens
        other = g.generate(prompt, NEW, Sampling(1.3, 40, 0.95, seed=12), reselect_every=rho, ignore_eos=True).tokens
        greedy = g.generate(prompt, NEW, reselect_every=rho, ignore_eos=True).tokens
        top1 = g.generate(prompt, NEW, Sampling(0.7, 1, 1.0, seed=3), reselect_every=rho, ignore_eos=True).tokens
    assert a == again and a != other and a != greedy and top1 == greedy
    assert max(calls) > 1 and (not rho or max(calls) <= rho - 1)


@needs_cc
@pytest.mark.parametrize("isa", ISAS)  # the int8 rows: AVX-512, AVX2 intrinsics, the plain loop
@pytest.mark.parametrize("threads", [1, 5])
def test_screened_head_when_the_int8_copy_cannot_decide(threads, isa, tmp_path_factory, tiny_model_dir, tmp_path):
    """Head rows closer together than the int8 step: the screen keeps most rows as candidates and only the
    fp32 recomputation can pick the token. Greedy and top-k sampled tokens must still be the full head's, and
    the int8 copy's own argmax (from the reference decoder's hidden states, float64) is wrong in most steps, so
    a kernel that picked by the screening values would fail here."""
    import numpy as np

    from caprese.model import load_decoder
    from caprese.runtime.backend import Backend

    src = tiny_model_dir("llama")
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    engine = _defeat_the_screen(engine, tmp_path / "engine")
    prompt = prompt_ids(14, seed=5)[0].tolist()
    full = Generator.load(engine, backend="native", threads=threads, head="full", isa=isa)
    screened = Generator.load(engine, backend="native", threads=threads, head="screened", isa=isa)
    b = screened.backend
    rows, decode_greedy = [], b.decode_greedy

    def record(token, slot):
        out = decode_greedy(token, slot)
        rows.append(b.head_rows)
        return out

    b.decode_greedy = record
    b.decode_greedy_n = lambda *a: Backend.decode_greedy_n(b, *a)  # a step at a time, each step's rows recorded
    top_k = sampling_from(temperature=1.0, top_k=20, seed=7)
    with one_torch_thread():
        want = full.generate(prompt, 24, ignore_eos=True)
        got = screened.generate(prompt, 24, ignore_eos=True)
        want_s = full.generate(prompt, 24, top_k, ignore_eos=True)
        got_s = screened.generate(prompt, 24, top_k, ignore_eos=True)
    V = screened.manifest.layout.vocab_size
    print(f"candidate rows per step: min {min(rows)}, mean {sum(rows) / len(rows):.0f} of {V}")
    assert got.tokens == want.tokens and got_s.tokens == want_s.tokens
    assert min(rows) > V // 4
    dec = load_decoder(src, "fp32").double()
    dec.setup_caches(1, len(prompt) + len(want.tokens))
    with torch.no_grad():
        h = dec.hidden_states(torch.tensor([prompt + want.tokens[:-1]]), 0)[0, len(prompt):].numpy()
    w = b.arena[b.manifest.spec.head].astype(np.float64)
    int8 = (b._head_q.astype(np.float64) * b._head_scale.astype(np.float64)[:, None]) @ h.T
    assert ((w @ h.T).argmax(0) == np.array(want.tokens[1:])).all()  # h is the engine's
    assert (int8.argmax(0) != np.array(want.tokens[1:])).sum() >= len(rows) // 2


@needs_cc
@pytest.mark.parametrize("isa", ISAS)
def test_hidden_size_not_a_multiple_of_the_vector_width(isa, tmp_path, monkeypatch):
    """Hidden size 76 and FFN size 140 (not multiples of 8 or 16): the vector loops' scalar tails (AVX-512 and
    AVX2), in the products and in the screened head, give ONNX Runtime's logits and the full head's tokens."""
    import tiny_models

    from caprese.export.exporter import export

    monkeypatch.setitem(tiny_models.CONFIGS, "llama76", ("llama", dict(
        hidden_size=76, intermediate_size=140, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=24, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    model = tiny_models.make_tiny_model("llama76", tmp_path / "model")
    engine = export(model, tmp_path / "engine", max_seq_len=64, max_prompt_len=63).out
    prompt = prompt_ids(14, seed=6)[0].tolist()
    ref, ref_logits = recorded(generator(engine, "onnxruntime"), prompt, 0)
    got, got_logits = recorded(generator(engine, "native", threads=5, isa=isa), prompt, 0)
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=RTOL)
    with one_torch_thread():
        screened = generator(engine, "native", threads=5, head="screened", isa=isa).generate(prompt, NEW,
                                                                                            ignore_eos=True)
    assert screened.tokens == got.tokens == ref.tokens


def test_quantized_head_bound_holds_in_float64():
    """The stored bound covers |W_v . h - s_v (q_v . h)| for random h (float64 reference), rows with an outlier
    and an all-zero row included, and is the formula's value (not an arbitrary slack): within 0.2% + the
    rounding term of |e_v|_2."""
    import numpy as np

    from caprese.runtime.native.screened_head import U, quantize_head

    rng = np.random.default_rng(0)
    V, D = 1000, 96
    w = rng.normal(0, 0.05, (V, D)).astype(np.float32)
    w[7, 3] = 4.0  # an outlier: a coarse int8 step for row 7
    w[11] = 0.0
    q, s, bound = quantize_head(w, chunk=256)  # several chunks
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127 and bound.dtype == np.float32
    sq = q.astype(np.float64) * s.astype(np.float64)[:, None]
    err = np.linalg.norm(w.astype(np.float64) - sq, axis=1)
    assert np.all(np.abs(w - sq) <= s[:, None].astype(np.float64) / 2 * (1 + 1e-6))
    assert bound[11] == 0.0 and bound[7] > 10 * np.median(bound)
    gamma = (D + 2) * U / (1 - (D + 2) * U)
    slack = 2 * gamma * (np.linalg.norm(sq, axis=1) + np.linalg.norm(w.astype(np.float64), axis=1))
    assert np.all(bound >= err) and np.all(bound <= (err + slack) * 1.002 + 1e-12)
    for _ in range(20):
        h = rng.normal(0, 3, D) * (rng.random(D) < 0.9)
        exact = w.astype(np.float64) @ h
        approx = sq @ h
        assert np.all(np.abs(exact - approx) <= np.linalg.norm(h) * bound)


@needs_cc
def test_native_refusals_are_one_line(tmp_path_factory, tiny_model_dir, tmp_path):
    fp16, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense", precision="fp16")
    with pytest.raises(CapreseError, match="fp32") as e:
        Generator.load(fp16, backend="native")
    assert "\n" not in str(e.value)
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    with pytest.raises(CapreseError, match="runs on the CPU"):
        Generator.load(engine, backend="native", device="cuda")
    moved = shutil.copytree(engine, tmp_path / "engine")
    data = json.loads((moved / "manifest.json").read_text())
    del data["weights"]["model.layers.1.self_attn.o_proj.weight.t"]
    (moved / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CapreseError, match="has no model.layers.1.self_attn.o_proj.weight.t") as e:
        Generator.load(moved, backend="native")
    assert "\n" not in str(e.value)


def test_kernel_build_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    """No compiler, or a compiler that fails: a one-line error naming the way out, no file left in the cache."""
    monkeypatch.setenv("CAPRESE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(library, "_LOADED", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(CapreseError, match="does not run") as e:
        library.load()
    assert "\n" not in str(e.value) and "--backend onnxruntime" in str(e.value)
    with pytest.raises(CapreseError, match="does not run") as e:  # build() alone (tools/ab_quant_gemv.py's way)
        library.build(tmp_path / "cache" / "alone.so")
    assert "\n" not in str(e.value) and not list((tmp_path / "cache").rglob("*.so*"))
    fake = tmp_path / "fake-cc"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo fake-cc 1.0; exit 0; fi\n'
                    'echo "decode_step.c:1:1: error: no such luck" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(CapreseError, match="failed: decode_step.c:1:1: error: no such luck") as e:
        library.load()
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / "native").iterdir())
    assert library._LOADED == {}


@needs_cc
def test_kernel_is_built_once_per_source_and_machine(tmp_path, monkeypatch):
    """The first load compiles into the cache (atomically); a second process's load reuses it."""
    monkeypatch.setenv("CAPRESE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(library, "_LOADED", {})
    path = library.library_path()
    assert not path.exists() and library.best_isa() in path.name
    lib = library.load()
    assert path.exists() and lib.isa == library.best_isa() and lib.path == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    monkeypatch.setattr(library, "_LOADED", {})
    mtime = path.stat().st_mtime_ns
    library.load()
    assert path.stat().st_mtime_ns == mtime
    # a damaged file at the cache path (by hand: builds are renamed into place) is a one-line error; it is a
    # new path here, because dlopen hands back the library already loaded from `path`
    damaged = path.with_name("decode_step-damaged.so")
    damaged.write_bytes(b"not a shared object")
    monkeypatch.setattr(library, "_LOADED", {})
    monkeypatch.setattr(library, "library_path", lambda isa=None, source=library.SOURCE: damaged)
    with pytest.raises(CapreseError, match="delete it to rebuild") as e:
        library.load()
    assert "\n" not in str(e.value)


def _mirror(name: str, fields):
    return type(name, (ctypes.Structure,), {"_fields_": fields})


@needs_cc
def test_ctypes_mirror_is_checked_against_the_compiled_layout():
    """The library reports every struct's size and each field's offset and size; the mirrors match them, and a
    mirror with a field missing, added, of another size or moved is refused with one line naming the field."""
    lib = library.load()
    compiled = library.compiled_layout(lib)
    assert set(compiled) == {"Mat", "QMat", "Layer", "Model"}
    for cls in library.MIRRORS:
        assert compiled[cls.__name__][""][1] == ctypes.sizeof(cls)
        assert {f for f in compiled[cls.__name__] if f} == {f[0] for f in cls._fields_}
    library.check_layout(lib, lib.path)  # the real mirrors pass
    model = list(library.Model._fields_)
    i64, f32 = ctypes.c_int64, ctypes.c_float
    wrong = {
        "missing": (model[:-1], f"Model.{model[-1][0]} is missing from the mirror"),
        "added": (model + [("extra", i64)], "Model.extra is not in the compiled struct"),
        "resized": ([("num_layers", ctypes.c_int32)] + model[1:], "Model.num_layers is at offset 0 (size 4)"),
        "moved": ([model[1], model[0]] + model[2:], "Model.num_layers is at offset 8 (size 8) in the mirror and 0"),
        "float for int": (model[:10] + [("eps", i64)] + model[11:], "Model.eps is at offset 80 (size 8)"),
    }
    assert f32  # the real eps is a float
    for why, (fields, needle) in wrong.items():
        with pytest.raises(CapreseError, match="does not match its ctypes mirror") as e:
            library.check_layout(lib, lib.path, mirrors=(library.Mat, library.Layer, _mirror("Model", fields)))
        assert needle in str(e.value) and "\n" not in str(e.value), why
    with pytest.raises(CapreseError, match="has no struct Extra"):
        library.check_layout(lib, lib.path, mirrors=(_mirror("Extra", [("a", i64)]),))


def test_isa_choice_and_refusals(monkeypatch):
    """CAPRESE_NATIVE_ISA / isa= pick the build; an unknown name, or an instruction set this CPU lacks, is a
    one-line error; each ISA has its own flags (scalar: no vectorizer, no -march=native)."""
    monkeypatch.delenv(library.ISA_ENV, raising=False)
    monkeypatch.setattr(library, "X86", True)
    monkeypatch.setattr(library, "_cpu_flags", lambda: "flags : fpu sse2 avx avx2 fma")
    assert library.best_isa() == "avx2" and library.resolve_isa() == "avx2"
    monkeypatch.setenv(library.ISA_ENV, "scalar")
    assert library.resolve_isa() == "scalar" and library.resolve_isa("avx2") == "avx2"
    for isa, needle in (("avx512", "no AVX-512"), ("sse9", "unknown native instruction set"),
                        ("native", "for non-x86 CPUs")):
        with pytest.raises(CapreseError, match=needle) as e:
            library.resolve_isa(isa)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(library, "_cpu_flags", lambda: "flags : fpu sse2")
    assert library.best_isa() == "scalar"
    with pytest.raises(CapreseError, match="no AVX2"):
        library.resolve_isa("avx2")
    monkeypatch.setattr(library, "_cpu_flags", lambda: "flags : fpu avx2 fma avx512f")
    assert library.best_isa() == "avx512"
    assert "-mno-avx512f" in library.isa_flags("avx2") and "-march=native" in library.isa_flags("avx512")
    scalar = library.isa_flags("scalar")
    assert "-fno-tree-vectorize" in scalar and "-march=native" not in scalar and "-fopenmp-simd" not in scalar
    monkeypatch.setattr(library, "X86", False)
    assert library.best_isa() == "native"
    with pytest.raises(CapreseError, match="x86-64 instruction set"):
        library.resolve_isa("avx2")


def _steps(g: Generator, prompt: list[int], n: int):
    """(logits [n, V] of n full-head decode steps after a prefill, seconds they took)."""
    with one_torch_thread():
        g.generate(prompt, 1, ignore_eos=True)  # prefill; the cache now holds the prompt
    b, out = g.backend, []
    t0 = time.perf_counter()
    for i in range(n):
        out.append(b.decode(7 + i, len(prompt) + i).clone())
    return torch.cat(out), time.perf_counter() - t0


@needs_cc
@pytest.mark.parametrize("kind,method", [("llama", "griffin"), ("qwen2", "cats"), ("gemma2", "dense")])
def test_any_thread_count_gives_the_same_bits(kind, method, tmp_path_factory, tiny_model_dir):
    """A chunk's arithmetic depends only on its index and parts are added in chunk order: 1, 2 and 3 threads
    give bit-identical logits. The calling thread pauses 0.2 ms in every third chunk it runs, so that on these
    tiny shapes (a chunk is a microsecond) the helpers take part, from their own ranges and from the caller's."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, kind, method)
    prompt = prompt_ids(14, seed=7)[0].tolist()
    ref, _ = _steps(Generator.load(engine, backend="native", threads=1, head="full"), prompt, 12)
    for threads in (2, 3):
        g = Generator.load(engine, backend="native", threads=threads, head="full")
        g.backend.lib.caprese_context_debug_stall(g.backend._ctx, 0, 3, 200)
        got, _ = _steps(g, prompt, 12)
        assert torch.equal(got, ref), threads
        assert g.backend.kernel_stats()["helper_chunks"] > 0  # the helpers did take part


@needs_cc
def test_a_stalled_helper_does_not_stall_the_step(tmp_path_factory, tiny_model_dir):
    """A helper that sleeps 40 ms inside every chunk it runs (what a descheduled thread looks like): the calling
    thread runs those chunks again instead of waiting, the late copies are dropped, and the logits are the same
    bits as one thread's. Waiting would cost 40 ms per stalled chunk (and commit the helper's runs)."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    prompt = prompt_ids(14, seed=8)[0].tolist()
    ref, _ = _steps(Generator.load(engine, backend="native", threads=1, head="full"), prompt, 16)
    g = Generator.load(engine, backend="native", threads=2, head="full")
    b = g.backend
    stall = b.lib.caprese_context_debug_stall
    with one_torch_thread():
        g.generate(prompt, 1, ignore_eos=True)
    stall(b._ctx, 0, 1, 300)  # first step: the caller pauses in its chunks, so the helper surely takes one
    stall(b._ctx, 1, 1, 40000)
    first = b.decode(7, len(prompt)).clone()
    stall(b._ctx, 0, 0, 0)
    rest = []
    t0 = time.perf_counter()
    for i in range(1, 16):
        rest.append(b.decode(7 + i, len(prompt) + i).clone())
    seconds = time.perf_counter() - t0
    stall(b._ctx, 1, 0, 0)
    b.lib.caprese_context_quiesce(b._ctx)  # the helper is back from its last stall
    st = b.kernel_stats()
    print(f"stalled helper: {seconds * 1e3:.1f} ms for 15 steps, {st}")
    assert torch.equal(torch.cat([first, *rest]), ref)
    assert st["rerun_chunks"] > 0 and st["dropped_runs"] > 0
    assert seconds < 0.040  # not one 40 ms stall waited for


@needs_cc
def test_helpers_switched_off_leave_the_work_to_the_caller(tmp_path_factory, tiny_model_dir):
    """caprese_context_set_active(1): the helpers sleep, the calling thread runs every chunk, same bits."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    prompt = prompt_ids(14, seed=9)[0].tolist()
    g = Generator.load(engine, backend="native", threads=2, head="full")
    b = g.backend
    ref, _ = _steps(g, prompt, 6)
    b.lib.caprese_context_set_active(b._ctx, 1)
    before = b.kernel_stats()
    got, _ = _steps(g, prompt, 6)
    after = b.kernel_stats()
    assert torch.equal(got, ref)
    assert after["helper_chunks"] == before["helper_chunks"] and after["leader_chunks"] > before["leader_chunks"]


@needs_cc
def test_without_a_count_the_working_threads_follow_the_load(tmp_path_factory, tiny_model_dir, monkeypatch):
    """threads=None: a pool of one thread per usable CPU, of which as many work as cpu_threads' policy finds free,
    re-read as the steps run (here every step); 1 working thread runs every chunk itself, 2 share them, and the
    logits are the same bits. An explicit count is not retuned."""
    from caprese import cpu_threads

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    prompt = prompt_ids(14, seed=9)[0].tolist()
    monkeypatch.setattr(cpu_threads, "_pinned", None)  # the conftest pins 1
    for var in ("CAPRESE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu_threads.FollowLoad, "RETUNE_S", 0.0)
    free = [2]
    monkeypatch.setattr(cpu_threads, "default_threads", lambda: free[0])
    g = Generator.load(engine, backend="native", head="full")
    b = g.backend
    d = b.describe()
    assert (d["threads"], d["pool_threads"], d["threads_follow_load"]) == (2, 2, True)
    ref, _ = _steps(g, prompt, 6)
    assert _helper_runs(g, prompt, 0)
    free[0] = 1  # a busy process took a CPU
    before = b.kernel_stats()
    got, _ = _steps(g, prompt, 6)
    after = b.kernel_stats()
    assert b.describe()["threads"] == 1 and torch.equal(got, ref)
    assert after["helper_chunks"] == before["helper_chunks"] and after["leader_chunks"] > before["leader_chunks"]
    free[0] = 2  # it stopped
    assert _helper_runs(g, prompt, after["helper_chunks"]) and b.describe()["threads"] == 2
    free[0] = 1
    fixed = Generator.load(engine, backend="native", threads=2, head="full")
    assert _helper_runs(fixed, prompt, 0)
    d = fixed.backend.describe()
    assert (d["threads"], d["threads_follow_load"]) == (2, False)


def _helper_runs(g: Generator, prompt: list[int], before: int, tries: int = 20) -> bool:
    """Whether the pool's helper commits chunks past `before` within `tries` runs of 6 steps: on a machine busy
    with other work (the suite's other tests) the leader can take every chunk of a few tiny steps itself."""
    for _ in range(tries):
        _steps(g, prompt, 6)
        if g.backend.kernel_stats()["helper_chunks"] > before:
            return True
    return False


@needs_cc
def test_kernel_profile_counts_every_phase_of_a_step(tmp_path_factory, tiny_model_dir, tmp_path, monkeypatch):
    """kernel_profile(): one entry per phase kind a dense step runs (QKV, attention + o, gate/up, down per layer;
    the full head once), their counts per step, a step time that holds them, and a reset that zeroes it. The
    load-time head probe (forced: an empty choice cache) runs head phases that are not decode steps: not counted."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "qwen2", "dense")
    prompt = prompt_ids(14, seed=10)[0].tolist()
    monkeypatch.setattr("caprese.model.default_model.cache_root", lambda: tmp_path)
    probed = Generator.load(engine, backend="native", threads=2, head="auto").backend
    assert probed.kernel_stats()["phases"] > 0  # the probe ran
    assert probed.kernel_profile() == {"steps": 0, "step_us": 0.0, "phases_us": {}, "phases_per_step": 0.0,
                                       "between_phases_us": 0.0}
    g = Generator.load(engine, backend="native", threads=2, head="full")
    b = g.backend
    with one_torch_thread():
        g.generate(prompt, 1, ignore_eos=True)
    b.kernel_profile(reset=True)
    for i in range(5):
        b.decode(7 + i, len(prompt) + i)
    p = b.kernel_profile(reset=True)
    layers = b.layout.num_layers
    print(p)
    assert p["steps"] == 5 and p["phases_per_step"] == 4 * layers + 1
    assert set(p["phases_us"]) == {"qkv", "attention+o", "gate_up", "down", "head_full"}
    assert all(v > 0 for v in p["phases_us"].values()) and p["between_phases_us"] >= 0
    assert b.kernel_profile()["steps"] == 0


def test_head_choice_by_probe_is_cached(tmp_path):
    """The probe alternates the two heads and keeps the screened one only if it is strictly faster (a fake
    clock makes the timings exact); the choice is cached per key and read back without probing; a damaged
    cache is measured again; nothing temporary is left."""
    def fake(full_ms: float, screened_ms: float):
        now, calls = [0.0], []

        def clock():
            return now[0]

        def full():
            calls.append("full")
            now[0] += full_ms / 1e3

        def screened():
            calls.append("screened")
            now[0] += screened_ms / 1e3
            return 3
        return clock, full, screened, calls

    clock, full, screened, calls = fake(4.0, 1.0)
    assert head_choice.probe(full, screened, repeats=5, clock=clock) == (pytest.approx(1.0), pytest.approx(4.0), 3)
    assert calls == ["full", "screened"] * 6  # one warm-up each, then alternating
    for (f, sc), want in (((4.0, 1.0), "screened"), ((1.0, 4.0), "full"), ((2.0, 2.0), "full")):
        clock, full, screened, calls = fake(f, sc)
        got = head_choice.choose(f"k{f}{sc}", full, screened, tmp_path, clock=clock)
        assert (got.head, got.source, got.rows) == (want, "measured", 3) and calls
        clock, full, screened, calls = fake(f, sc)
        again = head_choice.choose(f"k{f}{sc}", full, screened, tmp_path, clock=clock)
        assert (again.head, again.source, again.screened_ms, again.full_ms) == (want, "cached", sc, f)
        assert calls == []
        assert want in again.describe() and "cached" in again.describe()
    assert [p.name for p in tmp_path.iterdir()] == [head_choice.FILE]
    (tmp_path / head_choice.FILE).write_text("{not json")
    clock, full, screened, calls = fake(4.0, 1.0)
    assert head_choice.choose("k", full, screened, tmp_path, clock=clock).source == "measured"
    assert json.loads((tmp_path / head_choice.FILE).read_text())["k"]["head"] == "screened"


@needs_cc
def test_auto_head_is_the_probes_choice_and_reported(tmp_path_factory, tiny_model_dir, tmp_path, monkeypatch):
    """head="auto" (the default) times both heads on this CPU once, caches the result under $CAPRESE_CACHE, runs
    the faster one and reports it; the screened head's int8 copy is dropped when the full head wins."""
    monkeypatch.setenv("CAPRESE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(library, "_LOADED", {})
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    b = Generator.load(engine, backend="native", threads=2).backend
    d = b.describe()
    assert d["head"] in ("screened", "full") and d["head"] == b.head_choice.head
    assert d["head_choice"].startswith(d["head"]) and "measured" in d["head_choice"] and d["isa"] == b.lib.isa
    assert (b._model.head_q is None) == (d["head"] == "full")
    cached = json.loads((tmp_path / "cache" / "native" / head_choice.FILE).read_text())
    assert [k for k in cached if k.startswith(b.kernel.name)] and b.head_choice.source == "measured"
    again = Generator.load(engine, backend="native", threads=2).backend
    assert again.head == b.head and again.head_choice.source == "cached"
    for forced in ("screened", "full"):
        assert Generator.load(engine, backend="native", head=forced).backend.describe()["head"] == forced
    with pytest.raises(CapreseError, match="head must be one of auto, screened, full"):
        Generator.load(engine, backend="native", head="int8")


@needs_cc
def test_cli_generate_on_native(tmp_path_factory, tiny_model_dir, monkeypatch, capsys):
    from caprese.cli.main import main as caprese_main

    from caprese.runtime import native_backend

    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    # the default head is the load-time probe's choice: made "screened" here, so the bytes below differ
    monkeypatch.setattr(native_backend, "choose",
                        lambda key, full, screened, folder: head_choice.HeadChoice("screened", 1.0, 2.0, 1, "cached"))
    args = ["generate", engine, "-p", "the cat sat", "-n", "8", "--json"]
    rc, out, err = run_cli(caprese_main, [*args, "--backend", "native"], monkeypatch, capsys)
    assert rc == 0, err
    got = json.loads(out)
    rc, out, err = run_cli(caprese_main, [*args, "--backend", "onnxruntime"], monkeypatch, capsys)
    ref = json.loads(out)
    assert got["backend"] == "native" and got["text"] == ref["text"]
    rc, out, err = run_cli(caprese_main, [*args, "--backend", "native", "--device", "cuda"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "runs on the CPU")
    # --full-head: every logit in fp32 (the same text here); refused where it means nothing
    run = ["run", engine, "-p", "the cat sat", "-n", "8", "--json"]
    rc, out, err = run_cli(caprese_main, [*run, "--backend", "native", "--full-head"], monkeypatch, capsys)
    assert rc == 0, err
    full = json.loads(out)
    assert full["head"] == "full" and got["head"] == "screened" and full["text"] == ref["text"]
    assert got["head_choice"].startswith("screened (probe on this CPU") and got["isa"] == library.best_isa()
    assert full["bytes_per_step"] > got["bytes_per_step"]
    rc, out, err = run_cli(caprese_main, [*run, "--backend", "onnxruntime", "--full-head"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "--full-head applies to --backend native")


@needs_cc
def test_a_closed_backend_refuses_calls(tmp_path_factory, tiny_model_dir):
    """After close() the kernel's context is gone: a step, the thread count and the stats say so in Python
    instead of handing the C side a NULL context (a segfault)."""
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = Generator.load(engine, backend="native", threads=2, head="full")
    assert g.generate(prompt_ids(6)[0].tolist(), 3, ignore_eos=True).tokens
    g.backend.close()
    g.backend.close()  # twice: nothing
    for call in (lambda: g.generate(prompt_ids(6)[0].tolist(), 3, ignore_eos=True), g.backend.kernel_stats,
                 g.backend.kernel_profile, lambda: g.backend._set_active(1)):
        with pytest.raises(CapreseError, match="native backend was closed; load the engine again"):
            call()
