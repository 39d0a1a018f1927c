"""`caprese-export`: model (plain HF folder or calibration artifact) to ONNX graphs and TensorRT engines."""

from __future__ import annotations

import click

from caprese.cli.entry import run
from caprese.errors import CapreseError


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Engine folder to create.")
def export(src: str, out: str) -> None:
    """Export SRC (a Hugging Face model folder or a calibration artifact) to an engine folder.

    Not implemented in this release: the exporter (ONNX prefill/decode graphs, TensorRT engines) lands with
    the export work item. The command is registered now so scripts can depend on its name.
    """
    raise CapreseError("caprese-export is not implemented yet in this version; "
                       "use `caprese generate MODEL_DIR` to run a model with the PyTorch reference decoder")


def main() -> None:
    run(export)
