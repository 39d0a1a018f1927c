"""`caprese-export`: model (plain HF folder or calibration artifact) to ONNX graphs and TensorRT engines."""

from __future__ import annotations

import click

from caprese.cli.entry import run
from caprese.errors import CapreseError


@click.command("export", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", default=None, type=click.Path(path_type=str),
              help="Engine folder to create (required unless --check is given alone).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Weights, activations and KV cache dtype; reductions, selection statistics and logits stay fp32.")
@click.option("--max-seq-len", default=None, type=click.IntRange(min=2),
              help="Longest prompt + generation the engine serves (RoPE table, KV buffers, TensorRT profiles). "
                   "Default: the model's context, at most 4096.")
@click.option("--max-prompt-len", default=None, type=click.IntRange(min=1),
              help="Longest prompt (prefill profile). Default: --max-seq-len - 1.")
@click.option("--engine/--no-engine", default=False, show_default=True,
              help="Also build TensorRT engines (needs TensorRT and an NVIDIA GPU).")
@click.option("--check", is_flag=True,
              help="Run the static TensorRT operator check and print every violation. With -o: on the graphs just "
                   "exported. Alone (no -o): SRC must be an engine folder or an .onnx file (a model folder or "
                   "artifact: export it with -o ... --check).")
@click.option("--target", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "onnxruntime"]),
              help="tensorrt: standard ONNX ops only (the reference; runs on TensorRT and ONNX Runtime). "
                   "onnxruntime: ONNX Runtime's GroupQueryAttention / SkipSimplifiedLayerNormalization "
                   "contrib ops, faster there, batch 1, never for TensorRT.")
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
@click.option("--base-model", default=None, type=click.Path(path_type=str),
              help="For an artifact: its base model folder, when it has moved since calibration.")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Largest batch of the TensorRT profiles.")
@click.option("--timing-cache", default=None, type=click.Path(path_type=str),
              help="TensorRT timing cache file to reuse and update across builds.")
@click.option("--weights", default=None, metavar="int4|int8",
              help="Block-quantized weights (every decoder linear weight; symmetric, fp16 scales). An artifact "
                   "calibrated with quantized weights is exported with its own codes (this may only repeat its bit "
                   "width); otherwise round-to-nearest at export time.")
@click.option("--block-size", default=None, metavar="32|64|128|row",
              help="Elements per scale along the input features (row: one scale per row). Default: int4 64 for "
                   "--target tensorrt (TensorRT's INT4 takes 64 or 128), 32 for onnxruntime; int8 row.")
@click.option("--quantize-head", is_flag=True,
              help="Quantize the LM head too (with --weights; the embedding table always stays floating point).")
@click.option("--int8-activations", is_flag=True,
              help="--target onnxruntime: MatMulNBits with int8 activations (accuracy_level 4, ONNX Runtime GenAI's "
                   "CPU default): faster, but no longer the PyTorch model's numerics.")
@click.option("--float-selection", is_flag=True,
              help="GRIFFIN with --weights: the decode graph takes the per-prompt matrices in floats (dequantized "
                   "once per prompt) instead of quantized rows: faster on ONNX Runtime's CPU provider, 8x the "
                   "per-prompt bytes of int4.")
@click.option("--fp16-bypass", is_flag=True,
              help="With --weights, on an artifact with a bypass: store its L and R in fp16 (cast to fp32 where "
                   "read): half their bytes per decode step, ~1e-3 relative error on the bypass's output.")
@click.option("--kv-dtype", default=None, type=click.Choice(["fp32", "fp16"]),
              help="The KV cache's dtype. Default: fp16 for --target onnxruntime with --precision fp32 (head_dim a "
                   "multiple of 16), else the precision's. fp16 halves the cache's bytes per decode step "
                   "(GroupQueryAttention in fp16: fp32 arithmetic on fp16 q, K, V, as llama.cpp's default f16 "
                   "cache; ~5e-4 relative error on K and V; the native backend's 1,024-token step 0.83x). fp32 keeps "
                   "it fp32 (ONNX Runtime's backend runs the fp32 cache 7-12% faster).")
def export(src: str, out: str | None, precision: str, max_seq_len: int | None, max_prompt_len: int | None,
           engine: bool, check: bool, target: str, force: bool, base_model: str | None, max_batch: int,
           timing_cache: str | None, weights: str | None, block_size: str | None, quantize_head: bool,
           int8_activations: bool, float_selection: bool, fp16_bypass: bool, kv_dtype: str | None) -> None:
    """Export SRC (a Hugging Face model folder, or a calibration artifact from `caprese calibrate`) to ENGINE_DIR.

    ENGINE_DIR gets prefill.onnx and decode.onnx (standard ONNX opset 24, one shared weights.bin; what ONNX
    Runtime runs), the copies TensorRT parses (static KV length; one shared graph unless GRIFFIN), the tokenizer
    files and manifest.json; with --engine, TensorRT plans too (one engine with two profiles unless GRIFFIN).
    A dense folder exports the dense model; an artifact exports its method (GRIFFIN: the decode graph takes the
    per-prompt folded matrices [W_g, W_1, L] and [W_2; R] as inputs; CATS: thresholds inside the graph) with
    the bypass folded in.

    Every standard export checks the graphs TensorRT parses against its ONNX rules; --target onnxruntime
    trades that for ONNX Runtime's fused contrib ops (CPU/edge deployments).
    """
    from caprese.export.export_options import ExportOptions
    from caprese.export.exporter import check_folder, export as run_export

    def log(msg: str) -> None:
        click.echo(f"[caprese-export] {msg}", err=True)

    if out is None:
        if not check:
            raise click.UsageError("missing -o/--output ENGINE_DIR (or pass --check to only check SRC)")
        _report(check_folder(src))
        return
    if check and target != "tensorrt":
        raise click.UsageError("--check is the TensorRT operator check; it applies to --target tensorrt graphs")
    options = ExportOptions(precision=precision, target=target, max_seq_len=max_seq_len,
                            max_prompt_len=max_prompt_len, max_batch=max_batch, weights=weights, block_size=block_size,
                            quantize_head=quantize_head, int8_activations=int8_activations,
                            float_selection=float_selection, fp16_bypass=fp16_bypass, kv_dtype=kv_dtype, engine=engine,
                            timing_cache=timing_cache)
    result = run_export(src, out, options, base_model=base_model, force=force, log=log)
    if check:
        _report(check_folder(result.out))
    click.echo(str(result.out))


def _report(results: dict) -> None:
    from caprese.export.tensorrt_ops import TENSORRT_TABLE_VERSION

    total = 0
    for name, violations in results.items():
        for v in violations:
            click.echo(f"{name}: {v}")
        total += len(violations)
        if not violations:
            click.echo(f"{name}: passes the static TensorRT {TENSORRT_TABLE_VERSION} check")
    if total:
        raise CapreseError(f"{total} TensorRT violation(s) in {', '.join(results)} (listed above)")


def main() -> None:
    run(export)
