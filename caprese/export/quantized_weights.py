"""The quantized weights an export writes, by engine-spec role: where the codes come from and what bytes they are.

Codes are never computed here: they come from caprese.calibration.weight_quant.quantize_decoder ({HF parameter
name: QuantizedTensor}, the artifact's own or RTN at export time), and every graph, the fold and the native
kernel read the same codes and scales. Fused roles are the row concatenation of their parts, which blocking
along the inputs makes exact: qkv = [W_q ; W_k ; W_v] and gate_up = [W_g ; W_1] ([out, in], one row per output).
The down projection is as the recipe stored it ([F, D] blocked along D by default).

Bytes per packing (engine_spec.QuantFormat.packing):
  int4x2-low-first   QuantizedTensor.packed(): ONNX INT4 raw data ([R, C] row-major, element 2j low nibble)
  none (int8)        the codes' two's-complement bytes
  matmulnbits        com.microsoft.MatMulNBits' B: the same bytes XOR 0x88 / 0x80 (unsigned, zero point 8 / 128)
Scales are stored in the spec's scale dtype (the graph's float dtype where that conversion is exact).
"""

from __future__ import annotations

import dataclasses

import torch

from caprese.calibration.weight_quant import DECODER_ROLES, HEAD_NAME, QuantRecipe as CalibrationRecipe
from caprese.errors import CapreseError
from caprese.export import engine_spec as S
from caprese.model.quantization import ROW, QuantizedTensor, WeightFormat, matmul_nbits_weight

_PARTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",),
          "down": ("mlp.down_proj",)}
_SCALE_NAMES = {"fp16": "float16", "fp32": "float32"}


def spec_recipe(recipe: CalibrationRecipe) -> S.QuantRecipe:
    """The engine spec's record of a calibration QuantRecipe (CapreseError if export cannot take it)."""
    missing = [r for r in DECODER_ROLES if r not in recipe.roles]
    if missing:
        raise CapreseError(f"the model's quantization leaves {', '.join(missing)} in floats; export quantizes every "
                           "decoder linear weight: quantize them all (or export without --weights)")
    for role in DECODER_ROLES:
        if role != "down" and recipe.block_axis(role) != "in":
            raise CapreseError(f"{role}: export takes blocks along the input features for every weight but down")
    fmt = recipe.fmt
    return S.QuantRecipe(fmt.bits, fmt.block_size, _SCALE_NAMES[fmt.scale_dtype], recipe.method,
                         head="lm_head" in recipe.roles, down_axis=recipe.block_axis("down"))


def export_recipe(fmt: WeightFormat, head: bool = False, method: str = "rtn",
                  down_axis: str = "out") -> CalibrationRecipe:
    """The calibration recipe an export-time quantization uses: every decoder linear weight (+ the LM head), the
    down projection blocked along `down_axis`."""
    return CalibrationRecipe(fmt, method, DECODER_ROLES + (("lm_head",) if head else ()),
                             block_axes=(("down", down_axis),))


@dataclasses.dataclass
class QuantizedWeights:
    """{HF parameter name: QuantizedTensor} of one model, served by engine-spec role."""

    tensors: dict  # HF name -> QuantizedTensor
    recipe: S.QuantRecipe

    def role(self, layer: int | None, role: str) -> QuantizedTensor:
        """The (fused) QuantizedTensor of a layer role (qkv, o, gate_up, gate, up, down) or of the head."""
        if role == "head":
            return self._get(HEAD_NAME)
        parts = [self._get(f"model.layers.{layer}.{p}.weight") for p in _PARTS[role]]
        if len(parts) == 1:
            return parts[0]
        return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), parts[0].fmt)

    def _get(self, name: str) -> QuantizedTensor:
        if name not in self.tensors:
            raise CapreseError(f"the quantized weights have no {name}; quantize the model again")
        return self.tensors[name]


def check_tensor(ref: S.WeightRef, qt: QuantizedTensor) -> None:
    """ValueError unless qt is what the spec says `ref` stores (shape, bits, block, orientation)."""
    q = ref.quant
    block = ROW if q.block_size == 0 else q.block_size
    if tuple(qt.shape) != tuple(ref.shape) or qt.fmt.bits != q.bits or qt.fmt.block_size != block:
        raise ValueError(f"{ref.name}: the quantized tensor is int{qt.fmt.bits} block {qt.fmt.block_name} "
                         f"{list(qt.shape)}, the engine spec int{q.bits} block {q.block_size} {list(ref.shape)}")


def code_bytes(ref: S.WeightRef, qt: QuantizedTensor) -> bytes:
    """The bytes weights.bin holds for the codes of `ref` (module docstring, by packing)."""
    check_tensor(ref, qt)
    if ref.quant.packing == S.PACKING_NBITS:
        data, _ = matmul_nbits_weight(qt)
        return data.contiguous().numpy().tobytes()
    return qt.packed().contiguous().numpy().tobytes()


def scale_tensor(ref: S.WeightRef, qt: QuantizedTensor) -> torch.Tensor:
    """qt's scales in the shape of `ref`'s scale WeightRef ([R] for one block per row, else [R, C / block]);
    the dtype conversion (fp16 -> fp32) is exact, a lossy one is refused."""
    s = qt.scales.reshape(ref.quant.scale.shape)
    want = {"float16": torch.float16, "float32": torch.float32}[ref.quant.scale.dtype]
    if want.itemsize < s.dtype.itemsize:
        raise ValueError(f"{ref.name}: {s.dtype} scales cannot be stored as {ref.quant.scale.dtype} exactly")
    return s.to(want)


def load_engine_weights(decoder, manifest) -> None:
    """Overwrite a decoder's quantized weights with the dequantized codes of an engine folder's weights.bin (the
    torch backend's reference of a quantized engine: exactly the values its graphs compute with). Call it before a
    method is installed (layer.mlp is the dense FFN)."""
    from caprese.export.folding import dequantized_weight, standard_codes
    from caprese.export.weights import read_weight

    path = manifest.file("weights")

    def value(ref: S.WeightRef) -> torch.Tensor:
        codes = standard_codes(ref, read_weight(path, manifest.entry(ref)))
        w = dequantized_weight(ref, codes, read_weight(path, manifest.entry(ref.quant.scale)))
        return w if ref.storage == S.MATRIX_T else w.t()  # as nn.Linear [out, in]

    def assign(lin, w: torch.Tensor) -> None:
        with torch.no_grad():
            lin.weight.copy_(w.to(lin.weight.dtype))

    spec = manifest.spec
    for t, layer in zip(spec.layers, decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if t.qkv.quant is None:
            return
        w = value(t.qkv)
        sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        for lin, part in zip((attn.q_proj, attn.k_proj, attn.v_proj), w.split(sizes)):
            assign(lin, part)
        assign(attn.o_proj, value(t.o))
        if t.gate_up is not None:
            g, u = value(t.gate_up).split(mlp.gate_proj.out_features)
        else:
            g, u = value(t.gate), value(t.up)
        assign(mlp.gate_proj, g)
        assign(mlp.up_proj, u)
        assign(mlp.down_proj, value(t.down))
    if spec.head.quant is not None:  # tied: one matrix, as weight_quant quantized it (the float embedding table of
        assign(decoder.lm_head, value(spec.head))  # the engine holds those dequantized values too)
