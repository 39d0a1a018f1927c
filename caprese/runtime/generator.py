"""Generator: text in, text out, on an engine folder from `caprese-export`, with any backend.

    from caprese.runtime import Generator
    g = Generator.load("engine_dir", backend="onnxruntime")
    r = g.generate("What is 12 + 7?", chat=True, max_new_tokens=64)
    print(r.text, r.stats.ms_per_token, r.stats.gb_per_s)
    for piece in g.stream("Tell me a story", chat=True):
        print(piece, end="", flush=True)

The loop (batch 1): prefill the prompt (chunks of at most max_prompt_len) -> combine the selection statistics
(GRIFFIN top-k / CATS τ) -> fill the decode inputs -> decode steps with the KV cache updated in place ->
every ρ steps (reselect_every) the last ρ tokens run through the prefill graph at their slots, their
statistics are added and the selection refolded -> stop on EOS or max_new_tokens. It is the same loop as
caprese.model.generation.generate, so greedy tokens match the PyTorch reference.

The Generator remembers which tokens its KV cache holds; `Conversation` (caprese.runtime.conversation) uses
that to reuse the cache across chat turns. generate() and stream() always start from slot 0.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.manifest import load_manifest
from caprese.model.run_options import RunOptions
from caprese.model.sampling import Sampling, check_sampling
from caprese.model.text_model import TextResult
from caprese.model.tokenizer import IncrementalDecoder, load_tokenizer, prompt_ids, stop_ids, user_prompt_ids
from caprese.runtime.backend import open_backend
from caprese.runtime.decode_policy import DecodePolicy
from caprese.runtime.engine_options import AUTO, EngineOptions, choose_backend
from caprese.runtime.selection import PROMPT, RESELECT, Chunk, SelectionState
from caprese.runtime.stats import RuntimeStats, peak_rss_mb
from caprese.runtime.traffic import decode_traffic


@dataclasses.dataclass
class RuntimeResult(TextResult):
    """TextResult (the reference decoder's result type) with RuntimeStats; stop_reason also "context" (the
    engine's max_seq_len) or "interrupted"."""

    stats: RuntimeStats


def method_label(manifest) -> str:
    """What the engine runs, in the words `caprese generate` uses: dense, caprese(griffin, d=0.5, r=8), ...; a
    quantized engine adds its weights: "dense int4/32", "caprese(griffin, d=0.5, r=8) int8/row", and "+a8" when its
    products take int8 activations (--int8-activations)."""
    r = manifest.spec.recipe
    if r.method == C.DENSE:
        label = "dense"
    elif r.rank:
        label = f"caprese({r.method}, d={r.density}, r={r.rank})"
    else:
        label = f"{r.method}(d={r.density}, layers={','.join(map(str, r.layers))})"
    q = r.weights
    if q is None:
        return label
    return f"{label} int{q.bits}/{q.block_size or 'row'}" + ("+a8" if q.accuracy_level == 4 else "")


class _Run:
    """Bookkeeping of one generation: what was produced, when, and why it stopped."""

    def __init__(self, g: "Generator", ids: list[int], start: int, eos: set):
        self.g, self.ids, self.start, self.eos = g, ids, start, eos
        self.produced: list[int] = []
        self.ttft_ms = float("nan")
        self.step_ms: list[float] = []
        self.attended: list[int] = []
        self.skipped: list[int] = []  # weight bytes each decode step did not read
        self.stop_reason: str | None = None
        self.stop_requested = False  # set from a signal handler: the loop ends after the current step

    def result(self) -> RuntimeResult:
        g = self.g
        tokens = [t for t in self.produced if t not in self.eos]
        b = g.backend
        slots = statistics.fmean(self.attended) if self.attended else 0.0
        skipped = round(statistics.fmean(self.skipped)) if self.skipped else 0
        stats = RuntimeStats(prompt_tokens=len(self.ids), tokens_generated=len(self.produced),
                             ttft_ms=self.ttft_ms, step_ms=list(self.step_ms), batch=1, backend=b.name,
                             backend_requested=g.backend_requested,
                             device=b.device, reused_tokens=self.start, prefill_tokens=len(self.ids) - self.start,
                             kv_slots=b.capacity, weight_bytes_per_step=g.traffic.weight_bytes - skipped,
                             kv_bytes_per_step=g.traffic.kv_bytes(slots), peak_rss_mb=peak_rss_mb(),
                             peak_device_mb=b.peak_device_mb())
        text = g.tokenizer.decode(tokens, skip_special_tokens=True)
        return RuntimeResult(text, tokens, self.stop_reason or "interrupted", stats)


class TextStream:
    """Iterate for text pieces as they form; `.result` (a RuntimeResult) is ready once iteration ends (or
    after close(), for a reply stopped early: stop_reason "interrupted")."""

    def __init__(self, g: "Generator", run: _Run, tokens: Iterator[int],
                 on_finish: Callable[[RuntimeResult], None] | None = None):
        self._run, self._tokens, self._on_finish = run, tokens, on_finish
        self._detok = IncrementalDecoder(g.tokenizer)
        self.result: RuntimeResult | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for token in self._tokens:
                piece = self._detok.push(token)
                if piece:
                    yield piece
            rest = self._detok.flush()
            if rest:
                yield rest
        finally:
            self.close()

    def tokens(self) -> Iterator[int]:
        """Iterate for token ids instead of text."""
        try:
            yield from self._tokens
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the generation to end after the step in progress (safe from a signal handler)."""
        self._run.stop_requested = True

    def close(self) -> RuntimeResult:
        if self.result is None:
            self._tokens.close()
            self.result = self._run.result()
            if self._on_finish is not None:
                self._on_finish(self.result)
        return self.result

    def consume(self, on_text: Callable[[str], None] | None = None) -> RuntimeResult:
        if on_text is None:  # nobody reads the pieces: skip incremental detokenisation (~0.1 ms a token);
            for _ in self.tokens():  # the result decodes the whole reply once
                pass
            return self.close()
        for piece in self:
            on_text(piece)
        return self.close()


class Generator:
    """One engine folder on one backend: the prefill + decode loop, its KV cache and GRIFFIN / CATS selections, the
    tokenizer, and a latency report per reply. Open one with Generator.load / Generator.open."""

    def __init__(self, manifest, backend, tokenizer):
        self.manifest, self.backend, self.tokenizer = manifest, backend, tokenizer
        self.layout: C.GraphLayout = manifest.layout
        self.max_seq_len = manifest.spec.max_seq_len
        self.max_prompt_len = manifest.spec.max_prompt_len
        self.eos_ids = stop_ids(manifest.model.eos_token_ids, tokenizer)
        self.traffic = decode_traffic(manifest)
        self.label = method_label(manifest)
        self.approximated = any(k != C.DENSE for k in self.layout.layer_kinds)
        self.selection = SelectionState()
        self.cached: list[int] = []  # the tokens whose K/V fill slots 0..len-1 of the backend's cache
        self.backend_requested = backend.name  # "auto" when open()/load() chose the backend
        self.backend_reason = ""  # why auto chose it

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = AUTO, threads: int | None = None,
             **options) -> "Generator":
        """Open ENGINE_DIR (manifest validated) on `backend`: "auto" (the default, as the CLI's: the fastest this
        engine and machine allow, caprese.runtime.engine_options; `backend_reason` says why), "onnxruntime",
        "native", "torch" or "tensorrt".

        options go to the backend (another backend's option is refused by name):
        - every backend: device ("cpu" / "cuda"; torch: "cuda:N" too);
        - kv_policy ("fit" / "max" / a slot count): onnxruntime, native, tensorrt;
        - onnxruntime: share_weights (one copy of the weights for both sessions), spinning (its pool's spin-wait);
        - torch: source / base_model (where the reference model is), static (a static KV cache), cuda_graph;
        - tensorrt: cuda_graph (decode steps replayed from CUDA graphs);
        - native: head ("auto" / "screened" / "full": whether greedy and top-k steps screen the LM head; auto, the
          default: where a probe at load found it faster), isa ("avx512" / "avx2" / "scalar" / "native": the
          kernel build; default: the CPU's widest, or $CAPRESE_NATIVE_ISA),
          int8_down (an --int8-activations engine: GRIFFIN's down rows with int8 coefficients, not 16-bit ones;
          off by default: its error is the largest)."""
        return cls._on(load_manifest(engine_dir), backend, threads, lambda name: options, options.get("device"))

    @classmethod
    def open(cls, engine_dir: str | Path, options: EngineOptions = EngineOptions()) -> "Generator":
        """load() with the options as one object (what `caprese run` / `chat` build from their flags; its
        backend defaults to "auto")."""
        return cls._on(load_manifest(engine_dir), options.backend, options.threads, options.backend_options,
                       options.device)

    @classmethod
    def _on(cls, manifest, backend: str, threads: int | None, options_for: Callable[[str], dict],
            device: str | None) -> "Generator":
        name, why = choose_backend(manifest, device) if backend == AUTO else (backend, "")
        g = cls(manifest, open_backend(name, manifest, threads, **options_for(name)), load_tokenizer(manifest.folder))
        g.backend_requested, g.backend_reason = backend, why
        return g

    def run(self, prompt: str | list[int], options: RunOptions = RunOptions(),
            on_text: Callable[[str], None] | None = None) -> RuntimeResult:
        """generate() with its options as one object (what `caprese run` builds from its flags)."""
        return self.generate(prompt, **options.kwargs(), on_text=on_text)

    # ---- text ----
    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        return user_prompt_ids(self.tokenizer, prompt, chat, system)

    def _ids(self, prompt, chat: bool, system: str | None) -> list[int]:
        if isinstance(prompt, (list, tuple)):
            return list(prompt)  # checked by stream_ids
        return self.encode(prompt, chat, system)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                 chat: bool = False, system: str | None = None, reselect_every: int = 0,
                 ignore_eos: bool = False, on_text: Callable[[str], None] | None = None) -> RuntimeResult:
        """Reply to `prompt` (text, or token ids used as they are); the arguments are RunOptions' fields, in its
        order (TextModel.generate takes the same); `on_text` receives text pieces as they form."""
        return self.stream(prompt, max_new_tokens, sampling, chat, system, reselect_every,
                           ignore_eos).consume(on_text)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
               chat: bool = False, system: str | None = None, reselect_every: int = 0,
               ignore_eos: bool = False) -> TextStream:
        """generate() as it runs: iterate the TextStream for text pieces (or .tokens() for ids); .consume() or
        .close() returns the RuntimeResult (closed early: stop_reason "interrupted"); .stop() ends it after the
        step in progress."""
        ids = self._ids(prompt, chat, system)
        if len(ids) >= self.max_seq_len:
            raise CapreseError(f"the prompt ({len(ids)} tokens) leaves no room in the engine's max_seq_len of "
                               f"{self.max_seq_len}; shorten it or export with a larger --max-seq-len")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise CapreseError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                               f"max_seq_len of {self.max_seq_len}; ask for fewer new tokens or export with a larger "
                               "--max-seq-len")
        return self.stream_ids(ids, max_new_tokens, sampling, reselect_every, reuse=False, ignore_eos=ignore_eos)

    # ---- tokens ----
    def forget(self) -> None:
        """Drop what the cache holds (the buffers stay allocated)."""
        self.cached = []
        self.selection.reset()

    def reusable(self, ids: list[int]) -> int:
        """Slots of the cache that `ids` can keep: its common prefix with what the cache holds, less at least one
        token (the prefill must produce logits), and for approximated layers only whole prompt chunks (whose
        statistics are known on their own: the previous reply's tokens are prefilled again, which also gives
        them dense K/V and a selection over the whole conversation, as one prefill of it would)."""
        p = 0
        for a, b in zip(ids, self.cached):
            if a != b:
                break
            p += 1
        p = min(p, len(ids) - 1)
        return self.selection.keep_prompt_chunks(p) if self.approximated else p

    def stream_ids(self, ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                   reselect_every: int = 0, reuse: bool = False,
                   on_finish: Callable[[RuntimeResult], None] | None = None,
                   ignore_eos: bool = False) -> TextStream:
        """Generate after `ids`; reuse=True keeps the cached K/V of the longest reusable prefix (chat turns)."""
        ids = prompt_ids(ids, self.layout.vocab_size)
        check_sampling(sampling)
        if max_new_tokens < 1:
            raise CapreseError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise CapreseError(f"{len(ids)} tokens + {max_new_tokens} new ones exceed the engine's max_seq_len "
                               f"({self.max_seq_len})")
        if reselect_every < 0 or reselect_every > self.max_prompt_len:
            raise CapreseError(f"--reselect-every must be between 0 and the engine's max_prompt_len "
                               f"({self.max_prompt_len}); got {reselect_every}")
        if reuse:
            start = self.reusable(ids)
        else:
            start = 0
            self.forget()
        if not self.approximated:
            self.selection.reset()
        self.cached = self.cached[:start]
        run = _Run(self, ids, start, set() if ignore_eos else set(self.eos_ids))
        return TextStream(self, run, self._tokens(run, max_new_tokens, sampling, reselect_every), on_finish)

    def _select(self) -> None:
        if self.approximated:
            self.backend.select(self.selection.griffin_stats(), self.selection.cats_taus())

    def _tokens(self, run: _Run, max_new: int, sampling: Sampling, reselect_every: int) -> Iterator[int]:
        b, ids, eos = self.backend, run.ids, run.eos
        b.reserve(len(ids) + max_new, keep=run.start)
        b.reselecting(reselect_every)
        generator = sampling.generator(b.logits_device)
        policy = DecodePolicy.of(sampling)
        try:
            t0 = time.perf_counter()
            for s in range(run.start, len(ids), self.max_prompt_len):
                chunk = ids[s:s + self.max_prompt_len]
                out = b.prefill(chunk, s)
                self.selection.add(Chunk(s, s + len(chunk), PROMPT, out.griffin, out.tau))
                self.cached = ids[:s + len(chunk)]
            self._select()
            token = policy.choose(out.logits, generator)
            run.ttft_ms = (time.perf_counter() - t0) * 1000
            run.produced.append(token)
            if token in eos:
                run.stop_reason = "eos"
                return
            yield token
            slot, fed = len(ids), []
            last = time.perf_counter()
            i = 0
            while i < max_new - 1:  # step i feeds `token` at slot + i
                if run.stop_requested:
                    return
                if reselect_every and (i + 1) % reselect_every == 0:  # this step re-selects: a prefill instead
                    fed.append(token)
                    ws = slot + i - reselect_every + 1
                    out = b.prefill(fed[-reselect_every:], ws)
                    self.selection.add(Chunk(ws, slot + i + 1, RESELECT, out.griffin, out.tau))
                    self._select()
                    new, ms = [policy.choose(out.logits, generator)], [0.0]
                else:  # decode steps up to the next re-selection, as many as one call of the backend runs
                    n = min(policy.block(b), max_new - 1 - i,
                            reselect_every - 1 - i % reselect_every if reselect_every else max_new)
                    steps = policy.next_tokens(b, token, slot + i, n, eos, generator)
                    new, ms = steps.tokens, steps.ms
                    fed += [token] + new[:-1]
                    run.attended += [b.attended(slot + i + k) for k in range(len(new))]
                    run.skipped += steps.skipped
                now = time.perf_counter()
                extra = ((now - last) * 1000 - sum(ms)) / len(new)  # each step's share of the time around them
                last = now
                for k, nxt in enumerate(new):
                    if k and run.stop_requested:  # the block's later steps are dropped (their cache slots unused)
                        return
                    self.cached.append(token)
                    token = nxt
                    run.step_ms.append(ms[k] + extra)
                    run.produced.append(token)
                    if token in eos:
                        run.stop_reason = "eos"
                        return
                    yield token
                i += len(new)
            run.stop_reason = "length"
        finally:
            if run.stop_reason is None:
                run.stop_reason = "interrupted"


def sampling_from(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Sampling:
    try:
        return Sampling(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise CapreseError(str(e)) from None


__all__ = ["Generator", "RuntimeResult", "TextStream", "Sampling", "RunOptions", "EngineOptions", "sampling_from",
           "method_label"]
