"""Tokenizer, chat template and stop ids of a local model folder (tokenizer.json read by transformers, offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caprese.errors import CapreseError


def load_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise CapreseError(f"no tokenizer (tokenizer.json) in {model_dir}; copy the model's tokenizer files there")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise CapreseError(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None


def prompt_ids(prompt, vocab_size: int) -> list[int]:
    """A prompt given as token ids, checked: an id outside the vocabulary would read another row of the embedding
    (ONNX Runtime's Gather wraps negative ids) or fail deep in a backend."""
    ids = []
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise CapreseError(f"token ids must be integers; got {t!r} ({type(t).__name__})")
        if not 0 <= t < vocab_size:
            raise CapreseError(f"token id {int(t)} is outside the vocabulary (0..{vocab_size - 1})")
        ids.append(int(t))
    if not ids:
        raise CapreseError("the prompt has zero tokens")
    return ids


def user_prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """encode_prompt for a prompt a user typed (TextModel / Generator.encode): an empty one is refused, since a
    tokenizer that adds BOS would make it one token and reply to nothing."""
    if not prompt.strip():
        raise CapreseError("the prompt is empty; give some text (-p TEXT)")
    ids = encode_prompt(tokenizer, prompt, chat, system)
    if not ids:
        raise CapreseError("the prompt encodes to zero tokens; give a non-empty prompt")
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids for a prompt; with chat=True the tokenizer's chat template wraps it as one user turn."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise CapreseError("this model's tokenizer has no chat template; run without --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_messages(tokenizer, messages)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(spec_eos: tuple, tokenizer) -> tuple[int, ...]:
    """EOS ids of generation_config.json (what transformers' generate stops on); the tokenizer's EOS if none."""
    if spec_eos:
        return tuple(spec_eos)
    return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back bytes that do not yet form a character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """At the end of a reply: whatever was held back for a character that never completed."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True) if self.ids else ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece
