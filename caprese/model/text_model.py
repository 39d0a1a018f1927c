"""TextModel: a local HF folder's decoder + tokenizer behind one call, the Python twin of `caprese generate`.

    from caprese.model import TextModel
    tm = TextModel.load("path/to/model", precision="fp32")
    reply = tm.generate("What is 12 + 7?", max_new_tokens=64, chat=True)
    print(reply.text, reply.stats.ms_per_token)

generate() takes RunOptions' fields in RunOptions' order, as caprese.runtime.Generator.generate does, and its
result reports through the same stats type (GenerationStats; the runtime's RuntimeStats extends it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from caprese.errors import CapreseError
from caprese.model.decoder import Decoder
from caprese.model.generation import GenerationStats, generate
from caprese.model.run_options import RunOptions
from caprese.model.loading import check_device, load_decoder
from caprese.model.sampling import Sampling, check_sampling
from caprese.model.spec import load_spec
from caprese.model.tokenizer import IncrementalDecoder, load_tokenizer, prompt_ids, stop_ids, user_prompt_ids


@dataclasses.dataclass
class TextResult:
    text: str
    tokens: list[int]  # new tokens, the stop token excluded
    stop_reason: str  # "eos" | "length" (engines also: "context", "interrupted")
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"text": self.text, **self.stats.to_dict(), "stop_reason": self.stop_reason}

    def report(self) -> str:
        """The stats' one-line report and why the reply stopped."""
        return f"{self.stats.report()} ({self.stop_reason})"


class TextModel:
    def __init__(self, decoder: Decoder, tokenizer, model_dir: Path):
        self.decoder, self.tokenizer, self.model_dir = decoder, tokenizer, model_dir
        self.eos_ids = stop_ids(decoder.spec.eos_token_ids, tokenizer)
        self.label = "dense"  # what runs: "dense", "griffin(d=0.5, first-half)", "caprese(griffin, ...)"
        self.threads: int | None = None  # CPU intra-op threads; None: one per free CPU (caprese.cpu_threads)

    @classmethod
    def load(cls, model_dir: str | Path, precision: str = "fp32", device: str = "cpu") -> "TextModel":
        """A local Hugging Face folder's decoder (every tensor checked), tokenizer and stop ids, at `precision`
        (fp32 / fp16 / bf16) on `device` (cpu, cuda, cuda:N)."""
        model_dir = Path(model_dir)
        spec = load_spec(model_dir)
        tokenizer = load_tokenizer(model_dir)
        check_device(device)
        return cls(load_decoder(model_dir, precision, device, spec=spec), tokenizer, model_dir)

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        return user_prompt_ids(self.tokenizer, prompt, chat, system)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                 chat: bool = False, system: str | None = None, reselect_every: int = 0,
                 ignore_eos: bool = False, on_text: Callable[[str], None] | None = None) -> TextResult:
        """Reply to `prompt` (text, or token ids used as they are); the arguments are RunOptions' fields, in its
        order; `on_text` receives text pieces as they form. CPU threads: self.threads."""
        ids = (prompt_ids(prompt, self.decoder.spec.vocab_size) if isinstance(prompt, (list, tuple))
               else self.encode(prompt, chat, system))
        if max_new_tokens < 1:
            raise CapreseError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        check_sampling(sampling)
        limit = self.decoder.spec.max_position_embeddings
        if len(ids) >= limit:
            raise CapreseError(f"the prompt ({len(ids)} tokens) leaves no room in the model's context of {limit}; "
                               "shorten it")
        if len(ids) + max_new_tokens > limit:
            raise CapreseError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                               f"context of {limit}; ask for fewer new tokens")
        on_token = None if on_text is None else TextStreamer(self.tokenizer, on_text)
        result = generate(self.decoder, ids, max_new_tokens, sampling, () if ignore_eos else self.eos_ids, on_token,
                          reselect_every, self.threads)
        if on_token is not None:
            on_token.flush()
        tokens = result.tokens[0]
        result.stats.backend = "torch (reference)"
        return TextResult(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens, result.stop_reason[0],
                          result.stats)

    def run(self, prompt: str | list[int], options: RunOptions = RunOptions(),
            on_text: Callable[[str], None] | None = None) -> TextResult:
        """generate() with its options as one object (what `caprese generate` builds from its flags)."""
        return self.generate(prompt, **options.kwargs(), on_text=on_text)


class TextStreamer:
    """Token ids in, complete text pieces out (to on_text); flush() sends what is held back at the end."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.detok, self.on_text = IncrementalDecoder(tokenizer), on_text

    def __call__(self, token_id: int) -> None:
        self._send(self.detok.push(token_id))

    def flush(self) -> None:
        self._send(self.detok.flush())

    def _send(self, piece: str) -> None:
        if piece:
            self.on_text(piece)
