"""EngineSpec: THE place where every exported weight's name in weights.bin, shape, dtype and storage is decided.

An engine folder is described, before any graph is built, by the model (ModelSpec), the recipe (method, density,
layers, k, rank; quantization later), the target (tensorrt | onnxruntime), the precision and the lengths. From
those alone `EngineSpec.build` derives the graph layout (contract.GraphLayout) and, for every layer, the role of
each weight as a WeightRef (name, shape, dtype, storage). The graph builders take their initializer names from
it and check their tensors' shapes against it; the exporter writes it into manifest.json (`to_dict`, keys below);
`manifest.load_manifest` rebuilds it, checks the record and the weights table against it and returns it as
`Manifest.spec`; runtimes read weights through it (no runtime module builds a weight name). Plain code: no torch.

Storage (how a runtime reads the bytes):
  MATRIX    [in, out]: y = x @ W, the math layout (nn.Linear's weight transposed). Fused matrices hold their
            parts side by side: qkv = [W_q, W_k, W_v] (columns); gate_up = [W_g, W_1] (+ L for CATS and BYPASS
            layers with a bypass), so neuron j is columns j and F + j; down = [W_2 ; R] (rows; R likewise).
  MATRIX_T  [out, in]: y = x @ Wᵀ: the LM head (the embedding table itself when tied).
  ROWS      [n, d]: a table read one row per token (the embedding; RoPE's cos/sin, [max_seq_len, head_dim/2]).
  VECTOR    [n]: norm multipliers (Gemma 2: 1 + w, precomputed in float32 before the cast) and biases.

Roles per layer (LAYER_ROLES; a None role does not exist for this model/target/kind):
  input_norm, post_attn_norm                 every model (Gemma 2: post_attn_norm normalises the attention output)
  pre_ffn_norm, post_ffn_norm                Gemma 2 only
  q_norm, k_norm                             Qwen3 only ([head_dim], applied per head)
  qkv (+ qkv_bias), o (+ o_bias)             every model; biases where the model has them
  gate_up (+ gate_up_bias), down             the fused FFN: dense layers (target tensorrt), CATS / BYPASS layers (L / R
                                             folded in when rank > 0, the bias then padded with r zeros) and the
                                             dense FFN of GRIFFIN layers (the prefill graph's; decode never reads it)
  gate (+ gate_bias), up (+ up_bias), down   target onnxruntime's dense layers: gate and up apart
  down_bias                                  models with MLP biases
  fold                                       GRIFFIN layers: FoldSources(gate_up, down, gate_up_bias, L, R), what a
                                             runtime gathers into the decode inputs w_gul / w_dr / b_gul
Model roles: embed (ROWS), head (MATRIX_T; tied: the embed tensor), final_norm, rope_cos / rope_sin (ROWS).
Quantized weights (Recipe.weights = QuantRecipe): every decoder linear role (qkv, o, gate_up / gate / up, down;
the head when QuantRecipe.head) becomes a WeightRef of dtype int4 | int8 with a QuantFormat (bits, block size, axis
1 = blocks along the LAST axis of the stored tensor, its scale WeightRef, packing), named `<base>.int4` (`.mnb4`
for MatMulNBits' bytes) with `<name>.scale`. Storage: MATRIX_T [out, in] blocked along the inputs, except down
with down_axis "out": MATRIX [F, D] blocked along D (a neuron's row is whole blocks). The bypass stays floating
point: quantized CATS and BYPASS layers get their own L / R roles (no longer folded into gate_up / down), GRIFFIN's fold
L / R are read by the decode graph too. The embedding table, norms and RoPE tables stay floats.

What one WeightRef / QuantFormat is (fields, sizes, serialisation) lives in weight_ref.py; which ones an engine has,
with which names, shapes and dtypes, is decided here.
"""

from __future__ import annotations

import dataclasses

from caprese.export import contract as C
from caprese.export.weight_ref import (  # noqa: F401  (re-exported: the spec's vocabulary)
    DTYPE_BITS, MATRIX, MATRIX_T, PACKING_INT4, PACKING_NBITS, QUANT_BITS, QUANT_BLOCKS, QUANT_ROLES, ROWS,
    SCALE_DTYPES, STORAGES, VECTOR, QuantFormat, WeightRef)
from caprese.model.spec import ModelSpec

LAYER_ROLES = ("input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "q_norm", "k_norm", "qkv",
               "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias", "gate", "gate_bias", "up", "up_bias", "down",
               "down_bias", "L", "R")
FOLD_ROLES = ("gate_up", "down", "gate_up_bias", "L", "R")
MODEL_ROLES = ("embed", "head", "final_norm", "rope_cos", "rope_sin")
# a GRIFFIN layer's decode step reads the per-prompt w_gul / w_dr / b_gul instead of these
_GRIFFIN_DECODE_SKIPS = ("gate_up", "gate_up_bias", "down")


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """Weight quantization of a recipe (caprese.model.quantization's format): int{bits} codes, blocks of
    `block_size` (0: a whole row, per-channel) with `scale_dtype` scales; every decoder linear weight (q, k, v, o,
    gate, up, down), the LM head too when `head`; the embedding never (a row gather: nothing to speed up).
    `down_axis`: the down projection's block axis ("out": stored [F, D], a neuron's row is whole blocks, what
    GRIFFIN and CATS need; "in": stored [D, F]). `method`: how the codes were chosen (rtn | gptq), a record."""

    bits: int  # 4 | 8
    block_size: int = 32
    scale_dtype: str = "float16"
    method: str = "rtn"
    head: bool = False
    down_axis: str = "out"
    accuracy_level: int = 0  # MatMulNBits' (target onnxruntime): 0 float activations; 4 int8 activations (GenAI's)
    float_selection: bool = False  # GRIFFIN decode inputs: float w_gul / w_dr (dequantized at fold) instead of rows
    fp16_bypass: bool = False  # an fp32 graph's bypass L / R stored fp16 (half its bytes), cast to fp32 where read

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ValueError(f"weights int{self.bits} have no export: use int4 or int8")
        if self.block_size not in QUANT_BLOCKS:
            raise ValueError(f"block size {self.block_size} has no export: use 32, 64, 128 or 0 (one per row)")
        if self.accuracy_level not in (0, 4):
            raise ValueError(f"MatMulNBits accuracy level {self.accuracy_level}: use 0 (float) or 4 (int8 activations)")
        if self.scale_dtype not in SCALE_DTYPES or self.down_axis not in ("in", "out"):
            raise ValueError(f"bad quantization recipe: scale dtype {self.scale_dtype!r}, down axis {self.down_axis!r}")

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"

    def blocks(self, cols: int) -> int:
        """Scales per row of `cols` elements."""
        return 1 if self.block_size == 0 else cols // self.block_size


def method_kind(method: str) -> str:
    """The layer kind (contract) of a calibration method's layers: "none" (quantization + bypass) is BYPASS."""
    return C.BYPASS if method == "none" else method


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What was done to the model: the efficient-FFN method on which layers, its bypass, its quantization."""

    method: str = C.DENSE  # dense | griffin | cats | bypass (calibration method "none": see method_kind)
    density: float = 1.0
    layers: tuple = ()  # the approximated layers, ascending
    k: int = 0  # GRIFFIN: neurons kept per layer (0 otherwise)
    rank: int = 0  # bypass rank r (0: none)
    weights: QuantRecipe | None = None  # quantized weights (issue 15); None: the precision's floats

    def __post_init__(self):
        if self.method not in C.LAYER_KINDS:
            raise ValueError(f"method {self.method!r} has no export (griffin, cats, bypass and dense do)")
        if (self.method == C.DENSE) != (not self.layers):
            raise ValueError("a dense recipe has no approximated layers; griffin / cats need some")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"recipe layers must be ascending and distinct, got {list(self.layers)}")
        if (self.method == C.GRIFFIN) != (self.k > 0) or self.rank < 0:
            raise ValueError(f"recipe k = {self.k} / rank = {self.rank} do not fit method {self.method}")
        if self.method == C.DENSE and self.rank:
            raise ValueError("a dense recipe has no bypass")
        if self.method == C.BYPASS and not self.rank:
            raise ValueError("method none without a bypass (rank 0) is the dense model: export the base model "
                             "(with --weights for its quantized weights)")

    @property
    def cats_quantile(self) -> float | None:
        """CATS: the prompt percentile of |act(x W_g)| a decode step thresholds at (1 - density)."""
        return 1.0 - self.density if self.method == C.CATS else None

    def layer_kinds(self, num_layers: int) -> tuple:
        if self.layers and not 0 <= self.layers[-1] < num_layers:
            raise ValueError(f"recipe layer {self.layers[-1]} is not a layer of this {num_layers}-layer model")
        return tuple(self.method if i in self.layers else C.DENSE for i in range(num_layers))

    def to_dict(self) -> dict:
        return {"method": self.method, "density": self.density, "layers": list(self.layers), "k": self.k,
                "rank": self.rank, "cats_quantile": self.cats_quantile,
                "weights": None if self.weights is None else dataclasses.asdict(self.weights)}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        w = d.get("weights")
        return cls(str(d["method"]), float(d["density"]), tuple(int(i) for i in d["layers"]), int(d["k"]),
                   int(d["rank"]), QuantRecipe(**w) if w is not None else None)

    @property
    def quantized(self) -> bool:
        return self.weights is not None


@dataclasses.dataclass(frozen=True)
class FoldSources:
    """A GRIFFIN layer's weights.bin tensors a runtime gathers into w_gul = [Ŵ_g, Ŵ_1, L], w_dr = [Ŵ_2 ; R] and
    b_gul = [b̂_g, b̂_1, 0] (contract.py): the dense gate_up [D, 2F] and down [F, D], the bias [2F], L [D, r],
    R [r, D]."""

    gate_up: WeightRef
    down: WeightRef
    gate_up_bias: WeightRef | None = None
    L: WeightRef | None = None
    R: WeightRef | None = None

    def roles(self) -> dict[str, WeightRef]:
        return {r: getattr(self, r) for r in FOLD_ROLES if getattr(self, r) is not None}


@dataclasses.dataclass(frozen=True)
class LayerTensors:
    """The weights of one decoder layer by role (module docstring); a role the layer lacks is None."""

    index: int
    kind: str  # contract.DENSE | GRIFFIN | CATS | BYPASS
    input_norm: WeightRef
    post_attn_norm: WeightRef
    qkv: WeightRef
    o: WeightRef
    down: WeightRef
    pre_ffn_norm: WeightRef | None = None
    post_ffn_norm: WeightRef | None = None
    q_norm: WeightRef | None = None
    k_norm: WeightRef | None = None
    qkv_bias: WeightRef | None = None
    o_bias: WeightRef | None = None
    gate_up: WeightRef | None = None
    gate_up_bias: WeightRef | None = None
    gate: WeightRef | None = None
    gate_bias: WeightRef | None = None
    up: WeightRef | None = None
    up_bias: WeightRef | None = None
    down_bias: WeightRef | None = None
    L: WeightRef | None = None  # quantized CATS / BYPASS layers with a bypass: L [D, r] and R [r, D] apart, in floats
    R: WeightRef | None = None
    fold: FoldSources | None = None

    def roles(self) -> dict[str, WeightRef]:
        """{role: WeightRef} of the roles this layer has, in LAYER_ROLES order (fold sources not included)."""
        return {r: getattr(self, r) for r in LAYER_ROLES if getattr(self, r) is not None}

    def bypass(self) -> tuple[WeightRef | None, WeightRef | None]:
        """The layer's bypass (L, R): apart (quantized CATS / BYPASS), a GRIFFIN layer's fold sources, or Nones."""
        return (self.fold.L, self.fold.R) if self.fold is not None else (self.L, self.R)

    def decode_reads(self, quantized_selection: bool = True) -> list[WeightRef]:
        """The weights a decode step of this layer reads from weights.bin (GRIFFIN: not its dense FFN)."""
        skip = _GRIFFIN_DECODE_SKIPS if self.kind == C.GRIFFIN else ()
        reads = [w for r, w in self.roles().items() if r not in skip]
        if self.kind == C.GRIFFIN and self.fold.gate_up.quant is not None and quantized_selection:
            # quantized rows: L, R are constants of the decode graph (float selection folds them into w_gul / w_dr)
            reads += [w for w in (self.fold.L, self.fold.R) if w is not None]
        return reads

    def to_dict(self) -> dict:
        d = {"kind": self.kind, **{r: w.to_dict() for r, w in self.roles().items()}}
        if self.fold is not None:
            d["fold"] = {r: w.to_dict() for r, w in self.fold.roles().items()}
        return d


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What an engine folder holds (module docstring). Build it with EngineSpec.build; never by hand."""

    model: ModelSpec
    recipe: Recipe
    target: str  # contract.TARGET_TENSORRT | TARGET_ONNXRUNTIME
    precision: str  # fp32 | fp16 | bf16
    max_seq_len: int
    max_prompt_len: int
    max_batch: int
    layout: C.GraphLayout
    embed: WeightRef
    head: WeightRef
    final_norm: WeightRef
    rope_cos: WeightRef
    rope_sin: WeightRef
    layers: tuple  # LayerTensors per layer

    @classmethod
    def build(cls, model: ModelSpec, recipe: Recipe, target: str, precision: str, max_seq_len: int,
              max_prompt_len: int, max_batch: int = 1, kv_dtype: str = "") -> "EngineSpec":
        """The spec of exporting `model` with `recipe` for `target` at `precision` (ValueError if it cannot be);
        kv_dtype "float16": an fp32 engine's KV cache in fp16 (target onnxruntime: GroupQueryAttention in fp16)."""
        if target not in C.TARGETS:
            raise ValueError(f"unknown target {target!r}")
        if precision not in C.PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        q = recipe.weights
        if q is not None and recipe.method == C.GRIFFIN and q.down_axis != "out":
            raise ValueError("GRIFFIN gathers whole rows of the down projection: its blocks must run along the "
                             "outputs (down_axis 'out')")
        if not 1 <= max_prompt_len <= max_seq_len or max_batch < 1:
            raise ValueError(f"need 1 <= max_prompt_len ({max_prompt_len}) <= max_seq_len ({max_seq_len}) and "
                             f"max_batch ({max_batch}) >= 1")
        m, dt = model, C.PRECISIONS[precision]
        if kv_dtype and (target != C.TARGET_ONNXRUNTIME or m.head_dim % 16):
            raise ValueError("an fp16 KV cache is built for --target onnxruntime's GroupQueryAttention (head_dim a "
                             f"multiple of 16; here {m.head_dim}, target {target})")
        kinds = recipe.layer_kinds(m.num_layers)
        layout = C.GraphLayout(m.num_layers, m.hidden_size, m.intermediate_size, m.num_kv_heads, m.head_dim,
                               m.vocab_size, precision, kinds, k=recipe.k, rank=recipe.rank, mlp_bias=m.mlp_bias,
                               weight_bits=q.bits if q else 0, weight_block=q.block_size if q else 0,
                               scale_dtype=QuantContext(q, target, dt).scale_dt if q else "",
                               quantized_selection=not (q and q.float_selection), kv_dtype=kv_dtype)
        embed = WeightRef("model.embed_tokens.weight", (m.vocab_size, m.hidden_size), dt, ROWS)
        if q is not None and q.head:
            head = _quantized(QuantContext(q, target, dt), "lm_head.weight", m.vocab_size, m.hidden_size, MATRIX_T)
        else:
            head = WeightRef(embed.name if m.tie_word_embeddings else "lm_head.weight", embed.shape, dt, MATRIX_T)
        half = (max_seq_len, m.head_dim // 2)
        layers = tuple(_layer_tensors(m, i, kinds[i], recipe.rank, target, dt, q) for i in range(m.num_layers))
        return cls(m, recipe, target, precision, int(max_seq_len), int(max_prompt_len), int(max_batch), layout,
                   embed, head, _norm(m, "model.norm", m.hidden_size, dt), WeightRef("rope.cos", half, dt, ROWS),
                   WeightRef("rope.sin", half, dt, ROWS), layers)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def tied_head(self) -> bool:
        return self.head.name == self.embed.name

    def model_roles(self) -> dict[str, WeightRef]:
        return {r: getattr(self, r) for r in MODEL_ROLES}

    def refs(self) -> list[tuple[str, WeightRef]]:
        """Every (role path, WeightRef), quantization scales included: "head", "layers.3.qkv", "layers.0.fold.L"."""
        out = list(self.model_roles().items())
        for t in self.layers:
            out += [(f"layers.{t.index}.{r}", w) for r, w in t.roles().items()]
            if t.fold is not None:
                out += [(f"layers.{t.index}.fold.{r}", w) for r, w in t.fold.roles().items()]
        out += [(f"{path}.scale", w.quant.scale) for path, w in list(out) if w.quant is not None]
        return out

    def decode_reads(self) -> list[WeightRef]:
        """The weights.bin tensors one decode step reads on this target (a name may come twice: the tied
        embedding is read as a row by `embed` and whole by `head`); a quantized weight's scales follow it."""
        qsel = self.layout.quantized_selection
        reads = [self.embed] + [w for t in self.layers for w in t.decode_reads(qsel)] + [
            self.final_norm, self.head, self.rope_cos, self.rope_sin]
        return reads + [w.quant.scale for w in reads if w.quant is not None]

    # ---- manifest.json ----
    def to_dict(self) -> dict:
        """The manifest keys this spec owns (merged into manifest.json at the top level)."""
        return {"model": self.model.to_dict(), "recipe": self.recipe.to_dict(), "target": self.target,
                "precision": self.precision, "max_seq_len": self.max_seq_len, "max_prompt_len": self.max_prompt_len,
                "max_batch": self.max_batch, "layout": self.layout.to_dict(),
                "tensors": {**{r: w.to_dict() for r, w in self.model_roles().items()},
                            "layers": [t.to_dict() for t in self.layers]}}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineSpec":
        """Rebuild the spec from a manifest's model, recipe, target, precision and lengths, and check that its
        recorded layout and tensors are what this caprese derives from them (ValueError naming the first
        difference otherwise)."""
        spec = cls.build(ModelSpec.from_dict(d["model"]), Recipe.from_dict(d["recipe"]), d["target"],
                         d["precision"], int(d["max_seq_len"]), int(d["max_prompt_len"]), int(d["max_batch"]),
                         kv_dtype=str(d["layout"].get("kv_dtype", "")) if isinstance(d.get("layout"), dict) else "")
        want = spec.to_dict()
        for key in ("recipe", "layout", "tensors"):
            diff = first_difference(d[key], want[key], key)
            if diff:
                raise ValueError(f"the recorded {diff}")
        return spec


def first_difference(got, want, path: str = "") -> str | None:
    """'path: got != want' at the first place two JSON values differ, or None."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in list(want) + [k for k in got if k not in want]:
            if k not in got or k not in want:
                return f"{path}.{k}: {'missing' if k not in got else 'unexpected'}"
            diff = first_difference(got[k], want[k], f"{path}.{k}")
            if diff:
                return diff
        return None
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"{path}: {len(got)} entries != {len(want)}"
        for j, (a, b) in enumerate(zip(got, want)):
            diff = first_difference(a, b, f"{path}.{j}")
            if diff:
                return diff
        return None
    if isinstance(got, (dict, list)) or isinstance(want, (dict, list)):
        return None if got == want else f"{path}: a {type(got).__name__} != a {type(want).__name__}"
    return None if got == want else f"{path}: {got!r} != {want!r}"


def _norm(m: ModelSpec, base: str, n: int, dt: str) -> WeightRef:
    """An RMSNorm's multiplier: Gemma 2 stores 1 + w (`_plus_one`), the others w."""
    return WeightRef(base + (".weight_plus_one" if m.gemma_norms else ".weight"), (n,), dt, VECTOR)


@dataclasses.dataclass(frozen=True)
class QuantContext:
    """What decides a quantized weight's storage: the recipe, the target and the graph's float dtype."""

    q: QuantRecipe
    target: str
    dt: str

    @property
    def scale_dt(self) -> str:
        """The dtype scales are stored in: the graph's float dtype where the conversion is exact (fp16 scales in
        an fp32 graph: DequantizeLinear then yields the graph's dtype, and MatMulNBits wants the activation
        dtype), else the recipe's (DequantizeLinear + Cast)."""
        q = self.q
        return self.dt if q.scale_dtype == self.dt or (q.scale_dtype, self.dt) == ("float16", "float32") \
            else q.scale_dtype

    def nbits(self, storage: str) -> bool:
        """Target onnxruntime stores [out, in] weights blocked along the inputs in blocks of 16+ as
        com.microsoft.MatMulNBits' B (our bytes XOR 0x88 / 0x80), scales in the activation dtype."""
        return (self.target == C.TARGET_ONNXRUNTIME and storage == MATRIX_T and self.q.block_size >= 16
                and self.scale_dt == self.dt and self.dt in ("float32", "float16"))


def _quantized(qc: QuantContext, base: str, rows: int, cols: int, storage: str) -> WeightRef:
    """The codes WeightRef (name `base`.int4 | .int8, [rows, cols] blocked along cols) with its scale WeightRef."""
    q = qc.q
    if q.block_size and cols % q.block_size:
        raise ValueError(f"{base}: its {cols} input features (blocked axis) are not a multiple of the block size "
                         f"{q.block_size}")
    nbits = qc.nbits(storage)
    sdt = qc.scale_dt
    name = f"{base}.{'mnb' if nbits else 'int'}{q.bits}"
    scale = (WeightRef(name + ".scale", (rows,), sdt, VECTOR) if q.block_size == 0 else
             WeightRef(name + ".scale", (rows, q.blocks(cols)), sdt, storage))
    packing = PACKING_NBITS if nbits else (PACKING_INT4 if q.bits == 4 else "none")
    return WeightRef(name, (rows, cols), q.dtype, storage, QuantFormat(q.bits, q.block_size, 1, scale, packing))


def _layer_tensors(m: ModelSpec, i: int, kind: str, rank: int, target: str, dt: str,
                   q: QuantRecipe | None = None) -> LayerTensors:
    p = f"model.layers.{i}."
    D, F, hd = m.hidden_size, m.intermediate_size, m.head_dim
    qkv_out = (m.num_heads + 2 * m.num_kv_heads) * hd
    qc = QuantContext(q, target, dt) if q is not None else None

    def mat(name: str, rows: int, cols: int, dtype: str = dt) -> WeightRef:
        return WeightRef(p + name, (rows, cols), dtype, MATRIX)

    def lin(name: str, out_f: int, in_f: int, axis: str = "in") -> WeightRef:
        """An nn.Linear weight [out, in]: MATRIX [in, out] floats, or quantized [out, in] (axis in) / [in, out]."""
        if qc is None:
            return mat(name + ".weight.t", in_f, out_f)
        if axis == "in":
            return _quantized(qc, p + name + ".weight", out_f, in_f, MATRIX_T)
        return _quantized(qc, p + name + ".weight.t", in_f, out_f, MATRIX)

    def vec(name: str, n: int, present: bool = True) -> WeightRef | None:
        return WeightRef(p + name, (n,), dt, VECTOR) if present else None

    down_axis = q.down_axis if q is not None else "in"
    t = dict(input_norm=_norm(m, p + "input_layernorm", D, dt),
             post_attn_norm=_norm(m, p + "post_attention_layernorm", D, dt),
             qkv=lin("self_attn.qkv_proj", qkv_out, D), qkv_bias=vec("self_attn.qkv_proj.bias", qkv_out, m.qkv_bias),
             o=lin("self_attn.o_proj", D, m.num_heads * hd), o_bias=vec("self_attn.o_proj.bias", D, m.o_bias),
             down_bias=vec("mlp.down_proj.bias", D, m.mlp_bias))
    if m.gemma_norms:
        t.update(pre_ffn_norm=_norm(m, p + "pre_feedforward_layernorm", D, dt),
                 post_ffn_norm=_norm(m, p + "post_feedforward_layernorm", D, dt))
    if m.qk_norm:  # per head, never Gemma's 1 + w
        t.update(q_norm=vec("self_attn.q_norm.weight", hd), k_norm=vec("self_attn.k_norm.weight", hd))
    if kind == C.DENSE and target == C.TARGET_ONNXRUNTIME:  # gate and up as two MatMuls (onnx_graph's ORT builder)
        t.update(gate=lin("mlp.gate_proj", F, D), gate_bias=vec("mlp.gate_proj.bias", F, m.mlp_bias),
                 up=lin("mlp.up_proj", F, D), up_bias=vec("mlp.up_proj.bias", F, m.mlp_bias),
                 down=lin("mlp.down_proj", D, F, down_axis))
        return LayerTensors(i, kind, **t)
    if qc is not None:  # quantized: the bypass stays in floats, apart from the quantized gate/up and down
        t.update(gate_up=lin("mlp.gate_up_proj", 2 * F, D), gate_up_bias=vec("mlp.gate_up_proj.bias", 2 * F,
                                                                                 m.mlp_bias),
                 down=lin("mlp.down_proj", D, F, down_axis))
        bdt = "float16" if q.fp16_bypass else dt
        L, R = (mat("mlp.bypass.L", D, rank, bdt), mat("mlp.bypass.R", rank, D, bdt)) if rank else (None, None)
        if kind in (C.CATS, C.BYPASS) and rank:
            t.update(L=L, R=R)
        if kind == C.GRIFFIN:
            t["fold"] = FoldSources(t["gate_up"], t["down"], t["gate_up_bias"], L, R)
        return LayerTensors(i, kind, **t)
    r = rank if kind in (C.CATS, C.BYPASS) else 0  # folded into the constants: [W_g, W_1, L], [W_2 ; R]
    fused = "mlp.gate_up_l_proj" if r else "mlp.gate_up_proj"
    t.update(gate_up=mat(fused + ".weight.t", D, 2 * F + r), gate_up_bias=vec(fused + ".bias", 2 * F + r, m.mlp_bias),
             down=mat("mlp.down_r_proj.weight.t" if r else "mlp.down_proj.weight.t", F + r, D))
    if kind == C.GRIFFIN:
        t["fold"] = FoldSources(t["gate_up"], t["down"], t["gate_up_bias"],
                                mat("mlp.bypass.L", D, rank) if rank else None,
                                mat("mlp.bypass.R", rank, D) if rank else None)
    return LayerTensors(i, kind, **t)
