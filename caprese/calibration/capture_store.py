"""Captured activations in the work dir: append-only row files with a JSON manifest, written one sample at a time
and read back for training (both layer-wise stages; sequential.py also keeps its residual-stream states here).

`CaptureLayer` writes a layer's x and target-residual r rows ([rows, D], fp32 or bf16 raw files
`layer_{i}.x` / `.r`) and `layer_{i}.json` (rows / samples done, sums, key, complete), rewritten atomically every
SYNC_S seconds: a killed capture resumes from the last synced sample (the row files are truncated back to it).
`Rows` reads them back: from memory when small enough, else batch by batch from a memory map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from caprese.atomic_output import write_json_atomic

SYNC_S = 5.0  # how often the capture manifests are rewritten (a kill loses at most this much capture)
STORES = {"fp32": (np.float32, 4), "bf16": (np.int16, 2)}  # on-disk dtype -> (numpy view, bytes per value)


def read_json_or_none(path: Path) -> dict | None:
    """A manifest, or None when it is missing or unreadable (the work it describes is then redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def to_bytes(t: torch.Tensor, store: str) -> bytes:
    """Rows of `t` as raw fp32 or bf16 bytes."""
    t = t.detach().to("cpu")
    if store == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return t.to(torch.float32).contiguous().numpy().tobytes()


class CaptureLayer:
    """One layer's capture files under `folder`: resumed when the manifest's key matches, else started over."""

    def __init__(self, folder: Path, layer: int, dim: int, key: str, store: str):
        self.layer, self.dim, self.key, self.store = layer, dim, key, store
        self.meta_path = folder / f"layer_{layer}.json"
        self.x_path, self.r_path = folder / f"layer_{layer}.x", folder / f"layer_{layer}.r"
        self.row_bytes = dim * STORES[store][1]
        st = read_json_or_none(self.meta_path)
        ok = isinstance(st, dict) and st.get("key") == key and isinstance(st.get("rows"), int) and all(
            p.is_file() and p.stat().st_size >= st["rows"] * self.row_bytes for p in (self.x_path, self.r_path))
        self.state = st if ok else {"key": key, "layer": layer, "dim": dim, "store": store, "rows": 0,
                                    "samples_done": 0, "sum_y2": 0.0, "sum_r2": 0.0, "complete": False}
        self.fx = self.fr = None

    @property
    def complete(self) -> bool:
        return bool(self.state["complete"])

    def open(self) -> None:
        size = self.state["rows"] * self.row_bytes
        for p in (self.x_path, self.r_path):
            with open(p, "ab"):
                pass
            os.truncate(p, size)  # drop rows written after the last synced manifest
        self.fx, self.fr = open(self.x_path, "ab"), open(self.r_path, "ab")

    def append(self, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> None:
        self.fx.write(to_bytes(x, self.store))
        self.fr.write(to_bytes(r, self.store))
        self.state["rows"] += x.shape[0]
        self.state["sum_y2"] += float(y.double().square().sum())
        self.state["sum_r2"] += float(r.double().square().sum())

    def sync(self, complete: bool = False) -> None:
        if self.fx is not None:
            self.fx.flush()
            self.fr.flush()
        if complete:
            self.state["complete"] = True
        write_json_atomic(self.meta_path, self.state)

    def close(self) -> None:
        for f in (self.fx, self.fr):
            if f is not None:
                f.close()
        self.fx = self.fr = None

    def remove(self) -> None:
        for p in (self.x_path, self.r_path, self.meta_path):
            p.unlink(missing_ok=True)


class Rows:
    """A layer's captured (x, r) rows: in memory when small enough, else read batch by batch from the files."""

    def __init__(self, cap: CaptureLayer, device, max_ram_bytes: int):
        n, d = cap.state["rows"], cap.dim
        dt = STORES[cap.store][0]
        self.n, self.d, self.store, self.device = n, d, cap.store, torch.device(device)
        self.x = np.memmap(cap.x_path, dtype=dt, mode="r", shape=(n, d)) if n else np.zeros((0, d), dt)
        self.r = np.memmap(cap.r_path, dtype=dt, mode="r", shape=(n, d)) if n else np.zeros((0, d), dt)
        self.ram = 2 * n * d * 4 <= max_ram_bytes
        if self.ram:
            self.x, self.r = self._tensor(self.x), self._tensor(self.r)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))  # a private, writable copy (never a view of the memory map)
        if self.store == "bf16":
            t = t.view(torch.bfloat16)
        return t.to(device=self.device, dtype=torch.float32)

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx (sorted ascending: the same order whichever way the rows are held)."""
        if self.ram:
            t = torch.from_numpy(idx)
            if self.device.type != "cpu":
                t = t.to(self.device)
            return self.x.index_select(0, t), self.r.index_select(0, t)
        return self._tensor(self.x[idx]), self._tensor(self.r[idx])

    def chunks(self, size: int = 8192):
        for a in range(0, self.n, size):
            yield self.get(np.arange(a, min(a + size, self.n)))
