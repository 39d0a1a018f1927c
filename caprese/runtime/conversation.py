"""A multi-turn chat on one Generator, reusing the KV cache from turn to turn.

Each turn renders the whole conversation with the tokenizer's chat template and hands it to the Generator with
reuse=True: the slots whose tokens did not change keep their K/V, and only the new part is prefilled (at
start > 0). On an approximated engine the previous reply is prefilled again with the new turn (see
Generator.reusable), so a conversation gives the same tokens as one generate over its concatenated text
(greedy, dense and GRIFFIN; CATS combines per-turn thresholds by their token-weighted mean).
A reply that would run past the engine's max_seq_len is cut there (stop_reason "context"); a conversation
that already fills it raises ContextFull until reset().
"""

from __future__ import annotations

from caprese.errors import CapreseError
from caprese.model.sampling import Sampling
from caprese.model.tokenizer import encode_messages
from caprese.runtime.generator import Generator, RuntimeResult, TextStream


class ContextFull(CapreseError):
    """The conversation fills the engine's max_seq_len: nothing more can be generated until a reset."""


class Conversation:
    """A multi-turn chat on one Generator: each turn is the whole conversation through the chat template, and
    the KV cache of the prefix the last turn left is kept (only the new tokens are prefilled)."""

    def __init__(self, generator: Generator, system: str | None = None):
        if not getattr(generator.tokenizer, "chat_template", None):
            raise CapreseError("this engine's tokenizer has no chat template; use `caprese run` without --chat")
        self.g, self.system = generator, system
        self.messages: list[dict] = []
        self.last: RuntimeResult | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None
        self.g.forget()

    @property
    def context_tokens(self) -> int:
        """Tokens the KV cache holds now."""
        return len(self.g.cached)

    def say(self, text: str, max_new_tokens: int = 512, sampling: Sampling = Sampling(),
            reselect_every: int = 0) -> TextStream:
        """Stream the reply to one user turn; the turn and the reply (even a stopped one) join the conversation
        when the stream ends or is closed."""
        if not text.strip():
            raise CapreseError("the turn is empty; say something")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = encode_messages(self.g.tokenizer, messages)
        limit = self.g.max_seq_len
        if len(ids) >= limit:
            raise ContextFull(f"context full: this turn would bring the conversation to {len(ids)} tokens, the engine "
                              f"holds {limit}; /reset to start a new conversation")
        room = limit - len(ids)
        cut = room < max_new_tokens

        def finish(result: RuntimeResult) -> None:
            if cut and result.stop_reason == "length":
                result.stop_reason = "context"
            self.messages = messages + [{"role": "assistant", "content": result.text}]
            self.last = result

        return self.g.stream_ids(ids, min(max_new_tokens, room), sampling, reselect_every, reuse=True,
                                 on_finish=finish)
