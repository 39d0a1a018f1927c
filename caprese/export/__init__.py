"""caprese.export: ONNX prefill/decode graphs (standard opset 24), the static TensorRT check, TensorRT engines.

    from caprese.export.exporter import export
    export("path/to/hf-folder-or-artifact", "engine_dir", precision="fp32", max_seq_len=2048)
    export(src, out, ExportOptions(target="onnxruntime", weights="int4"))   # export_options.py: every field

contract.py is the graph I/O contract every runtime follows; engine_spec.py decides every weight's name, shape,
dtype and storage by role (manifest.spec); manifest.py reads ENGINE_DIR/manifest.json; folding.py turns GRIFFIN's
prefill statistic into the decode graph's folded weight inputs. Quantized weights (`weights="int4"`):
export_quantization.py picks the codes (the artifact's own, or RTN at export), quantized_weights.py serves them by
role and writes their bytes.
"""
