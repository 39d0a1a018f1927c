"""The buffers an engine's graphs are bound to (batch 1), allocated, resized and read back in ONE place for the
onnxruntime, native and tensorrt backends (the torch backend's cache lives in its decoder; it shares the
capacity rule and the read-back of the selection statistics).

A buffer is named by a key: the graph tensor's name for the shared ones (logits, write_indices,
attention_mask, past_key.i / past_value.i: present_* is bound to the same buffer), "stats.<name>" for the
prefill graph's statistics outputs, "selection.<name>" for the decode graph's per-prompt inputs (w_gul / w_dr
/ b_gul / cats_tau), "<role>.<name>" for the token inputs a role writes (decode.input_ids ...).
`Buffers` allocates each Buffer spec with the backend's allocator; what it allocates keeps its address until
reserve() grows the KV cache (never between decode steps). An allocated buffer offers:
  tensor()     a torch view to write (on a device backend: the device tensor; onnxruntime on CUDA: a host
               mirror, then sync())
  sync()       after writing tensor(): bring the bound buffer up to date
  read()       the values (numpy or torch)
  data_ptr()   the bound address
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from caprese.errors import CapreseError
from caprese.export import contract as C

STATIC = "static"  # kv_policy of engines whose cache length is fixed at build time (TensorRT)


@dataclasses.dataclass(frozen=True)
class Buffer:
    key: str
    dtype: str  # contract dtype name
    shape: tuple  # ints
    fill: float | bool | None = None  # initial value (None: zeros)


def kv_slots(need: int, max_seq_len: int, policy: str | int) -> int:
    """KV slots to allocate for `need`: "max" = the engine's max_seq_len; "fit" = `need` rounded up to a
    multiple of 256 (ONNX Runtime's Attention costs time per *allocated* slot, so a short chat pays for a short
    buffer), at most max_seq_len; an int = that many (at least `need`)."""
    if policy == "max":
        return max_seq_len
    if policy == "fit":
        return min(max_seq_len, -(-need // 256) * 256)
    return min(max_seq_len, max(int(policy), need))


def new_capacity(capacity: int, need: int, keep: int, max_seq_len: int, policy: str | int) -> int | None:
    """The KV capacity reserve(need, keep) must allocate, or None when the current one serves: enough slots, and
    either slots to keep (a chat turn: never shrink under them) or already the policy's size."""
    cap = kv_slots(need, max_seq_len, policy)
    if capacity >= need and (keep > 0 or cap == capacity):
        return None
    return cap


def selection_name(name: str) -> bool:
    """A decode input filled once per prompt (contract.SELECTION_INPUTS)."""
    return C.layer_of(name, *C.SELECTION_INPUTS) is not None


def concrete(shape, seq: int = 1) -> tuple:
    """A contract shape at batch 1 (symbolic sequence dims -> seq)."""
    return tuple(1 if d == C.BATCH else seq if isinstance(d, str) else int(d) for d in shape)


def graph_buffers(layout: C.GraphLayout, slots: int) -> dict[str, Buffer]:
    """The buffers of an ONNX Runtime engine's prefill + decode graphs with a KV cache of `slots` slots (the
    prefill graph's token inputs are bound per call, not here)."""
    out: dict[str, Buffer] = {}

    def add(key, dtype, shape, fill=None):
        out[key] = Buffer(key, dtype, tuple(shape), fill)

    add(C.LOGITS, "float32", (1, 1, layout.vocab_size))
    for i in layout.layers_of(C.GRIFFIN):
        add(f"stats.{C.griffin_stat(i)}", "float32", (1, layout.intermediate_size))
    for i in layout.layers_of(C.CATS):
        add(f"stats.{C.cats_tau(i)}", "float32", (1,))
    for spec in layout.inputs(C.DECODE):
        if selection_name(spec.name):
            add(f"selection.{spec.name}", spec.dtype, concrete(spec.shape))
    add(f"{C.DECODE}.{C.INPUT_IDS}", "int64", (1, 1))
    add(f"{C.DECODE}.{C.POSITION_IDS}", "int64", (1, 1))
    add(C.WRITE_INDICES, "int64", (1,))
    out.update(kv_buffers(layout, slots))
    return out


def kv_buffers(layout: C.GraphLayout, slots: int) -> dict[str, Buffer]:
    """The KV cache (one [1, H_kv, slots, D] buffer per layer for K and V) and its attention mask (batch 1:
    every slot is, or will be, a real token)."""
    shape = (1, layout.num_kv_heads, slots, layout.head_dim)
    out = {past: Buffer(past, layout.cache_dtype, shape) for past, _ in layout.in_place_pairs()}
    out[C.ATTENTION_MASK] = Buffer(C.ATTENTION_MASK, "int64", (1, slots), 1)
    return out


def read_stats(layout: C.GraphLayout, read: Callable[[str], object]) -> tuple[dict, dict]:
    """(GRIFFIN Σ per layer, CATS τ per layer) of one prefill call as CPU float32 tensors the caller owns;
    read(name) returns the statistics output `name` (contract.griffin_stat / cats_tau) in any form."""
    def own(x) -> torch.Tensor:
        return torch.as_tensor(x).to("cpu", torch.float32, copy=True)

    return ({i: own(read(C.griffin_stat(i))) for i in layout.layers_of(C.GRIFFIN)},
            {i: own(read(C.cats_tau(i))) for i in layout.layers_of(C.CATS)})


class Buffers:
    """Every buffer of one engine, allocated from Buffer specs by `alloc(spec)`; reserve() sizes the KV cache
    ("static": the specs' own length, fixed)."""

    def __init__(self, layout: C.GraphLayout, specs: dict[str, Buffer], alloc: Callable[[Buffer], object],
                 max_seq_len: int, kv_policy: str | int = STATIC):
        self.layout, self.alloc, self.max_seq_len, self.kv_policy = layout, alloc, int(max_seq_len), kv_policy
        self.bufs = {key: alloc(spec) for key, spec in specs.items()}
        self.kv_keys = [past for past, _ in layout.in_place_pairs()]
        self.capacity = specs[self.kv_keys[0]].shape[2] if self.kv_keys and self.kv_keys[0] in specs else 0

    def __getitem__(self, key: str):
        return self.bufs[key]

    def get(self, key: str):
        return self.bufs.get(key)

    @property
    def kv(self) -> dict:
        """{past_* name: buffer} (present_* is bound to the same one)."""
        return {k: self.bufs[k] for k in self.kv_keys if k in self.bufs}

    @property
    def selection(self) -> dict:
        """{decode input name: buffer} of the per-prompt inputs."""
        return {k[len("selection."):]: b for k, b in self.bufs.items() if k.startswith("selection.")}

    @property
    def stats(self) -> dict:
        """{statistics output name: buffer} of the prefill graph."""
        return {k[len("stats."):]: b for k, b in self.bufs.items() if k.startswith("stats.")}

    def plan(self, need: int, keep: int = 0) -> int | None:
        """The capacity reserve(need, keep) would allocate, None if it keeps the buffers (CapreseError when a
        static cache is too short)."""
        if self.kv_policy == STATIC:
            if need > self.capacity:
                raise CapreseError(f"{need} tokens exceed the engine's static KV length {self.capacity}")
            return None
        return new_capacity(self.capacity, need, keep, self.max_seq_len, self.kv_policy)

    def reserve(self, need: int, keep: int = 0) -> bool:
        """KV capacity for `need` slots, keeping slots 0..keep-1 when it reallocates; True if it did (the caller
        binds the new addresses)."""
        cap = self.plan(need, keep)
        if cap is None:
            return False
        old = self.kv
        for key, spec in kv_buffers(self.layout, cap).items():
            b = self.alloc(spec)
            if keep and key in old:
                n = min(keep, cap, self.capacity)
                t = b.tensor()
                t[:, :, :n] = torch.as_tensor(old[key].read())[:, :, :n].to(t.device)
                b.sync()
            self.bufs[key] = b
        self.capacity = cap
        return True

    def prefill_stats(self) -> tuple[dict, dict]:
        """read_stats of the bound statistics outputs (after a prefill call)."""
        return read_stats(self.layout, lambda name: self.bufs[f"stats.{name}"].read())

    def write_selection(self, fold, griffin: dict, tau: dict) -> None:
        """Fill the decode graph's per-prompt inputs: GRIFFIN's folded w_gul / w_dr / b_gul per layer (fold:
        caprese.runtime.fold.FoldInto), CATS' τ."""
        sel = self.selection
        for i, stat in griffin.items():
            if C.w_gu_q(i) in sel:  # a quantized layout's rows (contract.py), gathered whole from weights.bin
                names = [n for n in (C.w_gu_q(i), C.w_gu_s(i), C.w_d_q(i), C.w_d_s(i), C.b_gul(i)) if n in sel]
                fold.quantized_rows(i, stat, {n: sel[n].tensor() for n in names})
                for n in names:
                    sel[n].sync()
                continue
            bufs = [sel[C.w_gul(i)], sel[C.w_dr(i)]] + ([sel[C.b_gul(i)]] if C.b_gul(i) in sel else [])
            fold(i, stat, *(b.tensor() for b in bufs))
            for b in bufs:
                b.sync()
        for i, t in tau.items():
            b = sel[C.cats_tau(i)]
            dst = b.tensor()
            dst.copy_(t.to(dst.device, dst.dtype).reshape(dst.shape))
            b.sync()


class TensorBuf:
    """A buffer that is a torch tensor (tensorrt: CUDA memory bound by address)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def tensor(self) -> torch.Tensor:
        return self.t

    def sync(self) -> None:
        pass

    def read(self) -> torch.Tensor:
        return self.t

    def data_ptr(self) -> int:
        return self.t.data_ptr()
