"""What a backend does for the Generator (batch 1), and how one is picked by name.

A backend owns the KV cache and the decode graph's persistent selection inputs of one engine folder:
  reserve(need, keep)        KV capacity for `need` slots, keeping slots 0..keep-1 if it must reallocate
                             (never called between decode steps: the buffers stay put during a generation)
  prefill(ids, start)        tokens at slots start.. through the prefill graph -> PrefillOut
  select(griffin, tau)       fill the decode inputs: GRIFFIN Σ statistics per layer (top-k + folding),
                             CATS thresholds per layer
  decode(token, slot)        one token through the decode graph -> logits [1, V] (float32 torch tensor on
                             logits_device, valid until the next call)
  decode_greedy(token, slot) the same step -> the argmax token (a backend may find it without every logit)
  decode_greedy_n(token, slot, n, eos)
                             up to n such steps (at most greedy_block), stopping after a token in eos -> Steps
                             (a backend may run them in one call: the native kernel does)
  decode_sample_n(token, slot, n, eos, sampling, generator)
                             up to n sampled steps (at most sample_block; only where sample_block > 1: native)
  decode_top(token, slot, k) the same step -> logits exact at least where the k largest are (a backend may
                             leave the others at -inf): what top-k sampling reads
  attended(slot)             KV slots a decode step at `slot` reads (for the bandwidth report)
  skipped_bytes()            weight bytes the last decode step did not read (for the bandwidth report)
Backends are imported lazily; a missing one is a one-line CapreseError.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import time

import torch

from caprese.errors import CapreseError
from caprese.model.sampling import Sampling, sample

BACKENDS = {"onnxruntime": ("caprese.runtime.ort_backend", "OrtBackend"),
            "torch": ("caprese.runtime.torch_backend", "TorchBackend"),
            "tensorrt": ("caprese.runtime.tensorrt_backend", "TensorRTBackend"),
            "native": ("caprese.runtime.native_backend", "NativeBackend")}


@dataclasses.dataclass
class PrefillOut:
    logits: torch.Tensor  # [1, V] float32, the last token's
    griffin: dict[int, torch.Tensor]  # layer -> griffin_stat [1, F] float32 (this call's tokens only)
    tau: dict[int, torch.Tensor]  # layer -> cats_tau [1] float32 (this call's tokens only)


_GREEDY = Sampling()


@dataclasses.dataclass
class Steps:
    """Decode steps run by one call: their output tokens, each step's time (ms) and the weight bytes it did not read."""
    tokens: list[int]
    ms: list[float]
    skipped: list[int]


class Backend:
    name = "?"
    device = "cpu"
    logits_device = "cpu"  # where decode()/prefill() logits live (sampling runs there)

    def __init__(self, manifest):
        self.manifest = manifest
        self.layout = manifest.layout
        self.capacity = 0  # KV slots currently allocated

    def reserve(self, need: int, keep: int = 0) -> None:
        raise NotImplementedError

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        raise NotImplementedError

    def select(self, griffin: dict[int, torch.Tensor], tau: dict[int, torch.Tensor]) -> None:
        raise NotImplementedError

    def decode(self, token: int, slot: int) -> torch.Tensor:
        raise NotImplementedError

    def decode_greedy(self, token: int, slot: int) -> int:
        return int(sample(self.decode(token, slot), _GREEDY)[0])

    greedy_block = 1  # greedy steps one decode_greedy_n call may run
    sample_block = 1  # sampled steps one decode_sample_n call may run (a backend with more defines the call)

    def decode_greedy_n(self, token: int, slot: int, n: int, eos: set[int]) -> Steps:
        out = Steps([], [], [])
        for i in range(n):
            t0 = time.perf_counter()
            token = self.decode_greedy(token, slot + i)
            out.ms.append((time.perf_counter() - t0) * 1000)
            out.tokens.append(token)
            out.skipped.append(self.skipped_bytes())
            if token in eos:
                break
        return out

    def decode_top(self, token: int, slot: int, k: int) -> torch.Tensor:
        return self.decode(token, slot)

    def attended(self, slot: int) -> int:
        return self.capacity

    def skipped_bytes(self) -> int:
        """Weight bytes of the decode graph the last decode step did not read (the native kernel skips the up and
        down rows of CATS' zeroed neurons, and on a screened step three quarters of the LM head less its scales,
        bounds and recomputed rows); 0 for backends that run the graph as written."""
        return 0

    def peak_device_mb(self) -> float | None:
        return None

    def reselecting(self, every: int) -> None:
        """The reply about to run re-selects GRIFFIN's neurons every `every` steps (0: never): a prefill over the
        last `every` tokens each time (the native backend then keeps its cache in ONNX Runtime's layout)."""

    def kv_as_rows(self) -> None:
        """Leave the KV buffers in the graphs' layout ([1, kv heads, slots, head_dim]) for code that reads them;
        the native kernel holds K in tiles between prefills (Model.k_tiles); every other backend already does."""

    def describe(self) -> dict:
        """Backend-specific facts for --json (providers, threads, device...)."""
        return {}


def open_backend(name: str, manifest, threads: int | None = None, **options) -> Backend:
    if name not in BACKENDS:
        raise CapreseError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} (or auto: Generator.load / "
                           "Generator.open)")
    module, attr = BACKENDS[name]
    cls = getattr(importlib.import_module(module), attr)
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise CapreseError(f"the {name} backend has no option {', '.join(unknown)} (it takes "
                           f"{', '.join(p for p in accepted if p not in ('self', 'manifest'))})")
    return cls(manifest, threads=threads, **options)
