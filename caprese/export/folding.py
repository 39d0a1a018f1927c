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

from caprese.export.weights import read_weight


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


class Folder:
    """Reads each GRIFFIN layer's tensors from an engine folder once, then folds selections on demand."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.weights_path = manifest.file("weights")
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._cache:
            roles = self.manifest.spec.layers[layer].fold.roles()
            self._cache[layer] = {role: read_weight(self.weights_path, self.manifest.entry(ref))
                                  for role, ref in roles.items()}
        return self._cache[layer]

    def fold(self, layer: int, stat_sq: torch.Tensor):
        lay = self.manifest.layout
        idx = select_neurons(torch.as_tensor(stat_sq), lay.k)
        return (idx,) + fold_selected(self.tensors(layer), idx, lay.intermediate_size)
