"""caprese.calibration: efficient FFN methods (GRIFFIN, CATS, magnitude) and the Caprese low-rank bypass, trained
by layer-wise then end-to-end distillation into a calibration artifact.

    recipe.py       CalibrationRecipe (what defines an artifact, per-method defaults), CalibrationOptions
    calibrate.py    calibrate(): the Python API behind `caprese calibrate`
    methods.py      GRIFFIN / CATS / magnitude FFNs, apply_method;  bypass.py: x·L·R and its folding
    layerwise.py    capture + per-layer training (the paper's);  sequential.py: the layer-after-layer option
    e2e.py          end-to-end distillation;  schedule.py: the learning-rate schedule both stages use
    capture_store.py, distributed.py, fingerprint.py, progress.py: work-dir row files, torchrun, hashes, bars
    artifact.py     caprese.json + adapters.safetensors;  source.py: open a folder or an artifact for generation
    data.py, problems.py: calibration samples (a user's file, or the dense model's answers to built-in problems)
    weight_quant.py, gptq.py, hessians.py: block-quantized weights (RTN / GPTQ) in caprese/model/quantization.py's
                    format;  quantized_student.py: the quantized student beside the unquantized teacher;
                    quantized_file.py: quantized.safetensors;  weights_choice.py: the --weights flags

Quantized artifacts (`caprese calibrate --weights int4|int8`), the interface export reads:
    art = load_artifact(path)          # one-line errors: damaged manifest, missing quantized.safetensors
    art.weights                        # QuantRecipe (format: bits, block_size, scale_dtype; method rtn|gptq; roles;
                                       #   block_axes) or None for an unquantized artifact
    art.quantized_weights()            # {HF weight name: QuantizedTensor}, checked (sha256 + recipe) -> the codes
                                       #   and scales to write as they are (never re-quantize); each tensor is in its
                                       #   role's orientation: [out, in] blocked along the inputs, the down projection
                                       #   [in = F, out = D] blocked along the outputs (QuantRecipe.block_axis)
    art.apply(decoder)                 # the PyTorch reference: method + L, R installed, then every quantized weight
                                       #   replaced by its dequantized value (linear_weight(qt, axis))
    art.method                         # "none" (issue 15): no pruning; decode runs the full (quantized) FFN + x·L·R,
                                       #   prefill the (quantized) FFN alone, like every method's prefill
  Every quantized weight is quantized in BOTH graphs (prefill and decode) and in every layer; only the layers in
  art.layers carry a method / bypass. Static selections (magnitude) are computed from the UNQUANTIZED weights.
  L, R stay float32 in adapters.safetensors.
"""
