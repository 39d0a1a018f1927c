"""Write a folder all at once: build it in a temporary sibling, rename it into place only when complete.

A killed or failed run leaves no half-written output behind (only, at worst, a hidden `.NAME-*` temp folder,
which the next successful run does not trust or reuse).
"""

from __future__ import annotations

import contextlib
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
