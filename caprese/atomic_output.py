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


def _parent_ready(out: Path, what: str) -> Path:
    """out's parent folder, created if missing; a file in the way is one CapreseError naming out."""
    parent = out.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CapreseError(f"cannot write {out}: {blocker} is a file, not a folder; choose another {what}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapreseError(f"cannot write {out}: {e.strerror or e}; choose another {what}") from None
    return parent


def temp_sibling(out: str | Path, what: str = "-o") -> Path:
    """A new hidden folder beside out (its parents created), or one CapreseError that names out (not the hidden
    temp name the OS error would carry)."""
    out = Path(out)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=_parent_ready(out, what)))
    except OSError as e:
        raise CapreseError(f"cannot write {out}: {e.strerror or e}; choose another {what}") from None


def check_writable(out: str | Path, what: str = "-o") -> Path:
    """out's parent folder, created if missing and checked writable by a real write (not os.access): a long job
    finds out before its work, not at the end."""
    os.rmdir(temp_sibling(out, what))
    return Path(out).parent


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, hint: str = "pass --force to overwrite it", what: str = "-o"):
    """`with atomic_dir(out) as tmp:` write into tmp; on success tmp becomes out (replacing it only if force).
    what: the option that names out, for the error when it cannot be written."""
    out = Path(out)
    if out.exists() and not force:
        raise CapreseError(f"{out} already exists; {hint}")
    tmp = temp_sibling(out, what)
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
    check_writable(path, "path")
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
