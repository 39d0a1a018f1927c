"""quantized.safetensors: the codes and scales of a quantized model, exactly the bytes export writes.

Per HF weight name N (stored once; a tied LM head / embedding is one entry plus an alias):
    N + ".codes"   uint8 [R, C * bits / 8]   QuantizedTensor.packed() (int4: element 2j low nibble, 2j+1 high)
    N + ".scales"  fp16 | fp32 [R, C / block]
metadata: "format" (caprese-quantized), "recipe" (QuantRecipe.to_dict() as JSON), "aliases" ({name: stored name}).
The tensors are in the recipe's orientation per role (QuantRecipe.block_axis: [out, in], or [in, out] for the
down projection). The writer also returns the file's sha256, which the artifact records; `read_quantized`
checks it, so a truncated or edited file is a one-line error, never silently different codes. The same codes give
the same bytes (and sha256) on every run: safetensors writes its metadata in a random key order, so the writer
puts the header's metadata keys in sorted order afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from caprese.calibration.weight_quant import QuantRecipe
from caprese.errors import CapreseError
from caprese.model.quantization import QuantizedTensor

FILE_FORMAT = "caprese-quantized"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_quantized(path: str | Path, qweights: dict[str, QuantizedTensor], recipe: QuantRecipe) -> str:
    """Write `qweights` to `path` (the caller makes it atomic); returns the file's sha256."""
    from safetensors.torch import save_file

    tensors, aliases, stored = {}, {}, {}
    for name in sorted(qweights):
        qt = qweights[name]
        if id(qt) in stored:
            aliases[name] = stored[id(qt)]
            continue
        stored[id(qt)] = name
        tensors[name + ".codes"] = qt.packed().contiguous()
        tensors[name + ".scales"] = qt.scales.contiguous()
    meta = {"format": FILE_FORMAT, "recipe": json.dumps(recipe.to_dict()), "aliases": json.dumps(aliases)}
    save_file(tensors, str(path), metadata=meta)
    sort_metadata_keys(Path(path))
    return sha256_file(Path(path))


def sort_metadata_keys(path: Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted (safetensors serializes them from
    a hash map: a random order per write). Same length, same tensors and offsets: only the key order changes."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(header)
        out = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) > n:  # cannot happen for a reordering of safetensors' compact JSON; never corrupt the file
            raise RuntimeError(f"{path}: the reordered safetensors header is longer than the written one")
        f.seek(8)
        f.write(out + b" " * (n - len(out)))


def read_quantized(path: str | Path, recipe: QuantRecipe | None = None, sha256: str | None = None
                   ) -> dict[str, QuantizedTensor]:
    """{HF name: QuantizedTensor} from `path`; one-line CapreseErrors for a missing, corrupt or foreign file, a
    sha256 other than `sha256`, or a recorded recipe other than `recipe` (when given)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CapreseError(f"{path} is missing; the quantized weights are gone: recalibrate (or re-quantize)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CapreseError(f"{path} is corrupt (its sha256 differs from the one recorded when it was written); "
                           "recalibrate")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise CapreseError(f"{path} is not a caprese quantized-weights file")
            have = QuantRecipe.from_dict(json.loads(meta["recipe"]))
            aliases = json.loads(meta.get("aliases", "{}"))
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except CapreseError:
        raise
    except Exception as e:
        raise CapreseError(f"{path} is corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "recalibrate") from None
    if recipe is not None and have.to_dict() != recipe.to_dict():
        raise CapreseError(f"{path} holds weights quantized with another recipe ({have.fmt.name}, block "
                           f"{have.fmt.block_name}, {have.method}) than its manifest records; recalibrate")
    out: dict[str, QuantizedTensor] = {}
    names = sorted({k.rsplit(".", 1)[0] for k in raw})
    for name in names:
        codes, scales = raw.get(name + ".codes"), raw.get(name + ".scales")
        if codes is None or scales is None:
            raise CapreseError(f"{path} is corrupt: {name} lacks its codes or scales; recalibrate")
        out[name] = QuantizedTensor.from_packed(codes, scales, have.fmt)  # checks shapes and dtypes
    for name, target in aliases.items():
        if target not in out:
            raise CapreseError(f"{path} is corrupt: alias {name} -> {target} names no stored tensor; recalibrate")
        out[name] = out[target]
    return out

