"""Next-token choice: greedy, or temperature -> top-k -> top-p sampling (transformers' order) with a seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from caprese.errors import CapreseError


MIN_TEMPERATURE = 1e-6  # logits / T stays finite in fp32 for any |logit| < 1e32


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        # a positive temperature below MIN_TEMPERATURE rounds to 0 in fp32 or sends logits / T to inf: use 0
        for name, ok, need in (("temperature", self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
                                f"0 (greedy) or >= {MIN_TEMPERATURE:g}"),
                               ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1: off)")):
            if not ok:
                raise CapreseError(f"sampling {name} must be {need}; got {getattr(self, name)!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not -2**63 <= seed <= 2**64 - 1):  # torch.Generator.manual_seed's range
            raise CapreseError(f"sampling seed must be an integer in [-2**63, 2**64 - 1]; got {seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def check_sampling(s) -> Sampling:
    """generate()'s `sampling` argument: a Sampling (a dict of its fields failed later, as an AttributeError)."""
    if not isinstance(s, Sampling):
        raise TypeError(f"sampling must be a caprese.model.Sampling, e.g. Sampling(temperature=0.7, seed=0); "
                        f"got {type(s).__name__}")
    return s


def sample(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if cfg.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax: no torch thread pool to wake between decode steps (~2 µs vs ~20-60 µs here)
            return torch.from_numpy(logits.detach().numpy().argmax(-1))
        return logits.argmax(dim=-1)
    if logits.shape[0] == 1 and logits.device.type == "cpu":
        return torch.tensor([_sample_row(logits[0].detach().float().numpy(), cfg, generator)])
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample_row(logits: np.ndarray, cfg: Sampling, generator: torch.Generator | None) -> int:
    """One row on the CPU, the same distribution as the batched path below, without sorting the vocabulary: top-k
    by a partition, and top-p over the tokens whose probability is at least a fraction of the largest, a set
    widened until its mass reaches top_p (then every token the cut keeps is in it). A reasoning model's
    recommended temperature 0.6 / top-p 0.95 took ~6.6 ms a token over SmolLM2's 49,152 logits in the sort-based
    path, several decode steps' worth (docs/performance.md). Probabilities in fp32, their sums in fp64; one
    uniform from the generator."""
    z = logits / np.float32(cfg.temperature)
    n = z.shape[0]
    ids = None
    if cfg.top_k and cfg.top_k < n:
        kth = np.partition(z, n - cfg.top_k)[n - cfg.top_k]
        ids = np.flatnonzero(z >= kth)  # ties at the k-th value stay, as the batched path's masked_fill
        z = z[ids]
    if not np.isfinite(z.max()):
        raise ValueError("no finite logit to sample from")
    p = np.exp(z - z.max())
    total = p.sum(dtype=np.float64)
    if cfg.top_p < 1.0:  # the smallest prefix by descending probability whose mass reaches top_p
        frac = 1e-4
        while True:
            cand = np.flatnonzero(p >= frac) if frac > 0 else np.arange(len(p))
            if frac == 0 or p[cand].sum(dtype=np.float64) >= cfg.top_p * total:
                break
            frac = frac * 1e-3 if frac > 1e-13 else 0.0
        cand = cand[np.lexsort((cand, -p[cand]))]  # descending, ties by position
        q = p[cand] / total
        keep = int(np.count_nonzero(np.cumsum(q) - q < cfg.top_p))
        pick, probs = cand[:keep], q[:keep]
    else:
        pick, probs = None, p / total
    cum = np.cumsum(probs, dtype=np.float64)
    j = min(int(np.searchsorted(cum, float(torch.rand((), generator=generator)) * cum[-1], side="right")),
            len(cum) - 1)
    j = int(pick[j]) if pick is not None else j
    return int(ids[j]) if ids is not None else j
