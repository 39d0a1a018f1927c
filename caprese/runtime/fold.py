"""GRIFFIN folding straight into the decode graph's persistent buffers (batch 1, any torch device).

Quantized layouts: `quantized_rows` gathers whole rows of the stored int4 / int8 codes and their scales (the
per-prompt matrices stay quantized, contract.w_gu_q ...); `__call__` fills float w_gul / w_dr from the
dequantized sources (the TensorRT decode graph of such a layout).

caprese.export.folding.fold_selected builds new tensors row by row; here the same values ([Ŵ_g, Ŵ_1, L],
[Ŵ_2 ; R], [b̂_g, b̂_1, 0], neurons in ascending order, as folding.select_neurons picks them) are gathered
directly into the bound buffers: one pass, no temporaries the size of the result, and on the GPU when the
buffers live there. About 3x faster than fold + copy on CPU. The dense gate/up/down and L, R are read from a
copy-on-write memory map of weights.bin (on CPU: page-cache pages, no private copy of the FFN weights; on a
GPU: copied to the device once per layer).
"""

from __future__ import annotations

import numpy as np
import torch

from caprese.export import contract as C
from caprese.export.folding import dequantized_weight, select_neurons, standard_codes
from caprese.export.engine_spec import MATRIX_T
from caprese.export.weights import TORCH_DTYPES

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.int8, "int4": np.uint8}


class FoldInto:
    def __init__(self, manifest, device: str | torch.device = "cpu"):
        self.manifest = manifest
        self.k = manifest.layout.k
        self.intermediate = manifest.layout.intermediate_size
        self.device = torch.device(device)
        self._map = None
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._scratch: np.ndarray | None = None

    def _weight(self, ref) -> torch.Tensor:
        """`ref`'s bytes in weights.bin as a tensor (copy-on-write map; int4: the packed bytes [.., C / 2])."""
        e = self.manifest.entry(ref)
        if self._map is None:  # copy-on-write: writable for torch, never written, so it stays shared
            self._map = np.memmap(self.manifest.file("weights"), dtype=np.uint8, mode="c")
        arr = self._map[int(e["offset"]):int(e["offset"]) + int(e["length"])].view(_NP[e["dtype"]])
        shape = list(e["shape"])
        if e["dtype"] == "int4":  # packed: two codes per byte along the last axis
            shape[-1] //= 2
        t = torch.from_numpy(arr).reshape(shape)
        if ref.quant is not None:
            t = standard_codes(ref, t)
        return t.view(torch.bfloat16) if e["dtype"] == "bfloat16" else t

    def _sources(self, layer: int) -> dict[str, torch.Tensor]:
        """The fold sources as stored (quantized gate_up / down: codes, with "<role>.scale")."""
        key = ("stored", layer)
        if key not in self._tensors:
            roles = self.manifest.spec.layers[layer].fold.roles()  # engine_spec.FoldSources
            t = {role: self._weight(ref) for role, ref in roles.items()}
            for role in ("gate_up", "down"):
                if roles[role].quant is not None:
                    t[role + ".scale"] = self._weight(roles[role].quant.scale)
            self._tensors[key] = t
        return self._tensors[key]

    @property
    def quantized(self) -> bool:
        """A quantized layout whose decode graph takes quantized rows (fill with `quantized_rows`)."""
        return self.manifest.layout.quantized

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The fold sources in floats, [D, 2F] and [F, D] (a quantized layout's dequantized, for float w_gul /
        w_dr buffers: the TensorRT decode graph), on this folder's device."""
        if layer not in self._tensors:
            t = dict(self._sources(layer))
            fold = self.manifest.spec.layers[layer].fold
            if fold.gate_up.quant is not None:
                dt = TORCH_DTYPES[self.manifest.layout.dtype]
                for role in ("gate_up", "down"):
                    ref = getattr(fold, role)
                    w = dequantized_weight(ref, t.pop(role), t.pop(role + ".scale"))
                    t[role] = (w.t() if ref.storage == MATRIX_T else w).contiguous().to(dt)
            self._tensors[layer] = {role: v.to(self.device) for role, v in t.items()}
        return self._tensors[layer]

    def quantized_rows(self, layer: int, stat_sq: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """A quantized layout's GRIFFIN decode inputs (contract: w_gu_q / w_gu_s, w_d_q / w_d_s, b_gul; `out` by
        input name, batch 1, host tensors: int4 codes as their packed bytes) filled in place with whole rows of
        the stored codes and scales of the kept neurons; returns the neurons [k]."""
        t = self._sources(layer)
        k, f = self.k, self.intermediate
        idx = select_neurons(torch.as_tensor(stat_sq), k)[0]
        rows = torch.cat([idx, idx + f])
        gu_s, d_s = t["gate_up.scale"], t["down.scale"]
        pairs = ((C.w_gu_q, t["gate_up"], rows), (C.w_gu_s, gu_s.reshape(gu_s.shape[0], -1), rows),
                 (C.w_d_q, t["down"], idx), (C.w_d_s, d_s.reshape(d_s.shape[0], -1), idx))
        for name, src, sel in pairs:
            dst = out[name(layer)][0]
            np.take(src.numpy(), sel.numpy(), axis=0, out=dst.numpy().reshape(len(sel), -1))
        b = out.get(C.b_gul(layer))
        if b is not None:
            b[0, :2 * k].copy_(t["gate_up_bias"].index_select(0, rows))
            b[0, 2 * k:].zero_()
        return idx

    def __call__(self, layer: int, stat_sq: torch.Tensor, w_gul: torch.Tensor, w_dr: torch.Tensor,
                 b_gul: torch.Tensor | None = None) -> torch.Tensor:
        """Fill w_gul [1, D, 2k+r], w_dr [1, k+r, D] (and b_gul [1, 2k+r]) in place; return the neurons [k]."""
        t = self.tensors(layer)
        k, f = self.k, self.intermediate
        idx = select_neurons(torch.as_tensor(stat_sq), k)[0].to(self.device)
        cols = torch.cat([idx, idx + f])
        if self.device.type == "cpu" and w_gul.dtype != torch.bfloat16:
            self._fold_numpy(t, idx.numpy(), cols.numpy(), w_gul.numpy()[0], w_dr.numpy()[0],
                             None if b_gul is None else b_gul.numpy()[0])
            return idx
        w_gul[0, :, :2 * k].copy_(t["gate_up"].index_select(1, cols))
        torch.index_select(t["down"], 0, idx, out=w_dr[0, :k])
        if "L" in t:
            w_gul[0, :, 2 * k:].copy_(t["L"])
            w_dr[0, k:].copy_(t["R"])
        if b_gul is not None:
            b_gul[0, :2 * k].copy_(t["gate_up_bias"].index_select(0, cols))
            b_gul[0, 2 * k:].zero_()
        return idx

    def _fold_numpy(self, t: dict, idx: np.ndarray, cols: np.ndarray, w_gul: np.ndarray, w_dr: np.ndarray,
                    b_gul: np.ndarray | None) -> None:
        """The CPU path: numpy's single-threaded take (no thread pool to wake; measured 0.6 ms vs 6-12 ms for
        torch.index_select on a [1536, 576] gather with the cores busy), through one reused [D, 2k] scratch."""
        k = self.k
        gate_up = t["gate_up"].numpy()
        if self._scratch is None or self._scratch.shape != (gate_up.shape[0], 2 * k):
            self._scratch = np.empty((gate_up.shape[0], 2 * k), gate_up.dtype)
        np.take(gate_up, cols, axis=1, out=self._scratch)
        w_gul[:, :2 * k] = self._scratch
        np.take(t["down"].numpy(), idx, axis=0, out=w_dr[:k])
        if "L" in t:
            w_gul[:, 2 * k:] = t["L"].numpy()
            w_dr[k:] = t["R"].numpy()
        if b_gul is not None:
            np.take(t["gate_up_bias"].numpy(), cols, out=b_gul[:2 * k])
            b_gul[2 * k:] = 0
