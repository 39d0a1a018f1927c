"""Hashes that decide what may be reused: the base model an artifact belongs to, and the work-dir keys.

An artifact's adapters only make sense on the exact base weights they were trained against (`fingerprint`,
checked on load). A work dir's captured activations, finished layers and checkpoint are reused only under a
key (`digest`) of everything they depend on: model, recipe, samples (`samples_digest`), initial adapters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from caprese.model.loading import weight_files
from caprese.model.spec import read_json

_SAMPLE = 1 << 20


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and, per weight file, its size and its first and last MiB."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update(json.dumps(read_json(model_dir / "config.json", "config.json"), sort_keys=True).encode())
    for f in weight_files(model_dir):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def digest(obj) -> str:
    """32 hex digits of sha256 over `obj` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def samples_digest(samples) -> str:
    """Of the samples' token ids, prompt / response split included."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([list(s.prompt_ids), list(s.response_ids)]).encode())
    return h.hexdigest()[:32]


def adapters_digest(adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Of every layer's (L, R) values, as float32."""
    h = hashlib.sha256()
    for i, (L, R) in sorted(adapters.items()):
        h.update(f"{i}:".encode() + L.float().contiguous().numpy().tobytes() + R.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
