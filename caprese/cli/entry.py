"""Run a click command so user errors (bad flags included) are one line on stderr with exit code 2, and Ctrl-C
is exit 130."""

from __future__ import annotations

import sys

import click

from caprese.errors import CapreseError


def one_line(e: click.ClickException) -> str:
    """click's message on one line, with where to read the usage instead of click's three-line block."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        msg = f"{msg.rstrip('.')} (see '{ctx.command_path} --help')"
    return msg


def _prog_name() -> str | None:
    """The script's name as typed (caprese, caprese-export); None lets click name `python -m caprese` itself."""
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return None if not name or name.endswith(".py") or name.startswith("-") else name


def run(command: click.Command) -> None:
    try:
        command.main(standalone_mode=False, prog_name=_prog_name())
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:  # bad options too: one line, like every other error
        click.echo(f"error: {one_line(e)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except CapreseError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (BrokenPipeError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            sys.exit(1)
        where = getattr(e, "filename", None)
        click.echo(f"error: {e.strerror or e}" + (f": {where}" if where else "") +
                   "; check the path and its permissions", err=True)
        sys.exit(2)
