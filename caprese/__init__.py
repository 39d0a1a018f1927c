"""caprese: cheaper decoding for reasoning LLMs (GRIFFIN/CATS + the Caprese low-rank bypass), exported to ONNX and TensorRT.

Subpackages import downward only: model <- calibration <- export <- runtime <- evaluation and cli.
"""

__version__ = "0.1.0"
