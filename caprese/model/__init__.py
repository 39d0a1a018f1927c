"""The reference decoder: model spec, weights, a static-KV-cache transformer, sampling and the generation loop.

Everything above (calibration, export, runtime) is checked against this package, and this package is
checked against Hugging Face transformers.
"""

from caprese.model.spec import ModelSpec, load_spec
from caprese.model.decoder import Decoder
from caprese.model.loading import load_decoder
from caprese.model.sampling import Sampling
from caprese.model.text_model import TextModel, TextResult

__all__ = ["ModelSpec", "load_spec", "Decoder", "load_decoder", "Sampling", "TextModel", "TextResult"]
