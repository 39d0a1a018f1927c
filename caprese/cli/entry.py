"""Run a click command so user errors are one line on stderr with exit code 2, and Ctrl-C is exit 130."""

from __future__ import annotations

import sys

import click

from caprese.errors import CapreseError


def run(command: click.Command) -> None:
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:  # bad options: click's own message and usage hint
        e.show()
        sys.exit(e.exit_code)
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
        click.echo(f"error: {e.strerror or e} ({getattr(e, 'filename', '') or ''})".rstrip(" ()"), err=True)
        sys.exit(2)
