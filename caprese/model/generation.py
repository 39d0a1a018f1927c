"""Prefill, one decode step, n decode steps, and a timed `generate` on the reference decoder (gpt-fast layout).

`decode_one_token` is the hot path and the only piece worth compiling; everything else runs once per prompt.
Latency is measured around device work with a synchronise, so the numbers are wall-clock truth.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from caprese.cpu_threads import TorchThreads
from caprese.model.decoder import Decoder
from caprese.model.sampling import Sampling, sample


@dataclasses.dataclass
class GenerationStats:
    """The latency of one generation: the one stats/report type of the reference decoder and (extended by
    caprese.runtime.stats.RuntimeStats with memory traffic) of every engine backend."""

    prompt_tokens: int
    tokens_generated: int  # decode outputs per sequence, the stop token included
    ttft_ms: float  # prefill + first token
    step_ms: list[float]  # one entry per decode step after the first token
    batch: int = 1
    backend: str = ""  # what ran: "torch (reference)", "onnxruntime", "native (auto)" ...

    @property
    def ms_per_token(self) -> float:
        return statistics.fmean(self.step_ms) if self.step_ms else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.ms_per_token if self.step_ms else float("nan")

    def percentile(self, q: float) -> float:
        if not self.step_ms:
            return float("nan")
        s = sorted(self.step_ms)
        return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "tokens_generated": self.tokens_generated,
                "batch": self.batch, "ttft_ms": round(self.ttft_ms, 3),
                "ms_per_token": round(self.ms_per_token, 3), "ms_per_token_p50": round(self.percentile(50), 3),
                "ms_per_token_p90": round(self.percentile(90), 3), "tokens_per_s": round(self.tokens_per_s, 2)}

    def report_parts(self) -> list[str]:
        """The report's fields, in order (RuntimeStats adds memory traffic and use before the backend)."""
        return [f"prompt {self.prompt_tokens} tokens", f"generated {self.tokens_generated}",
                f"TTFT {self.ttft_ms:.1f} ms", f"{self.ms_per_token:.2f} ms/token (p50 {self.percentile(50):.2f}, "
                f"p90 {self.percentile(90):.2f})", f"{self.tokens_per_s:.1f} tokens/s"]

    def report(self) -> str:
        """One human line (stderr of `caprese generate` / `run`, `/stats` in chat)."""
        return " | ".join(self.report_parts() + ([f"backend: {self.backend}"] if self.backend else []))


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence, stop token excluded
    stats: GenerationStats
    stop_reason: list[str]  # "eos" | "length" per sequence


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Decoder, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt [B, T] from slot 0; return the last position's logits [B, V]."""
    return model(tokens, 0, pad, last_only=True, phase="prefill")[:, -1]


def decode_one_token(model: Decoder, token: torch.Tensor, slot: int, pad: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence ([B, 1]) at cache slot `slot`; return logits [B, V]."""
    return model(token, slot, pad, phase="decode")[:, -1]


def decode_n_tokens(model: Decoder, token: torch.Tensor, slot: int, n: int, sampling: Sampling,
                    generator: torch.Generator | None = None, pad: torch.Tensor | None = None,
                    on_step: Callable[[torch.Tensor], bool] | None = None,
                    reselect_every: int = 0) -> list[torch.Tensor]:
    """Up to n steps from `token` ([B]) at `slot`; `on_step(new_token)` returning True stops early.

    reselect_every = ρ > 0: every ρ-th step runs the last ρ fed tokens through the prefill (dense) path instead
    of a single decode step. That refreshes their KV entries and lets prompt-adaptive FFNs re-select (GRIFFIN).
    """
    out, fed = [], []
    for i in range(n):
        fed.append(token)
        if reselect_every and len(fed) % reselect_every == 0:
            window = torch.stack(fed[-reselect_every:], dim=1)
            logits = model(window, slot + i - reselect_every + 1, pad, last_only=True, phase="prefill")[:, -1]
        else:
            logits = decode_one_token(model, token[:, None], slot + i, pad)
        token = sample(logits, sampling, generator)
        out.append(token)
        if on_step is not None and on_step(token):
            break
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    longest = max(len(p) for p in prompts)
    if all(len(p) == longest for p in prompts):
        return torch.tensor(prompts), None
    pads = [longest - len(p) for p in prompts]
    return torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)]), torch.tensor(pads)


def generate(model: Decoder, prompts: list[int] | list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_ids: tuple[int, ...] = (),
             on_token: Callable[[int], None] | None = None, reselect_every: int = 0,
             threads: int | None = None, on_row_done: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate for one prompt (list of ids) or a batch (list of lists, left-padded) until EOS or max_new_tokens.

    `on_token` streams batch-1 tokens as they are chosen; `on_row_done(i)` is called as soon as row i of the
    batch is finished (its stop token, or the last step), e.g. for a per-prompt progress bar. The KV cache is
    reused when big enough. On the CPU the loop runs on `threads` intra-op threads, by default one per free CPU
    (caprese.cpu_threads).
    """
    args = (model, prompts, max_new_tokens, sampling, eos_ids, on_token, reselect_every, on_row_done)
    if model.model.embed_tokens.weight.device.type != "cpu":
        return _generate(*args, None)
    with TorchThreads(threads) as tt:
        return _generate(*args, tt)


@torch.inference_mode()
def _generate(model, prompts, max_new_tokens, sampling, eos_ids, on_token, reselect_every, on_row_done,
              tt: TorchThreads | None) -> GenerationResult:
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    batch_prompts = prompts if prompts and isinstance(prompts[0], (list, tuple)) else [prompts]
    if not all(batch_prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.model.embed_tokens.weight.device
    tokens, pad = left_pad([list(p) for p in batch_prompts], eos_ids[0] if eos_ids else 0)
    tokens = tokens.to(device)
    pad = pad.to(device) if pad is not None else None
    b, t = tokens.shape
    need = t + max_new_tokens
    limit = model.spec.max_position_embeddings
    if need > limit:
        raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds the model's context ({limit})")
    if model.max_len < need or getattr(model, "batch", None) != b:
        model.setup_caches(b, need)
    generator = sampling.generator(device)
    eos = torch.tensor(eos_ids or [-1], device=device)

    _sync(device)
    t0 = time.perf_counter()
    first = sample(prefill(model, tokens, pad), sampling, generator)
    done = torch.isin(first, eos)
    _sync(device)
    ttft = (time.perf_counter() - t0) * 1000
    produced, steps = [first], []
    if on_token is not None and b == 1 and not bool(done[0]):
        on_token(int(first[0]))
    if on_row_done is not None:
        for i in done.nonzero().flatten().tolist():
            on_row_done(i)
    if not bool(done.all()):
        last = time.perf_counter()

        def on_step(tok: torch.Tensor) -> bool:
            nonlocal last, done
            produced.append(tok)
            finished = torch.isin(tok, eos)
            stop = bool((done | finished).all())  # the one host sync per step: needed to stop on EOS
            now = time.perf_counter()
            steps.append((now - last) * 1000)
            last = now
            if on_token is not None and b == 1 and not bool(finished[0]):
                on_token(int(tok[0]))
            if on_row_done is not None:
                for i in (finished & ~done).nonzero().flatten().tolist():
                    on_row_done(i)
            done = done | finished
            if tt is not None:
                tt.tick()
            return stop

        decode_n_tokens(model, first, t, max_new_tokens - 1, sampling, generator, pad, on_step, reselect_every)
    if on_row_done is not None:  # rows that ran to max_new_tokens
        for i in (~done).nonzero().flatten().tolist():
            on_row_done(i)

    seqs, reasons = [], []
    all_tokens = torch.stack(produced, dim=1).tolist()
    for row in all_tokens:
        cut = next((i for i, x in enumerate(row) if x in eos_ids), None)
        seqs.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "eos")
    stats = GenerationStats(prompt_tokens=t, tokens_generated=len(produced), ttft_ms=ttft, step_ms=steps, batch=b)
    return GenerationResult(tokens=seqs, stats=stats, stop_reason=reasons)
