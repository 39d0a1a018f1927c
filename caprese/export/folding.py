"""GRIFFIN selection and folding on the runtime side: statistic -> top-k neurons -> the decode graph's inputs.

After prefill, a runtime takes griffin_stat.{i} (summed over every prefill call since the prompt started), picks
the top-k neurons per row, and fills the decode graph's persistent inputs of layer i:
    w_gul.{i} = [Ŵ_g, Ŵ_1, L]   [B, D, 2k + r]
    w_dr.{i}  = [Ŵ_2 ; R]       [B, k + r, D]
    b_gul.{i} = [b̂_g, b̂_1, 0]   [B, 2k + r]      (models with MLP biases only)
from the weights.bin tensors the engine spec names (engine_spec.FoldSources: LayerTensors.fold).
"""

from __future__ import annotations

import torch

from caprese.export import contract as C
from caprese.export.engine_spec import MATRIX_T, WeightRef
from caprese.export.weights import TORCH_DTYPES, read_weight


def dequantized_weight(ref: WeightRef, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [R, C] of a quantized weights.bin tensor in the standard packing (int4: packed bytes, int8: codes;
    see standard_codes) with its scales."""
    from caprese.model.quantization import ROW, QuantizedTensor, WeightFormat

    q = ref.quant
    packed = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes
    fmt = WeightFormat(q.bits, q.block_size or ROW, "fp16" if scales.dtype == torch.float16 else "fp32")
    qt = QuantizedTensor.from_packed(packed.reshape(ref.shape[0], -1), scales.reshape(ref.shape[0], -1), fmt)
    return qt.dequantize(torch.float32)


def select_neurons(stat_sq: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k neurons of each row of the statistic [B, F], sorted ascending (as caprese's GriffinFFN keeps them)."""
    return torch.topk(stat_sq.float(), k, dim=-1).indices.sort(dim=-1).values


def fold_selected(tensors: dict[str, torch.Tensor], idx: torch.Tensor, intermediate: int):
    """(w_gul [B, D, 2k+r], w_dr [B, k+r, D], b_gul [B, 2k+r] or None) for neuron indices idx [B, k].

    tensors: the layer's fold sources by role (FoldSources.roles(): "gate_up", "down", optional "gate_up_bias",
    "L", "R").
    """
    gu, down = tensors["gate_up"], tensors["down"]
    L, R = tensors.get("L"), tensors.get("R")
    w_gul, w_dr, b_gul = [], [], []
    for row in idx:
        cols = [gu[:, row], gu[:, intermediate + row]] + ([L] if L is not None else [])
        w_gul.append(torch.cat(cols, dim=1))
        w_dr.append(torch.cat([down[row]] + ([R] if R is not None else []), dim=0))
        if "gate_up_bias" in tensors:
            b = tensors["gate_up_bias"]
            zeros = [torch.zeros(L.shape[1], dtype=b.dtype)] if L is not None else []
            b_gul.append(torch.cat([b[row], b[intermediate + row]] + zeros))
    return torch.stack(w_gul), torch.stack(w_dr), (torch.stack(b_gul) if b_gul else None)


def standard_codes(ref: WeightRef, codes: torch.Tensor) -> torch.Tensor:
    """read_weight's codes of a quantized ref in the standard packing: MatMulNBits' (unsigned, XOR 0x88 / 0x80)
    flipped back; int4 stays packed bytes."""
    if ref.quant.packing != "matmulnbits":
        return codes
    flipped = codes.view(torch.uint8) ^ (0x88 if ref.quant.bits == 4 else 0x80)
    return flipped.view(codes.dtype)


def fold_quantized_selected(tensors: dict[str, torch.Tensor], idx: torch.Tensor, intermediate: int,
                            rank: int = 0) -> dict:
    """A quantized GRIFFIN layer's per-prompt decode inputs for neuron indices idx [B, k] (contract.py: w_gu_q /
    w_gu_s, w_d_q / w_d_s, b_gul), keyed by those name functions: whole rows of the stored codes (int4: the
    packed bytes, uint8 [.., D / 2]; int8: int8 codes) and their scales ([.., D / block]; one per row: [.., 1]).

    tensors: FoldSources.roles() read with read_weight, plus "gate_up.scale" and "down.scale"."""
    gu, down = tensors["gate_up"], tensors["down"]
    gs, ds = tensors["gate_up.scale"], tensors["down.scale"]
    gs, ds = gs.reshape(gs.shape[0], -1), ds.reshape(ds.shape[0], -1)
    rows = torch.cat([idx, idx + intermediate], dim=1)  # [B, 2k]: gate rows, then up rows
    out = {C.w_gu_q: gu[rows], C.w_gu_s: gs[rows], C.w_d_q: down[idx], C.w_d_s: ds[idx]}
    if "gate_up_bias" in tensors:
        b = tensors["gate_up_bias"]
        out[C.b_gul] = torch.cat([b[rows], torch.zeros(idx.shape[0], rank, dtype=b.dtype)], dim=1)
    return out


class Folder:
    """Reads each GRIFFIN layer's tensors from an engine folder once, then folds selections on demand."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.weights_path = manifest.file("weights")
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._cache:
            roles = self.manifest.spec.layers[layer].fold.roles()
            t = {role: read_weight(self.weights_path, self.manifest.entry(ref)) for role, ref in roles.items()}
            for role in ("gate_up", "down"):
                if roles[role].quant is not None:
                    t[role] = standard_codes(roles[role], t[role])
                    scale = roles[role].quant.scale
                    t[role + ".scale"] = read_weight(self.weights_path, self.manifest.entry(scale))
            self._cache[layer] = t
        return self._cache[layer]

    def fold_quantized(self, layer: int, stat_sq: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(neurons [B, k], {decode input name: tensor}) of a quantized layout's GRIFFIN layer."""
        lay = self.manifest.layout
        idx = select_neurons(torch.as_tensor(stat_sq), lay.k)
        parts = fold_quantized_selected(self.tensors(layer), idx, lay.intermediate_size, lay.rank)
        return idx, {name(layer): t for name, t in parts.items()}

    def float_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The fold sources in floats, MATRIX layout ([D, 2F] and [F, D]): a quantized layer's dequantized (what
        the float w_gul / w_dr of the TensorRT decode graph take)."""
        t = self.tensors(layer)
        if "gate_up.scale" not in t:
            return t
        key = ("float", layer)
        if key not in self._cache:
            fold = self.manifest.spec.layers[layer].fold
            out = {r: v for r, v in t.items() if not r.endswith(".scale") and r not in ("gate_up", "down")}
            for role in ("gate_up", "down"):
                w = dequantized_weight(getattr(fold, role), t[role], t[role + ".scale"])
                out[role] = (w.t() if getattr(fold, role).storage == MATRIX_T else w).contiguous().to(
                    t.get("L", w).dtype if "L" in t else TORCH_DTYPES[self.manifest.layout.dtype])
            self._cache[key] = out
        return self._cache[key]

    def fold(self, layer: int, stat_sq: torch.Tensor):
        lay = self.manifest.layout
        idx = select_neurons(torch.as_tensor(stat_sq), lay.k)
        return (idx,) + fold_selected(self.float_tensors(layer), idx, lay.intermediate_size)
