"""The native decode step's weights in memory: copied once out of weights.bin into one 2 MiB-aligned buffer
(transparent huge pages advised: fewer TLB misses while a step streams ~0.5 GB), quantized codes in caprese's
signed format. Split from native_backend.py, which wires these buffers into the kernel's structs."""

from __future__ import annotations

import ctypes

import numpy as np

from caprese.export.engine_spec import PACKING_NBITS, WeightRef

HUGE_PAGE = 2 << 20


def address(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


class WeightArena:
    """The decode step's weights, copied out of weights.bin into one 2 MiB-aligned buffer (THP-advised); the
    `mapped` ones (a table a step reads one row of) stay in the read-only memory map of weights.bin instead;
    `halves` may be fp16 (a quantized FFN's --fp16-bypass L / R, which the kernel reads as fp16).
    A quantized weight is its codes ([rows, cols * bits / 8] bytes, in caprese's signed format: MatMulNBits'
    unsigned bytes are flipped back while copying) plus its scales (their own WeightRef). fp32 scales that are
    all exactly fp16 values (an fp32 graph stores the format's fp16 scales widened) are kept as fp16, in place:
    the kernel widens them exactly, so the products are the same bits and a step reads fewer bytes
    (`saved_bytes`: int4 block 32 reads 1/16 byte less per weight)."""

    def __init__(self, manifest, refs: list[WeightRef], mapped: set[str] = frozenset(),
                 halves: set[str] = frozenset()):
        refs = refs + [r.quant.scale for r in refs if r.quant is not None]
        refs = list({r.name: r for r in refs}.values())  # the tied embedding is also the head: once
        scales = {r.quant.scale.name for r in refs if r.quant is not None}
        offsets, total = {}, 0
        for r in refs:
            ok = r.dtype == "float32" or (r.name in scales | halves and r.dtype == "float16") or (
                r.quant is not None and r.dtype in ("int4", "int8"))
            if not ok:
                raise CapreseError(f"the native backend runs fp32 engines; {r.name} is {r.dtype}")
            if r.name not in mapped:
                offsets[r.name] = total
                total += -(-r.nbytes // 64) * 64
        self.buf = huge_buffer(total)
        self._src = np.memmap(manifest.file("weights"), dtype=np.uint8, mode="r")
        self.views: dict[str, np.ndarray] = {}
        with open(manifest.file("weights"), "rb", buffering=0) as f:  # read, not mapped: the copied tensors'
            for r in refs:                                           # file pages stay out of this process's RSS
                n, e = r.name, manifest.entry(r)  # where it is; its shape and dtype were checked on load
                begin, length = int(e["offset"]), int(e["length"])
                if n in mapped:
                    dst = self._src[begin:begin + length]
                else:
                    dst = self.buf[offsets[n]:offsets[n] + length]
                    f.seek(begin)
                    view, got = memoryview(dst), 0
                    while got < length:  # one read() returns at most ~2 GiB on Linux
                        k = f.readinto(view[got:])
                        if not k:
                            raise CapreseError(f"{manifest.file('weights')} ends inside {n}; export the engine "
                                               "again")
                        got += k
                if r.quant is not None:  # codes: bytes [rows, cols * bits / 8]
                    if r.quant.packing == PACKING_NBITS:
                        np.bitwise_xor(dst, 0x88 if r.quant.bits == 4 else 0x80, out=dst)
                    self.views[n] = dst.reshape(r.shape[0], -1)
                else:
                    self.views[n] = dst.view(np.float32 if r.dtype == "float32" else np.float16).reshape(r.shape)
        self.saved_bytes = 0  # per decode step: the scales narrowed to fp16
        for n in scales:
            a = self.views[n]
            if a.dtype != np.float32 or n in mapped:
                continue
            with np.errstate(over="ignore"):
                h = a.astype(np.float16)
            if not np.array_equal(h.astype(np.float32), a):
                continue
            narrow = a.reshape(-1).view(np.uint8)[:h.nbytes].view(np.float16).reshape(a.shape)
            narrow[...] = h
            self.views[n] = narrow
            self.saved_bytes += a.nbytes - h.nbytes

    def __getitem__(self, ref: WeightRef) -> np.ndarray:
        return self.views[ref.name]


def huge_buffer(nbytes: int) -> np.ndarray:
    """nbytes of uint8 starting on a 2 MiB boundary, THP-advised (the view keeps its allocation alive)."""
    raw = np.empty(nbytes + HUGE_PAGE, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    buf = raw[start:start + nbytes]
    advise_huge(buf)
    return buf


def copy_huge(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` in a huge_buffer."""
    out = huge_buffer(a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def advise_huge(buf: np.ndarray) -> None:
    """madvise(MADVHUGE_PAGEPAGE) where Linux offers it: fewer TLB misses while streaming ~0.5 GB per step."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(buf.ctypes.data), ctypes.c_size_t(buf.nbytes), 14)
    except (OSError, AttributeError):
        pass
