"""THE graph I/O contract between `caprese-export` and every runtime: names, shapes, dtypes, node naming.

Everything a runtime needs to drive the exported graphs is defined here and nowhere else; the exporter builds
its graphs from these definitions, the manifest records `GraphLayout.to_dict()` + the I/O lists, and the
runtime rebuilds the lists from the manifest with the same functions and compares. The weights inside
weights.bin (names, shapes, dtypes, storage, by role) are the engine spec's: engine_spec.py.

Two graphs (ENGINE_DIR/prefill.onnx, ENGINE_DIR/decode.onnx) share one external-data file (weights.bin):
every weight is stored once and both graphs' initializers point at the same offsets.

Inputs (both graphs; `batch`, `seq`, `cache_len` are symbolic dims, decode has seq = 1):
  input_ids        [batch, seq]                    int64   token ids of the new tokens
  position_ids     [batch, seq]                    int64   RoPE positions (slot - left padding of the row)
  write_indices    [batch]                         int64   cache slot of the first new token of each row
  attention_mask   [batch, cache_len]              int64   1 = the slot holds (or will hold) a real token,
                                                           0 = left padding; causality and sliding windows
                                                           are applied inside the graph
  past_key.{i}     [batch, kv_heads, cache_len, head_dim]  the KV buffers, allocated ONCE at the runtime's
  past_value.{i}   [batch, kv_heads, cache_len, head_dim]  maximum length (cache_len <= max_seq_len); the
                                                           precision's dtype, or float16 (layout.kv_dtype)
Outputs (both graphs):
  logits           [batch, 1, vocab]               float32 logits of the LAST new token of each row
  present_key.{i}  same as past_key.{i}            the same buffer with the new tokens written at
  present_value.{i}                                write_indices (TensorScatter, axis -2). Runtimes bind
                                                   present_* to the SAME memory as past_* (ONNX Runtime IO
                                                   binding / TensorRT: the same device pointer), so the
                                                   cache is updated in place and never copied per token.
Prefill only (selection statistics of the approximated layers, for the prompt tokens of this call):
  griffin_stat.{i} [batch, intermediate]           float32 Σ_t (z_t / ‖z_t‖)² over the valid new tokens;
                                                   GRIFFIN's s is its square root. A later prefill call
                                                   (reselection / chunked prompt) returns the sum over its
                                                   own tokens: the runtime adds it to the running value.
  cats_tau.{i}     [batch]                         float32 a threshold τ with the same kept set as the
                                                   (1 - density) percentile of |act(x W_g)| over the
                                                   valid new tokens (see onnx_graph.cats_threshold)
Decode only:
  w_gul.{i}        [batch, hidden, 2k + r]         GRIFFIN layers: [Ŵ_g, Ŵ_1, L], the compact gate / up
  w_dr.{i}         [batch, k + r, hidden]          columns of the selected neurons + the bypass, and
                                                   [Ŵ_2 ; R]; filled by the runtime once per prompt (and
                                                   per reselection) into persistent buffers
  b_gul.{i}        [batch, 2k + r]                 GRIFFIN layers of models with MLP biases only: the
                                                   selected gate / up biases, then r zeros
  cats_tau.{i}     [batch]                         CATS layers: the threshold (from prefill, or a fixed τ)
Decode only, GRIFFIN layers of a QUANTIZED layout (weight_bits 4 | 8) instead of w_gul / w_dr: the kept neurons'
rows of the quantized gate/up ([out, in], blocks along hidden) and down ([F, D], blocks along hidden) with their
scales, gathered whole (a row is whole blocks); L and R stay float constants of the graph:
  w_gu_q.{i}       [batch, 2k, hidden]             int4 | int8 codes: the k gate rows, then the k up rows
  w_gu_s.{i}       [batch, 2k, hidden / block]     their scales (scale_dtype; one per row when block is 0)
  w_d_q.{i}        [batch, k, hidden]              int4 | int8 codes of the k down rows
  w_d_s.{i}        [batch, k, hidden / block]      their scales
  b_gul.{i}        [batch, 2k + r]                 as above
  The TensorRT decode graph of such a layout, and every decode graph of one exported with --float-selection
  (GraphLayout.quantized_selection False), keep w_gul / w_dr in floats, folded from the dequantized rows: TensorRT
  dequantizes INT4 only from build-time constants (weight-only quantization) and INT8 blocks not at all.
Dense layers keep constant weights in both graphs. BYPASS layers (calibration method "none": quantization alone
plus the bypass) too: the full FFN in both graphs, + x·L·R in decode only (no selection, no extra I/O).

TensorRT graph copies (what `--engine` parses; see TENSORRT_ENGINES and GraphLayout.tensorrt_engines):
  The KV cache of a TensorRT graph has the STATIC length max_seq_len (TensorScatter is imported as
  IKVCacheUpdateLayer, whose cache must be a network input with a static sequence length); everything else is
  as above. Without GRIFFIN layers ONE engine serves prefill and decode (two optimization profiles), so the
  weights are on the GPU once: its graph is the prefill graph, plus, when CATS (or BYPASS) layers are present,
    decode_flag      []                              bool    true: a decode step (CATS thresholds with
                                                             cats_tau_in, bypass on, no τ search); false: a
                                                             prefill call (dense FFN, bypass off, cats_tau out)
    cats_tau_in.{i}  [batch]                         float32 CATS layers: the decode threshold (read when
                                                             decode_flag)
  GRIFFIN engines keep two graphs (static-cache copies of prefill and decode): the per-prompt matrices are
  decode inputs that the prefill graph's constant FFN cannot share.

Node names: `/model/{embed,rope,mask,norm}/<op>`, `/model/layers.{i}/<scope>/<op>` with scope one of
LAYER_SCOPES, and `/lm_head/<op>`; `<op>` is [A-Za-z0-9_.]+ and unique within the graph.
"""

from __future__ import annotations

import dataclasses
import re

FORMAT_VERSION = 2  # 2: the engine spec (engine_spec.py) in manifest.json
OPSET = 24
MS_DOMAIN = "com.microsoft"
TARGET_TENSORRT = "tensorrt"  # the standard-domain graphs: the reference and the default
TARGET_ONNXRUNTIME = "onnxruntime"  # + ONNX Runtime contrib ops (GroupQueryAttention, SkipSimplifiedLayerNorm)
TARGETS = (TARGET_TENSORRT, TARGET_ONNXRUNTIME)
IR_VERSION = 11

PREFILL, DECODE = "prefill", "decode"
GRAPHS = (PREFILL, DECODE)
GRAPH_FILES = {PREFILL: "prefill.onnx", DECODE: "decode.onnx"}
WEIGHTS_FILE = "weights.bin"
WEIGHT_ALIGNMENT = 4096  # every tensor in weights.bin starts at a page boundary (mmap-friendly)

# TensorRT engines: name -> the roles (graphs) it serves, in optimization-profile order
TRT_SHARED = "model"  # one engine, two profiles (prefill, decode): dense and CATS layouts
TENSORRT_ENGINES = {TRT_SHARED: (PREFILL, DECODE), PREFILL: (PREFILL,), DECODE: (DECODE,)}
TENSORRT_GRAPH_FILES = {TRT_SHARED: "tensorrt_model.onnx", PREFILL: "tensorrt_prefill.onnx",
                        DECODE: "tensorrt_decode.onnx"}
TENSORRT_PLAN_FILES = {TRT_SHARED: "model.plan", PREFILL: "prefill.plan", DECODE: "decode.plan"}

# symbolic dimensions
BATCH, SEQ, CACHE_LEN = "batch", "seq", "cache_len"

# graph I/O names
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
WRITE_INDICES = "write_indices"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
DECODE_FLAG = "decode_flag"  # the shared TensorRT graph of a CATS layout: which role this call plays

# per-layer FFN kinds in the graphs
DENSE, GRIFFIN, CATS = "dense", "griffin", "cats"
BYPASS = "bypass"  # calibration method "none": the dense (quantized) FFN, + x·L·R in decode only
LAYER_KINDS = (DENSE, GRIFFIN, CATS, BYPASS)

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

MODEL_SCOPES = ("embed", "rope", "mask", "norm")
LAYER_SCOPES = ("input_norm", "attn", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "mlp", "residual")
NODE_NAME_RE = re.compile(
    r"^(/model/(?:%s)|/model/layers\.(?P<layer>\d+)/(?:%s)|/lm_head)/[A-Za-z0-9_.]+$"
    % ("|".join(MODEL_SCOPES), "|".join(LAYER_SCOPES)))


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"


def griffin_stat(i: int) -> str:
    return f"griffin_stat.{i}"


def cats_tau(i: int) -> str:
    return f"cats_tau.{i}"


def cats_tau_in(i: int) -> str:
    """The decode threshold as an input of the shared (prefill + decode) graph, where cats_tau.{i} is an output."""
    return f"cats_tau_in.{i}"


def w_gul(i: int) -> str:
    return f"w_gul.{i}"


def w_dr(i: int) -> str:
    return f"w_dr.{i}"


def b_gul(i: int) -> str:
    return f"b_gul.{i}"


def w_gu_q(i: int) -> str:
    return f"w_gu_q.{i}"


def w_gu_s(i: int) -> str:
    return f"w_gu_s.{i}"


def w_d_q(i: int) -> str:
    return f"w_d_q.{i}"


def w_d_s(i: int) -> str:
    return f"w_d_s.{i}"


def layer_of(name: str, *families) -> int | None:
    """i where `name` is f(i) for one of `families` (the per-layer name functions above), else None: how code
    outside this module tells a past_key.3 or a w_gul.0 without spelling the names itself."""
    head, dot, tail = name.rpartition(".")
    if not (dot and tail.isdigit()):
        return None
    i = int(tail)
    return i if any(f(i) == name for f in families) else None


# the decode graph's per-prompt inputs: GRIFFIN's folded matrices (float, or a quantized layout's rows), CATS' τ
SELECTION_INPUTS = (w_gul, w_dr, b_gul, cats_tau, w_gu_q, w_gu_s, w_d_q, w_d_s)


def node_name(scope: str, op: str, layer: int | None = None) -> str:
    """The contract's name for a node: scope from MODEL_SCOPES / LAYER_SCOPES (layer given) or 'lm_head'."""
    if scope == "lm_head":
        name = f"/lm_head/{op}"
    elif layer is None:
        if scope not in MODEL_SCOPES:
            raise ValueError(f"unknown model scope {scope!r}")
        name = f"/model/{scope}/{op}"
    else:
        if scope not in LAYER_SCOPES:
            raise ValueError(f"unknown layer scope {scope!r}")
        name = f"/model/layers.{layer}/{scope}/{op}"
    if not NODE_NAME_RE.match(name):
        raise ValueError(f"node name {name!r} breaks the naming contract")
    return name


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float32, float16, bfloat16, int64, bool
    shape: tuple  # ints, or symbolic dim names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def static_cache(specs: list[TensorSpec], cache_len: int) -> list[TensorSpec]:
    """The same tensors with the symbolic cache length replaced by `cache_len` (TensorRT's static KV length)."""
    return [TensorSpec(t.name, t.dtype, tuple(cache_len if d == CACHE_LEN else d for d in t.shape)) for t in specs]


@dataclasses.dataclass(frozen=True)
class GraphLayout:
    """The facts the I/O contract depends on; recorded in the manifest, enough to rebuild every I/O list."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    precision: str  # fp32 | fp16 | bf16: weights, activations and the KV cache
    layer_kinds: tuple  # per layer: DENSE | GRIFFIN | CATS | BYPASS
    k: int = 0  # GRIFFIN neurons kept per approximated layer (0 when no GRIFFIN layer)
    rank: int = 0  # bypass rank r (0: no bypass)
    mlp_bias: bool = False
    weight_bits: int = 0  # quantized weights (engine_spec.QuantRecipe): 4 | 8; 0: floats
    weight_block: int = 0  # their block size (0: one scale per row)
    scale_dtype: str = ""  # their scales' dtype (float16 | float32)
    quantized_selection: bool = True  # a quantized layout's GRIFFIN decode inputs: quantized rows (False: w_gul...)
    kv_dtype: str = ""  # the KV cache's dtype where it is not the precision's: "float16" (an fp32 graph's, --kv-dtype)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}")
        if len(self.layer_kinds) != self.num_layers or any(k not in LAYER_KINDS for k in self.layer_kinds):
            raise ValueError(f"layer_kinds must name one of {LAYER_KINDS} per layer")
        if GRIFFIN in self.layer_kinds and not 0 < self.k <= self.intermediate_size:
            raise ValueError("GRIFFIN layers need 0 < k <= intermediate_size")
        if self.kv_dtype not in ("", "float16") or (self.kv_dtype and self.precision != "fp32"):
            raise ValueError(f"KV cache dtype {self.kv_dtype!r}: an fp32 layout may keep it in float16, nothing else")

    @property
    def dtype(self) -> str:
        return PRECISIONS[self.precision]

    @property
    def cache_dtype(self) -> str:
        """past_* / present_*: the precision's dtype, or kv_dtype."""
        return self.kv_dtype or self.dtype

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == kind]

    @property
    def quantized(self) -> bool:
        return self.weight_bits > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_kinds"] = list(self.layer_kinds)
        if not self.quantized:  # float layouts record what they always did
            for key in ("weight_bits", "weight_block", "scale_dtype", "quantized_selection"):
                del d[key]
        if not self.kv_dtype:  # layouts before --kv-dtype record what they always did
            del d["kv_dtype"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraphLayout":
        d = dict(d)
        d["layer_kinds"] = tuple(d["layer_kinds"])
        return cls(**d)

    # ---- I/O lists, in graph order ----
    def _cache(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.cache_dtype, (BATCH, self.num_kv_heads, CACHE_LEN, self.head_dim))

    def inputs(self, graph: str, quantized_selection: bool | None = None) -> list[TensorSpec]:
        """The graph's inputs in order. quantized_selection (default: the layout's): False gives a quantized
        layout's GRIFFIN decode inputs in floats (w_gul / w_dr: the TensorRT decode graph's)."""
        if quantized_selection is None:
            quantized_selection = self.quantized_selection
        seq = SEQ if graph == PREFILL else 1
        out = [TensorSpec(INPUT_IDS, "int64", (BATCH, seq)),
               TensorSpec(POSITION_IDS, "int64", (BATCH, seq)),
               TensorSpec(WRITE_INDICES, "int64", (BATCH,)),
               TensorSpec(ATTENTION_MASK, "int64", (BATCH, CACHE_LEN))]
        for i in range(self.num_layers):
            out += [self._cache(past_key(i)), self._cache(past_value(i))]
        if graph == DECODE:
            k, r, d = self.k, self.rank, self.hidden_size
            for i, kind in enumerate(self.layer_kinds):
                if kind == GRIFFIN and self.quantized and quantized_selection:
                    codes, nb = f"int{self.weight_bits}", 1 if self.weight_block == 0 else d // self.weight_block
                    out += [TensorSpec(w_gu_q(i), codes, (BATCH, 2 * k, d)),
                            TensorSpec(w_gu_s(i), self.scale_dtype, (BATCH, 2 * k, nb)),
                            TensorSpec(w_d_q(i), codes, (BATCH, k, d)),
                            TensorSpec(w_d_s(i), self.scale_dtype, (BATCH, k, nb))]
                    if self.mlp_bias:
                        out.append(TensorSpec(b_gul(i), self.dtype, (BATCH, 2 * k + r)))
                elif kind == GRIFFIN:
                    out += [TensorSpec(w_gul(i), self.dtype, (BATCH, d, 2 * k + r)),
                            TensorSpec(w_dr(i), self.dtype, (BATCH, k + r, d))]
                    if self.mlp_bias:
                        out.append(TensorSpec(b_gul(i), self.dtype, (BATCH, 2 * k + r)))
                elif kind == CATS:
                    out.append(TensorSpec(cats_tau(i), "float32", (BATCH,)))
        elif graph != PREFILL:
            raise ValueError(f"unknown graph {graph!r}")
        return out

    def outputs(self, graph: str) -> list[TensorSpec]:
        out = [TensorSpec(LOGITS, "float32", (BATCH, 1, self.vocab_size))]
        for i in range(self.num_layers):
            out += [self._cache(present_key(i)), self._cache(present_value(i))]
        if graph == PREFILL:
            for i, kind in enumerate(self.layer_kinds):
                if kind == GRIFFIN:
                    out.append(TensorSpec(griffin_stat(i), "float32", (BATCH, self.intermediate_size)))
                elif kind == CATS:
                    out.append(TensorSpec(cats_tau(i), "float32", (BATCH,)))
        elif graph != DECODE:
            raise ValueError(f"unknown graph {graph!r}")
        return out

    # ---- TensorRT ----
    @property
    def role_switched(self) -> bool:
        """The shared TensorRT graph takes decode_flag: a CATS or BYPASS layer differs between the two roles."""
        return CATS in self.layer_kinds or BYPASS in self.layer_kinds

    @property
    def shares_engine(self) -> bool:
        """One TensorRT engine (two profiles) serves both roles: no layer takes per-prompt weight inputs."""
        return GRIFFIN not in self.layer_kinds

    def tensorrt_engines(self) -> dict[str, tuple]:
        """{engine name: roles in profile order} of this layout's TensorRT engines."""
        names = (TRT_SHARED,) if self.shares_engine else (PREFILL, DECODE)
        return {n: TENSORRT_ENGINES[n] for n in names}

    def tensorrt_io(self, engine: str, cache_len: int | None) -> dict[str, list[TensorSpec]]:
        """{"inputs", "outputs"} of a TensorRT engine's graph: its standard graph's I/O (the shared engine: the
        prefill graph's, + decode_flag with CATS or BYPASS layers, and cats_tau_in.{i} per CATS layer) with the cache length static
        (cache_len None: left symbolic, as the builder writes the graph before the static copy)."""
        if engine == TRT_SHARED:
            inputs, outputs = self.inputs(PREFILL), self.outputs(PREFILL)
            cats = self.layers_of(CATS)
            if self.role_switched:
                inputs = inputs + [TensorSpec(DECODE_FLAG, "bool", ())] + [
                    TensorSpec(cats_tau_in(i), "float32", (BATCH,)) for i in cats]
        elif engine in (PREFILL, DECODE):  # TensorRT: GRIFFIN's per-prompt matrices in floats (module docstring)
            inputs, outputs = self.inputs(engine, quantized_selection=False), self.outputs(engine)
        else:
            raise ValueError(f"unknown TensorRT engine {engine!r}")
        if cache_len is None:
            return {"inputs": inputs, "outputs": outputs}
        return {"inputs": static_cache(inputs, cache_len), "outputs": static_cache(outputs, cache_len)}

    def io_dict(self) -> dict:
        """{graph: {"inputs": [...], "outputs": [...]}} as recorded in the manifest."""
        return {g: {"inputs": [t.to_dict() for t in self.inputs(g)],
                    "outputs": [t.to_dict() for t in self.outputs(g)]} for g in GRAPHS}

    def in_place_pairs(self) -> list[tuple[str, str]]:
        """(input, output) pairs a runtime must bind to the same memory."""
        pairs = []
        for i in range(self.num_layers):
            pairs += [(past_key(i), present_key(i)), (past_value(i), present_value(i))]
        return pairs
