"""Write a folder or a file all at once: build it under a temporary sibling name, rename it into place only
when complete.

A killed or failed run leaves no half-written output behind (only, at worst, a hidden `.NAME-*` temp folder or
`.NAME.PID.tmp` file, which the next successful run does not trust or reuse).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from caprese.errors import CapreseError


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, hint: str = "pass --force to overwrite it"):
    """`with atomic_dir(out) as tmp:` write into tmp; on success tmp becomes out (replacing it only if force)."""
    out = Path(out)
    if out.exists() and not force:
        raise CapreseError(f"{out} already exists; {hint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """`with atomic_file(path) as tmp:` write the file tmp; on success it replaces path (readers see the old file
    or the new one, never a torn one); on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON at path, all at once (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))
