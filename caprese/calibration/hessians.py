"""Input Hessians H = Σ_t x_t x_tᵀ (float64) of linear layers, gathered with forward hooks: GPTQ's statistics.

    with HessianCollector({"q": attn.q_proj, "k": attn.k_proj, ...}) as hc:
        decoder.blocks(x, 0, i, i + 1, phase="prefill")      # any forward that calls the modules
    hc.hessians["q"], hc.tokens["q"]

Modules that are called one after another on the SAME input tensor (q/k/v on the normed residual, gate/up on
the FFN input) share one accumulator, so the D×D product is computed once per group, not per module. Every row
of the input counts (prompt and response tokens alike: a deployed layer sees both).
"""

from __future__ import annotations

import torch
from torch import nn


class HessianCollector:
    """Context manager: forward hooks on `modules` (name -> nn.Module) accumulate Σ xᵀx of their inputs."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = dict(modules)
        self._acc: dict[str, torch.Tensor] = {}  # owner name -> [in, in] float64
        self._rows: dict[str, int] = {}
        self._owner: dict[str, str] = {}  # module name -> the accumulator it shares (itself when it owns one)
        self._last: tuple[torch.Tensor, str, set] | None = None  # (input, its owner, modules that saw it)
        self._handles: list = []

    def __enter__(self) -> "HessianCollector":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None  # drop the reference to the last input

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            shared = self._last is not None and self._last[0] is x and name not in self._last[2]
            owner = self._last[1] if shared else name
            if self._owner.setdefault(name, owner) != owner:
                raise RuntimeError(f"{name}: its input is shared with a different module than on the first call")
            if not shared:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                if name not in self._acc:
                    self._acc[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64,
                                                  device=flat.device)
                    self._rows[name] = 0
                self._acc[name].addmm_(flat.t(), flat)
                self._rows[name] += flat.shape[0]
                self._last = (x, name, {name})
            else:
                self._last[2].add(name)

        return hook

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """name -> Σ xᵀx [in, in] float64 (modules sharing an input share the same tensor object)."""
        return {n: self._acc[o] for n, o in self._owner.items()}

    @property
    def tokens(self) -> dict[str, int]:
        """name -> number of input rows accumulated."""
        return {n: self._rows[o] for n, o in self._owner.items()}
