"""Which backend call a decode step makes for a Sampling, decided here and only here.

  greedy (temperature 0)  Backend.decode_greedy -> the argmax token (the native kernel may screen the LM head);
                          several steps in one call where the backend can (decode_greedy_n: the native kernel)
  top-k (k > 0)           Backend.decode_top    -> logits exact at least where the k largest are, then sample()
  otherwise               Backend.decode        -> every logit, then sample()
top-p after top-k reads only the k kept logits, so decode_top serves it too. A backend with sample_block > 1 (the
native kernel) runs sampled steps several to a call instead (decode_sample_n: the same filters, in C). Prefill
logits (the first token, and GRIFFIN's reselection steps) always hold every logit and go straight to sample().
"""

from __future__ import annotations

import dataclasses
import time

import torch

from caprese.model.sampling import Sampling, sample
from caprese.runtime.backend import Steps

GREEDY, TOP_K, FULL = "greedy", "top_k", "full"


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
    sampling: Sampling
    mode: str  # GREEDY | TOP_K | FULL

    @classmethod
    def of(cls, sampling: Sampling) -> "DecodePolicy":
        return cls(sampling, GREEDY if sampling.greedy else TOP_K if sampling.top_k else FULL)

    def block(self, backend) -> int:
        """Decode steps one call may run: a step needs only the last one's token, so a backend may run several at
        once (Backend.greedy_block; sampled: Backend.sample_block, the native kernel sampling in C)."""
        return backend.greedy_block if self.mode == GREEDY else backend.sample_block

    def next_tokens(self, backend, token: int, slot: int, n: int, eos: set[int],
                    generator: torch.Generator | None = None) -> Steps:
        """n <= block(backend) decode steps from `token` at `slot` (fewer after a token in eos)."""
        if self.mode == GREEDY:
            return backend.decode_greedy_n(token, slot, n, eos)
        if n > 1:
            return backend.decode_sample_n(token, slot, n, eos, self.sampling, generator)
        t0 = time.perf_counter()
        nxt = self.next_token(backend, token, slot, generator)
        return Steps([nxt], [(time.perf_counter() - t0) * 1000], [backend.skipped_bytes()])

    def next_token(self, backend, token: int, slot: int, generator: torch.Generator | None = None) -> int:
        """One decode step of `token` at `slot` on `backend` -> the next token."""
        if self.mode == GREEDY:
            return backend.decode_greedy(token, slot)
        logits = backend.decode_top(token, slot, self.sampling.top_k) if self.mode == TOP_K else \
            backend.decode(token, slot)
        return self.choose(logits, generator)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """The next token from a full set of logits [1, V] (prefill's)."""
        return int(sample(logits, self.sampling, generator)[0])
