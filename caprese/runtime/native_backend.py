"""Native CPU backend: prefill, selection and folding as on the onnxruntime backend; each decode step in one call
of a small C kernel (caprese/runtime/native/decode_step.c) over the same engine folder.

Why: at batch 1 on a CPU a decode step streams every weight once; ONNX Runtime runs it as ~10 graph nodes per
layer, each a separate thread-pool dispatch, and cannot pre-pack GRIFFIN's per-prompt matrices. The kernel runs
the whole step in one call over the weights of weights.bin (copied once into one 2 MiB-aligned arena,
transparent huge pages requested), the KV buffers and the folded selection buffers the onnxruntime backend
already owns. fp32 engines, with float or int4 / int8 weights (quantized ones read in their stored bytes by
native/quant_gemv.c, #included into the kernel; see the runtime README "Quantized engines"); the prefill graph
is ONNX Runtime's: the backend composes an OrtGraphs runner of it (prefill, selection, folding, the shared buffer
set) and binds the kernel to that runner's buffers. Every
weight is found through the engine spec (manifest.spec: caprese/export/engine_spec.py), by role. The kernel is
built for the CPU's widest instruction set, or the one `isa` / $CAPRESE_NATIVE_ISA names (native/library.py), and
the report names it.

Greedy and top-k steps may screen the LM head: an int8 copy of it with per-row error bounds picks the few rows
that can be among the k largest logits, and only those are recomputed in fp32, so the argmax (or the top k,
hence a top-k sample) is the fp32 one while the head (a fifth of a small model's bytes) costs a quarter of its
bytes. head="auto" (default) screens where a probe at load found it faster on this CPU (native/head_choice.py),
head="screened" always, head="full" never; sampling without top-k (or with k > 256) computes every logit.

Threads (default: every CPU this process may run on): the calling thread and a pool of helpers share each phase
of a step chunk by chunk, and a chunk whose thread is descheduled is run again by one that is waiting, so other
programs on the cores slow a step down instead of stalling it at every barrier (decode_step.c).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from caprese import cpu_threads
from caprese.errors import CapreseError
from caprese.export import contract as C
from caprese.export.engine_spec import MATRIX, MATRIX_T, PACKING_INT4, PACKING_NBITS, WeightRef
from caprese.runtime.backend import Backend, PrefillOut, Steps
from caprese.runtime.native import library as lib_
from caprese.runtime.native.head_choice import HeadChoice, choose
from caprese.runtime.native.weight_arena import WeightArena, address, copy_huge, huge_buffer
from caprese.runtime.native.screened_head import quantize_head
from caprese.runtime.ort_backend import OrtGraphs

_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
HEADS = ("auto", "screened", "full")
# decode_step.c's phase kinds (PH_*), then its quantized products by job (J_*): the rows of kernel_profile()
PROFILE_LABELS = ("qkv", "attention+o", "gate_up", "down", "head_full", "head_screen", "head_pick", "-",
                  "q_attention", "q_down_rows", "q_ffn_rows", "q_ffn_dense", "q_qkv", "q_o", "q_gate_up", "q_down",
                  "q_head")


def native_unsupported(manifest) -> str | None:
    """Why the native backend cannot run this engine (a one-line reason), or None if it can."""
    spec = manifest.spec
    if spec.precision != "fp32":
        return (f"the native backend runs fp32 engines; this one is {spec.precision} (use --backend onnxruntime, "
                "or export with --precision fp32)")
    if manifest.model.activation not in _ACTIVATIONS:
        return f"the native backend has no {manifest.model.activation!r} activation; use --backend onnxruntime"
    for path, w in spec.refs():
        why = _quant_unsupported(w)
        if why:
            return f"the native backend cannot read {path}: {why} (use --backend onnxruntime)"
    for t in spec.layers:  # a layer's attention, and its FFN, are either all quantized or all float
        attn = {t.qkv.quant is None, t.o.quant is None}
        ffn = {w.quant is None for w in (t.gate_up, t.gate, t.up, t.down) if w is not None}
        if len(attn) > 1 or len(ffn) > 1:
            return (f"the native backend runs a layer's attention and FFN matrices all quantized or all float; "
                    f"layer {t.index} mixes them (use --backend onnxruntime)")
    return None


_PACKINGS = {4: (PACKING_INT4, PACKING_NBITS), 8: ("none", PACKING_NBITS)}


def _quant_unsupported(w: WeightRef) -> str | None:
    """Why quant_gemv.c cannot read quantized weight w as stored (None: it can, or w is not quantized)."""
    q = w.quant
    if q is None:
        return None
    if q.bits not in _PACKINGS or q.packing not in _PACKINGS[q.bits]:
        return f"{q.bits}-bit weights packed {q.packing!r}"
    if q.axis != 1 or len(w.shape) != 2:
        return f"blocks along axis {q.axis} of a {len(w.shape)}-D tensor (the kernel reads blocks along rows)"
    block = q.block_size or w.shape[1]
    if w.shape[1] % block or q.scale.dtype not in ("float16", "float32") or (q.bits == 4 and w.shape[1] % 2):
        return f"{w.shape[1]} columns in blocks of {block} with {q.scale.dtype} scales"
    return None


class NativeBackend(Backend):
    name = "native"

    def __init__(self, manifest, threads: int | None = None, kv_policy: str | int = "fit", device: str | None = None,
                 head: str = "auto", isa: str | None = None, int8_down: bool = False):
        super().__init__(manifest)
        spec = manifest.spec
        if head not in HEADS:
            raise CapreseError(f"head must be one of {', '.join(HEADS)} (got {head!r})")
        if device not in (None, "cpu"):
            raise CapreseError(f"the native backend runs on the CPU (asked device {device}); use --backend torch or "
                               "tensorrt for a GPU")
        why = native_unsupported(manifest)
        if why:
            raise CapreseError(why)
        self._ctx = None
        self._tiles_ok = False  # this cache can hold K in tiles (an fp16 cache, an AVX-512 build, 16 | capacity)
        self._reselecting = False  # a reply re-selects GRIFFIN's neurons (reselecting): K stays in rows
        # --int8-activations engines (MatMulNBits accuracy_level 4) state int8-activation arithmetic: the kernel
        # multiplies their int4 weights that way too (native/int8_activations.c); other formats keep fp32 x
        w = spec.recipe.weights
        self.int8_activations = w is not None and w.accuracy_level == 4
        # GRIFFIN's down (rows-axpy over its kept rows) takes 16-bit coefficients there (native/int8_activations.c,
        # 1/32512 of a group's largest); int8 ones (int8_down) are faster but err most (~0.9%), so they are opt-in
        if int8_down and not self.int8_activations:
            raise CapreseError("--int8-down takes an engine exported with --int8-activations")
        self.int8_down = bool(int8_down)
        self.lib = lib_.load(isa)
        self.kernel = self.lib.path
        # prefill, selection and folding: the prefill graph on ONNX Runtime, over the buffers the kernel reads. Its
        # pool stops spinning as each prefill returns: spinning on, it took a CPU from the decode steps that follow
        # (decode 0.93-0.94x the time without it, time to first token the same; docs/performance.md)
        self.prefill_runner = OrtGraphs(manifest, (C.PREFILL,), threads=threads, kv_policy=kv_policy, device="cpu",
                                        stop_spinning=True)
        self.buffers, self.kv_policy = self.prefill_runner.buffers, kv_policy
        # the pool has a thread per usable CPU (or the count asked); without an explicit count, as many of them
        # work as CPUs other processes leave free (caprese.cpu_threads), re-read as the steps run: next to one
        # busy process on 2 vCPUs, 1 thread took 3.07 ms/token where 2 took 4.2-4.8 (docs/performance.md)
        self.nthreads = int(threads or cpu_threads.pinned() or cpu_threads.usable_cpus())
        # an untied embedding is read one row per token, and CATS' gate_up is re-laid out below: both stay mapped
        mapped = set() if spec.tied_head else {spec.embed.name}
        mapped |= {spec.layers[i].gate_up.name for i in self.layout.layers_of(C.CATS)
                   if spec.layers[i].gate_up.quant is None}
        # a quantized FFN's bypass L / R (fp16 under --fp16-bypass): the kernel reads its own copy of them
        # (_place_bypass), so the arena leaves them mapped
        halves = {w.name for t in spec.layers if t.gate_up is not None and t.gate_up.quant is not None
                  for w in t.bypass() if w is not None}
        mapped |= halves
        self.arena = WeightArena(manifest, self._weight_refs(), mapped=mapped, halves=halves)
        self._extra: list[np.ndarray] = []  # arrays the structs point into (biases, CATS layouts)
        self._quad_bytes: list[tuple[int, int]] = []  # GRIFFIN layers whose down the kernel reads repacked
        self._quads: list[tuple[int, np.ndarray]] = []  # ... and their buffers (_place_quads), repacked per select()
        self._r16_src: list[tuple] = []  # GRIFFIN layers whose gate / up rows are read in r16: (i, codes, scales)
        self._r16_rows: list[tuple] = []  # ... with the copies read (_place_r16): (i, codes, scales, copy, copy)
        self._bypass_src: list[tuple] = []  # quantized-FFN layers with a bypass: (i, L, R), placed by _place_bypass
        self.bypass_rows: dict[int, np.ndarray] = {}  # ... and what the kernel reads: [rank, 2 hidden], [L^T | R]
        self._layers = (lib_.Layer * self.layout.num_layers)()
        self._model = lib_.Model()
        self._fill_model()
        self._skipped = ctypes.c_int64(0)
        self._next = (ctypes.c_int64 * 2)()
        self._block = [(ctypes.c_int64 * self.STEP_BLOCK)() for _ in range(4)]  # caprese_decode_n's outputs
        self.head_rows = 0  # fp32 head rows the last screened step recomputed
        self.head_rows_total = self.head_steps = 0  # summed over the screened steps since load
        # a quantized head is read whole: its int4 / int8 rows cost no more than the screen's int8 copy would, and
        # the screen's bound is for an fp32 head (see the runtime README: "quantized engines")
        self.head_quantized = spec.head.quant is not None
        if self.head_quantized:
            head = "full"
        if head != "full":
            self._screen_head()
        ctx = self.lib.caprese_context_new(ctypes.byref(self._model), self.nthreads)
        if not ctx:
            raise CapreseError(f"the native kernel could not allocate its buffers or start {self.nthreads} threads; "
                               "pass fewer --threads, or use --backend onnxruntime")
        self._ctx = ctypes.c_void_p(ctx)
        self._threads = cpu_threads.FollowLoad(threads, self._set_active, most=self.nthreads).start()
        self.head_choice: HeadChoice | None = None
        if head == "auto":
            self.head_choice = self._choose_head()
            head = self.head_choice.head
            if head == "full":  # the int8 copy is not read: give its memory back
                self.lib.caprese_context_quiesce(self._ctx)  # a late helper's probe chunk may still read it
                self._model.head_q = self._model.head_scale = self._model.head_bound = None
                self._head_q = self._head_scale = self._head_bound = None
            self.kernel_profile(reset=True)
        self.head = head  # (the probe's head phases are not decode steps: kernel_profile starts after them)

    def _choose_head(self) -> HeadChoice:
        """Time the screened and the full head on this CPU (or read the cached result): see head_choice.py."""
        from caprese.model.default_model import cache_root

        lay = self.layout
        rng = np.random.default_rng(0)  # a final hidden state of the right scale: normed, times the norm weight
        h = (rng.standard_normal(lay.hidden_size) * self.arena[self.manifest.spec.final_norm]).astype(np.float32)
        nxt = (ctypes.c_int64 * 2)()

        def full():
            self._check(self.lib.caprese_head_only(self._live(), address(h), None))

        def screened():
            nxt[0] = 1
            self._check(self.lib.caprese_head_only(self._live(), address(h), nxt))
            return int(nxt[1])

        # the threads working now (the probe times them; the cached answer is for that count)
        key = f"{self.kernel.name}|head {lay.vocab_size}x{lay.hidden_size}|threads {self._threads.threads}"
        return choose(key, full, screened, cache_root() / "native")

    def close(self) -> None:
        """Stop the kernel's threads and free its buffers (also on garbage collection)."""
        if getattr(self, "_ctx", None):
            self.lib.caprese_context_free(self._ctx)
            self._ctx = None

    def _live(self) -> ctypes.c_void_p:
        """The kernel's context, for a call into it: after close() a Python error, not a NULL the C side reads."""
        if not getattr(self, "_ctx", None):
            raise CapreseError("this native backend was closed; load the engine again")
        return self._ctx

    def __del__(self):
        self.close()

    def _screen_head(self) -> None:
        w = self.arena[self.manifest.spec.head]
        q = huge_buffer(w.size).reshape(w.shape).view(np.int8)
        q, self._head_scale, self._head_bound = quantize_head(w, q_out=q)
        self._head_q = q
        M = self._model
        M.head_q, M.head_scale, M.head_bound = address(q), address(self._head_scale), address(self._head_bound)

    def _weight_refs(self) -> list[WeightRef]:
        """The weights.bin tensors a decode step reads, by role (engine_spec: GRIFFIN layers read the per-prompt
        buffers instead of their dense FFN)."""
        spec = self.manifest.spec
        return [spec.embed, spec.head, spec.final_norm, spec.rope_cos, spec.rope_sin] + [
            w for t in spec.layers for w in t.decode_reads()]

    # ---- the structs the kernel reads ----
    def _mat(self, a: np.ndarray, cols: int | None = None) -> lib_.Mat:
        return lib_.Mat(address(a), a.shape[-1], a.shape[-1] if cols is None else cols)

    def _qmat(self, ref: WeightRef, codes: np.ndarray | None = None, scales: np.ndarray | None = None,
              row0: int = 0, rows: int | None = None, role: str = "") -> lib_.QMat:
        """quant_gemv.c's QMat of rows [row0, row0 + rows) of quantized weight `ref` (stored [rows, cols], blocks
        along the columns): its codes and scales in the arena, or the given per-prompt buffers (GRIFFIN's rows,
        in `ref`'s format)."""
        q = ref.quant
        if role and ref.storage != MATRIX_T:
            raise CapreseError(f"{role} {ref.name} is stored {ref.storage}; the native kernel reads quantized "
                               f"{role} as [out, in] rows: export the engine again, or use --backend onnxruntime")
        cols = ref.shape[1]
        block = q.block_size or cols
        codes = self.arena[ref] if codes is None else codes
        scales = self.arena[q.scale] if scales is None else scales
        rb, sb = cols * q.bits // 8, (cols // block) * scales.itemsize
        n = ref.shape[0] - row0 if rows is None else rows
        return lib_.QMat(address(codes) + row0 * rb, address(scales) + row0 * sb, n, cols, block, q.bits,
                         int(scales.dtype == np.float32))

    def _fill_q_ffn(self, t, L) -> None:
        """A layer whose FFN is quantized (see decode_step.c's Layer: q_gate, q_up, q_down, L in gu2, R in down)."""
        lay, A, sel, i = self.layout, self.arena, self.buffers.selection, t.index
        F = lay.intermediate_size
        L.q_ffn = 1
        bypass_l, bypass_r = t.bypass()
        if t.kind == C.GRIFFIN:  # the kept neurons' rows, gathered per prompt by the fold (FoldInto.quantized_rows)
            k, fold = lay.k, t.fold
            gu_q, gu_s = sel[C.w_gu_q(i)].host[0], sel[C.w_gu_s(i)].host[0]
            d_q, d_s = sel[C.w_d_q(i)].host[0], sel[C.w_d_s(i)].host[0]
            L.q_gate = self._qmat(fold.gate_up, gu_q, gu_s, 0, k, role="gate_up")
            L.q_up = self._qmat(fold.gate_up, gu_q, gu_s, k, k, role="gate_up")
            L.q_down = self._qmat(fold.down, d_q, d_s, 0, k)
            L.down_rows = 1
            if self.int8_activations and self.lib.caprese_qa_quads() and self.lib.caprese_qa_fits(L.q_down):
                # AVX-512: the down rows in the kernel's own layout, repacked from the fold's at each select()
                self._quad_bytes.append((i, self.lib.caprese_qa_quads_bytes(L.q_down)))
            if (self.int8_activations and self.lib.caprese_qx_r16_preferred()
                    and self.lib.caprese_qx_r16_fits(ctypes.byref(L.q_gate))):
                self._r16_src.append((i, gu_q, gu_s))  # gate / up: an r16 copy of the fold's, per select()
            if fold.down.storage != MATRIX:
                raise CapreseError(f"GRIFFIN layer {i}: its down rows are stored {fold.down.storage}; the native "
                                   "kernel reads a neuron's down row whole: export the engine again")
            L.n_ff = k
            b = sel.get(C.b_gul(i))
            L.gu_bias = None if b is None else address(b.host[0])
        else:
            if t.gate_up is not None:  # [W_g; W_1] rows
                L.q_gate = self._qmat(t.gate_up, rows=F, role="gate_up")
                L.q_up = self._qmat(t.gate_up, row0=F, rows=F, role="gate_up")
                L.gu_bias = None if t.gate_up_bias is None else address(A[t.gate_up_bias])
            else:
                L.q_gate, L.q_up = self._qmat(t.gate, role="gate"), self._qmat(t.up, role="up")
                L.gu_bias = self._split_gate_up_bias(t, F)
            L.q_down = self._qmat(t.down)
            L.down_rows = int(t.down.storage == MATRIX)
            if t.down.shape != ((F, lay.hidden_size) if L.down_rows else (lay.hidden_size, F)):
                raise CapreseError(f"layer {i}: down projection of shape {list(t.down.shape)} in weights.bin; "
                                   "export the engine again")
            L.n_ff = F
            if t.kind == C.CATS:  # the up rows of the neurons that pass, read in the down phase
                L.cats_tau = address(sel[C.cats_tau(i)].host)
                if L.gu_bias:
                    L.up_bias = L.gu_bias + F * 4
        L.rank = 0
        if bypass_l is not None:
            l_, r_ = A[bypass_l], A[bypass_r]
            L.rank = l_.shape[1]
            L.gu2 = self._mat(l_)
            L.bypass_f16 = int(l_.dtype == np.float16)  # --fp16-bypass (the arena keeps weights.bin's dtype)
            self._bypass_src.append((i, l_, r_))  # L^T and R, row by row in one buffer (_place_bypass)
            if not L.down_rows:  # R's rows are added beside the quantized down rows (rows-axpy) only
                raise CapreseError(f"layer {i}: a bypass beside a down projection stored {t.down.storage}; the native "
                                   "kernel reads it with down stored [F, D]: use --backend onnxruntime")

    def _place_bypass(self) -> None:
        """Every bypass layer's L transposed and R in one buffer (huge pages advised), row r of R right after row r
        of L^T (its dtype): a chunk of bypass neurons then reads one contiguous stream (decode_step.c's
        bypass_rows), where L^T and R apart were two short ones, each started cold."""
        if not self._bypass_src:
            return
        spans = [-(-2 * l_.nbytes // 64) * 64 for _, l_, _ in self._bypass_src]  # [L^T | R], whole cache lines
        buf = huge_buffer(sum(spans))
        self._extra.append(buf)
        at = 0
        for (i, l_, r_), span in zip(self._bypass_src, spans):
            (D, rank), es = l_.shape, l_.itemsize
            rows = buf[at:at + 2 * l_.nbytes].view(l_.dtype).reshape(rank, 2 * D)
            at += span
            rows[:, :D], rows[:, D:] = l_.T, r_
            self.bypass_rows[i] = rows
            L = self._layers[i]
            L.l_t, L.l_ld = address(rows), 2 * D
            L.down = lib_.Mat(address(rows) + D * es, 2 * D, D)

    def _place_quads(self) -> None:
        """One buffer (huge pages advised, as the arena's) for every GRIFFIN layer's down quads, packed from what
        the selection buffers hold now."""
        buf = huge_buffer(sum(n for _, n in self._quad_bytes))
        self._extra.append(buf)
        ends = np.cumsum([n for _, n in self._quad_bytes])
        self._quads = [(i, buf[e - n:e]) for (i, n), e in zip(self._quad_bytes, ends)]
        for i, quads in self._quads:
            self._layers[i].down_quads = address(quads)
            self.lib.caprese_qa_pack_quads(self._layers[i].q_down, address(quads))

    def _place_r16(self) -> None:
        """GRIFFIN's gate / up rows (the fold's per-prompt buffers) copied into one buffer the kernel reads in its
        r16 layout (_repack_r16): the layers' q_gate / q_up point there, repacked from the fold's at each select()."""
        def lines(a: np.ndarray) -> int:  # its bytes, whole cache lines
            return -(-a.nbytes // 64) * 64

        buf = huge_buffer(sum(lines(gu_q) + lines(gu_s) for _, gu_q, gu_s in self._r16_src))
        self._extra.append(buf)
        at = 0
        for i, gu_q, gu_s in self._r16_src:
            codes = buf[at:at + gu_q.nbytes].reshape(gu_q.shape)
            at += lines(gu_q)
            scales = buf[at:at + gu_s.nbytes].view(gu_s.dtype).reshape(gu_s.shape)
            at += lines(gu_s)
            L, k = self._layers[i], self.layout.k
            for q, row0 in ((L.q_gate, 0), (L.q_up, k)):
                q.codes = address(codes) + row0 * codes.shape[1]
                q.scales = address(scales) + row0 * scales.shape[1] * scales.itemsize
            self._r16_rows.append((i, gu_q, gu_s, codes, scales))
        self._pack_r16_rows()

    def _pack_r16_rows(self) -> None:
        for i, gu_q, gu_s, codes, scales in self._r16_rows:
            codes[...] = gu_q
            scales[...] = gu_s
            L = self._layers[i]
            for q in (L.q_gate, L.q_up):
                q.layout = 0
            self._repack_r16([L.q_gate, L.q_up])

    def _split_gate_up_bias(self, t, F: int) -> int | None:
        """[b_g, b_1] of a layer whose gate and up are stored apart (a missing one zeros), kept alive here."""
        if t.gate_bias is None and t.up_bias is None:
            return None
        zeros = np.zeros(F, np.float32)
        b = np.concatenate([zeros if t.gate_bias is None else self.arena[t.gate_bias],
                            zeros if t.up_bias is None else self.arena[t.up_bias]])
        self._extra.append(b)
        return address(b)

    def _fill_model(self) -> None:
        lay, spec, m, A = self.layout, self.manifest.spec, self.manifest.model, self.arena
        D, F = lay.hidden_size, lay.intermediate_size
        sel = self.buffers.selection
        max_ff = 0
        for t in spec.layers:  # engine_spec.LayerTensors: the layer's weights by role
            i, L = t.index, self._layers[t.index]
            for f in ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "q_norm", "k_norm",
                      "qkv_bias", "o_bias", "down_bias"):
                w = getattr(t, f)
                setattr(L, f, None if w is None else address(A[w]))
            if t.qkv.quant is not None:
                L.q_attn = 1
                L.q_qkv, L.q_o = self._qmat(t.qkv, role="qkv"), self._qmat(t.o, role="o")
            else:
                L.qkv, L.o = self._mat(A[t.qkv]), self._mat(A[t.o])
            if t.down.quant is not None and (t.kind != C.GRIFFIN or C.w_gu_q(i) in sel):
                self._fill_q_ffn(t, L)
            elif t.kind == C.GRIFFIN:  # the per-prompt matrices the prefill runner folds
                gul, dr = sel[C.w_gul(i)].host[0], sel[C.w_dr(i)].host[0]
                L.gu1, L.down = self._mat(gul), self._mat(dr)
                L.n_ff, L.rank = lay.k, lay.rank
                b = sel.get(C.b_gul(i))
                L.gu_bias = None if b is None else address(b.host[0])
            else:
                down = A[t.down]
                L.down = self._mat(down)
                if t.gate is not None:  # --target onnxruntime dense layers: gate and up apart
                    L.gu1, L.gu2 = self._mat(A[t.gate]), self._mat(A[t.up])
                    L.n_ff, L.rank = F, 0
                    L.gu_bias = self._split_gate_up_bias(t, F)
                else:  # [W_g, W_1] (+ L for CATS with a bypass), [W_2 ; R]
                    g1 = A[t.gate_up]
                    L.gu1 = self._mat(g1)
                    L.n_ff, L.rank = F, g1.shape[1] - 2 * F
                    L.gu_bias = None if t.gate_up_bias is None else address(A[t.gate_up_bias])
                if t.kind == C.CATS:  # [W_g, L] as the product; up transposed, read for passing neurons only
                    L.cats_tau = address(sel[C.cats_tau(i)].host)
                    gate_l = copy_huge(np.concatenate([g1[:, :F], g1[:, 2 * F:]], axis=1))
                    up_t = copy_huge(g1[:, F:2 * F].T)
                    self._extra += [gate_l, up_t]
                    L.up_t = self._mat(up_t)
                    L.gu1 = lib_.Mat(address(gate_l), gate_l.shape[1], F)
                    if L.rank:
                        L.gu2 = lib_.Mat(address(gate_l) + F * gate_l.itemsize, gate_l.shape[1], L.rank)
                    if t.gate_up_bias is not None:
                        L.up_bias = address(A[t.gate_up_bias]) + F * 4
                if down.shape != (L.n_ff + L.rank, D):
                    raise CapreseError(f"layer {i}: down projection of shape {list(down.shape)} in weights.bin; "
                                       "export the engine again")
            max_ff = max(max_ff, L.n_ff + L.rank)
            window = m.sliding_windows[i] if m.sliding_windows else None
            L.window = int(window or 0)
            L.scale = float(m.attn_scale) if m.attn_scale is not None else lay.head_dim ** -0.5
            L.softcap = float(m.attn_softcap or 0.0)
        self._place_bypass()
        if self._quad_bytes:
            self._place_quads()
        if self._r16_src:
            self._place_r16()
        self._repack_r16()
        M = self._model
        M.num_layers, M.hidden = lay.num_layers, D
        M.num_heads, M.num_kv_heads, M.head_dim = m.num_heads, lay.num_kv_heads, lay.head_dim
        M.vocab, M.max_ff = lay.vocab_size, max_ff
        M.activation, M.gemma = _ACTIVATIONS[m.activation], int(bool(m.gemma_norms))
        M.eps, M.final_softcap = float(m.rms_norm_eps), float(m.final_softcap or 0.0)
        M.embed_scale = float(D ** 0.5) if m.gemma_norms else 1.0
        M.embed = address(A[spec.embed])
        if spec.head.quant is not None:  # read whole by the kernel (never screened: see _screen_head)
            M.q_head, M.q_lm_head = 1, self._qmat(spec.head, role="LM head")
        else:
            M.lm_head = address(A[spec.head])
        M.final_norm = address(A[spec.final_norm])
        M.int8_act = 2 if self.int8_down else int(self.int8_activations)
        M.kv_f16 = int(lay.kv_dtype == "float16")
        if M.kv_f16:  # GroupQueryAttention in fp16 rotates by the fp16-rounded tables (--kv-dtype fp16)
            for name, ref in (("rope_cos", spec.rope_cos), ("rope_sin", spec.rope_sin)):
                t = np.ascontiguousarray(A[ref], dtype=np.float32).astype(np.float16).astype(np.float32)
                self._extra.append(t)
                setattr(M, name, address(t))
        else:
            M.rope_cos, M.rope_sin = address(A[spec.rope_cos]), address(A[spec.rope_sin])
        M.layers = self._layers
        M.logits = address(self.buffers[C.LOGITS].host)
        if M.q_head:
            self._repack_r16([M.q_lm_head])

    def r16_matrices(self) -> int:
        """How many int4 matrices the kernel reads in its r16 layout (_repack_r16)."""
        mats = [getattr(L, f) for L in self._layers for f in ("q_qkv", "q_o", "q_gate", "q_up", "q_down")]
        return sum(q.layout == lib_.QG_R16 for q in mats + [self._model.q_lm_head])

    def _repack_r16(self, mats: list | None = None) -> None:
        """Where this build reads them faster so (caprese_qx_r16_preferred: AVX-512, AVX2), the int4 rows-dot
        weights of an int8-activation engine are rewritten in place in the kernel's groups of 16 rows
        (native/int8_activations.c, "r16"): in the arena, QKV, o, a dense or CATS layer's gate (and dense up), a
        down stored [hidden, n_ff]; the quantized head and GRIFFIN's gate / up copies (_place_r16) as `mats`. CATS'
        up (read by neuron) keeps its rows. The same values: the same products up to fp32 rounding (r16 sums a
        block's integer products before scaling them)."""
        if not (self.int8_activations and self.lib.caprese_qx_r16_preferred()):
            return
        if mats is None:
            mats = []
            for t in self.manifest.spec.layers:
                L = self._layers[t.index]
                if L.q_attn:
                    mats += [L.q_qkv, L.q_o]
                if L.q_ffn and t.kind != C.GRIFFIN:
                    mats += [L.q_gate] + ([] if L.cats_tau else [L.q_up]) + ([] if L.down_rows else [L.q_down])
        for q in mats:  # ctypes views into the structs: setting layout sets the kernel's field
            if q.layout == lib_.QG_R16 or not self.lib.caprese_qx_r16_fits(ctypes.byref(q)):
                continue
            if self.lib.caprese_qx_pack_r16(ctypes.byref(q)):
                raise CapreseError("out of memory repacking the int4 weights for the native kernel; use --backend "
                                   "onnxruntime")
            q.layout = lib_.QG_R16

    def reserve(self, need: int, keep: int = 0) -> None:
        """The prefill runner's reserve(); the kernel then points at the KV buffers it (re)allocated."""
        if self.buffers.plan(need, keep) is None:
            return
        if self._ctx:  # no helper may still read the KV buffers that reserve() is about to drop
            self.lib.caprese_context_quiesce(self._ctx)
        self._rows(keep)  # the kept slots are copied as rows
        self.prefill_runner.reserve(need, keep)
        kv = self.buffers.kv
        for i in range(self.layout.num_layers):
            self._layers[i].k_cache = address(kv[C.past_key(i)].host)
            self._layers[i].v_cache = address(kv[C.past_value(i)].host)
        self.capacity = self._model.capacity = self.buffers.capacity
        self._tiles_ok = bool(self._model.kv_f16 and self.lib.isa == "avx512" and self.capacity % 16 == 0)

    # K in tiles (Model.k_tiles, native/decode_step.c): q.K over 16-slot tiles skips the horizontal sums of row dot
    # products (the attention phase 0.81-0.86x on one thread, docs/performance.md). ONNX Runtime reads and writes
    # the same buffers in rows, so each prefill turns the cache back into rows first and into tiles after (a pass
    # over the cached slots' K, ~0.5 ms per 256 slots of SmolLM2). A reply that re-selects runs a prefill every few
    # steps: its cache stays in rows.
    def _rows(self, slots: int | None = None) -> None:
        """K of slots [0, slots) (None: every slot) back in rows: what ONNX Runtime's prefill at `slots` or a
        reallocation keeping `slots` reads. Later slots are rewritten before anything reads them."""
        if self._model.k_tiles:
            self._kv_tiles(self.capacity if slots is None else slots, 0)
            self._model.k_tiles = 0

    def _kv_tiles(self, slots: int, to_tiles: int) -> None:
        if self._ctx:  # no helper may still read the cache (a late chunk of the last step)
            self.lib.caprese_context_quiesce(self._ctx)
        if self.lib.caprese_kv_tiles(ctypes.byref(self._model), min(slots, self.capacity), to_tiles):
            raise RuntimeError(f"the native kernel cannot hold this KV cache in tiles (capacity {self.capacity})")

    def kv_as_rows(self) -> None:
        self._rows()

    def reselecting(self, every: int) -> None:
        self._reselecting = every > 0  # the reply's first prefill leaves its cache in rows

    def prefill(self, ids: list[int], start: int) -> PrefillOut:
        self._rows(start)
        out = self.prefill_runner.prefill(ids, start)
        if self._tiles_ok and not self._reselecting:
            self._kv_tiles(start + len(ids), 1)
            self._model.k_tiles = 1
        return out

    def select(self, griffin: dict, tau: dict) -> None:
        self.prefill_runner.select(griffin, tau)
        for i, quads in self._quads:  # the fold wrote this prompt's kept rows: their quads for the kernel
            self.lib.caprese_qa_pack_quads(self._layers[i].q_down, address(quads))
        self._pack_r16_rows()  # ... and their gate / up rows in r16

    def _logits(self):
        return self.prefill_runner.logits()

    # ---- running ----
    def _step(self, token: int, slot: int, top: int = 0) -> None:
        """One kernel call; top = k > 0: a screened step for the k largest logits (a quantized head: k = 1, every
        logit computed and the argmax found in the kernel)."""
        if slot >= self.capacity:
            raise RuntimeError(f"decode at slot {slot} past the KV cache ({self.capacity}); reserve first")
        self._next[0] = top
        self._threads.tick()
        self._check(self.lib.caprese_decode_step(self._live(), int(token), int(slot), ctypes.byref(self._skipped),
                                                 self._next if top else None))
        if top and not self.head_quantized:
            self.head_rows = int(self._next[1])
            self.head_rows_total += self.head_rows
            self.head_steps += 1

    def _set_active(self, n: int) -> None:
        self.lib.caprese_context_set_active(self._live(), n)

    @staticmethod
    def _check(rc: int) -> None:
        if rc:
            why = {1: "bad token, slot or k", 2: "out of memory", 3: "no finite logit"}.get(rc, "?")
            raise RuntimeError(f"the native decode step failed (code {rc}: {why})")

    def _screens(self, k: int) -> bool:
        return self.head == "screened" and 1 <= k <= min(self.lib.head_topk_max, self.layout.vocab_size)

    def decode(self, token: int, slot: int):
        self._step(token, slot)
        return self._logits()

    def decode_greedy(self, token: int, slot: int) -> int:
        if not (self._screens(1) or self.head_quantized):  # a quantized head: the kernel's argmax, no Python
            return super().decode_greedy(token, slot)
        self._step(token, slot, top=1)
        return int(self._next[0])

    STEP_BLOCK = 16  # decode steps in one kernel call: the text still streams, in bursts of at most this many

    @property
    def greedy_block(self) -> int:
        """Greedy steps one decode_greedy_n call runs in the kernel (caprese_decode_n at temperature 0: the argmax
        of a screened or quantized head, found in C); a full fp32 head's argmax is taken in Python, a step at a time."""
        return self.STEP_BLOCK if (self._screens(1) or self.head_quantized) else 1

    def decode_greedy_n(self, token: int, slot: int, n: int, eos: set[int]) -> Steps:
        """Up to n greedy steps in one kernel call, stopping after a token in eos. After a step's ~80 MB stream the
        Python around each call ran cold, ~70 µs a token (docs/performance.md); one call pays that once."""
        if self.greedy_block == 1 or n == 1:
            return super().decode_greedy_n(token, slot, n, eos)
        n, ends = self._block_start(slot, n, eos)
        got = self.lib.caprese_decode_n(self._live(), int(token), int(slot), n, self._eos, ends, 0.0, 0, 1.0, 1, None,
                                        *self._block)
        return self._block_steps(got, screened=not self.head_quantized)

    def _block_start(self, slot: int, n: int, eos: set[int]) -> tuple[int, int]:
        """A block call's steps (at most STEP_BLOCK, within the cache) and its end-of-sequence ids (self._eos)."""
        n = min(n, self.STEP_BLOCK)
        if slot + n > self.capacity:
            raise RuntimeError(f"decode at slots {slot}..{slot + n - 1} past the KV cache ({self.capacity}); "
                               "reserve first")
        ends = sorted(eos)
        self._eos = (ctypes.c_int64 * max(1, len(ends)))(*ends)
        self._threads.tick()
        return n, len(ends)

    def _block_steps(self, got: int, screened: bool) -> Steps:
        """A block call's result: its steps, and the screened head's row counts where its steps screened."""
        if got < 0:
            self._check(-got)
        toks, ns, skipped, rows = (list(a[:got]) for a in self._block)
        if screened:
            self.head_rows = rows[-1]
            self.head_rows_total += sum(rows)
            self.head_steps += got
        self._skipped.value = skipped[-1]
        return Steps(toks, [t / 1e6 for t in ns], [k + self.arena.saved_bytes for k in skipped])

    @property
    def sample_block(self) -> int:
        """Sampled steps one decode_sample_n call runs in the kernel (caprese_decode_n: every step's logits
        sampled in C with uniforms drawn here from the seeded generator)."""
        return self.STEP_BLOCK

    def decode_sample_n(self, token: int, slot: int, n: int, eos: set[int], sampling,
                        generator: torch.Generator | None) -> Steps:
        """Up to n sampled steps in one kernel call (temperature, top-k, top-p: caprese/model/sampling.py's
        single-row definition, in C), stopping after a token in eos; the uniforms come from `generator`, n at a
        time. A screened head computes only what top-k reads."""
        n, ends = self._block_start(slot, n, eos)
        u = torch.rand(n, generator=generator).double().numpy()
        k = sampling.top_k
        screen = k if (k and self._screens(k) and not self.head_quantized) else 0
        got = self.lib.caprese_decode_n(
            self._live(), int(token), int(slot), n, self._eos, ends, float(sampling.temperature), int(k),
            float(sampling.top_p), screen, u.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), *self._block)
        return self._block_steps(got, screened=bool(screen))

    def decode_top(self, token: int, slot: int, k: int):
        if not self._screens(k):
            return self.decode(token, slot)
        self._step(token, slot, top=k)
        return self._logits()  # exact where the k largest can be, -inf elsewhere

    def attended(self, slot: int) -> int:
        return slot + 1  # the kernel reads the valid prefix of the cache, not the whole buffer

    def skipped_bytes(self) -> int:
        """Weight bytes the last step did not read: CATS' rows, the screened head's savings (the kernel's count),
        and the scales the arena holds as fp16 (WeightArena.saved_bytes)."""
        return int(self._skipped.value) + self.arena.saved_bytes

    def kernel_stats(self) -> dict:
        """Since load: chunks committed by the calling thread and by the helpers, chunks run again because their
        thread was late (descheduled), executions dropped (another thread committed first), ms the calling thread
        waited for other threads' chunks, phases run (a decode step is ~4 per layer)."""
        out = (ctypes.c_int64 * 6)()
        self.lib.caprese_context_stats(self._live(), out)
        d = dict(zip(("leader_chunks", "helper_chunks", "rerun_chunks", "dropped_runs", "wait_ms", "phases"),
                     map(int, out)))
        d["wait_ms"] = round(d["wait_ms"] / 1e6, 3)
        return d

    def kernel_profile(self, reset: bool = False) -> dict:
        """Where the decode steps' wall time went, per step, since load or the last reset: µs in each kind of
        phase (the calling thread's time from publishing it to its last result, helpers' work included), and
        `between_phases_us`, the rest of the step (norms, activations, the int8 rounding of inputs: serial work)."""
        n = len(PROFILE_LABELS)
        out = (ctypes.c_int64 * (2 * n + 2))()
        if self.lib.caprese_context_profile(self._live(), out, int(reset)) != n:
            raise RuntimeError("the native kernel's profile labels do not match native_backend.PROFILE_LABELS")
        steps = int(out[2 * n + 1])
        per = max(1, steps)
        phases = {name: round(out[k] / 1e3 / per, 2) for k, name in enumerate(PROFILE_LABELS) if out[n + k]}
        step_us = out[2 * n] / 1e3 / per
        return {"steps": steps, "step_us": round(step_us, 2), "phases_us": phases,
                "phases_per_step": round(sum(out[n:2 * n]) / per, 1),
                "between_phases_us": round(step_us - sum(phases.values()), 2)}

    def describe(self) -> dict:
        d = {"threads": self._threads.threads, "pool_threads": self.nthreads,
             "threads_follow_load": self._threads.explicit is None, "kv_policy": self.kv_policy,
             "prefill": "onnxruntime",
             "prefill_stop_spinning": self.prefill_runner.stop_spinning,
             "kernel": str(self.kernel), "isa": self.lib.isa,
             "head": self.head + (" (quantized, read whole)" if self.head_quantized else ""),
             "activations": ("int8 (int4 weights" + (", GRIFFIN's down too)" if self.int8_down
                                                     else "; GRIFFIN's down int16)")
                             if self.int8_activations else "fp32"),
             "r16_matrices": self.r16_matrices()}
        if self.head_choice is not None:
            d["head_choice"] = self.head_choice.describe()
        return d
