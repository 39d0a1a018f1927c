"""Run a console entry point in-process (the same one-line-error wrapper the installed scripts use)."""

from __future__ import annotations

import sys

import pytest


def run_cli(entry, args, monkeypatch, capsys, prog: str = "caprese"):
    """-> (exit code, stdout, stderr) of `prog args...`."""
    monkeypatch.setattr(sys, "argv", [prog, *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        entry()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def assert_one_line_error(rc, err, *needles, code: int | None = None, log_prefix: str | None = None):
    """A failing exit (exactly `code` if given), no traceback, the last stderr line an error, needles present.

    log_prefix: progress lines starting with it may precede the error."""
    assert rc != 0 if code is None else rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not (log_prefix and ln.startswith(log_prefix))]
    assert lines, "expected an error message on stderr"
    assert lines[-1].startswith(("error:", "Error:")), err
    for n in needles:
        assert n in err, (n, err)
