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
    weight_quant.py low-bit weights of a whole decoder (RTN or GPTQ);  gptq.py, hessians.py: GPTQ and its statistics
"""
