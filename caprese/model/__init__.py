"""The reference decoder: model spec, weights, a static-KV-cache transformer, sampling and the generation loop.

Everything above (calibration, export, runtime) is checked against this package, and this package is
checked against Hugging Face transformers.
"""

from caprese.model.spec import ModelSpec, load_spec
from caprese.model.decoder import Decoder
from caprese.model.loading import load_decoder

__all__ = ["ModelSpec", "load_spec", "Decoder", "load_decoder"]
