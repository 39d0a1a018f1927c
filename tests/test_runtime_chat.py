"""Multi-turn chat on an engine folder (caprese.runtime.conversation): the KV cache is reused between turns and
a conversation gives the same greedy tokens as one generate over its concatenated text; /reset; context full."""

from __future__ import annotations

import pytest

from caprese.model.tokenizer import encode_messages
from caprese.runtime import Generator
from caprese.runtime.conversation import ContextFull, Conversation
from export_helpers import MAX_SEQ, get_export, one_torch_thread

TURNS = ("the cat sat on the mat", "and then what", "tell me more")
CHAT_SEQ = 256  # the tiny models' context: random replies rarely survive decode -> encode, so turns grow fast
_ENGINES: dict = {}


def chat_engine(tmp_path_factory, tiny_model_dir, kind: str, method: str):
    """The export of get_export's source (the same artifact) with a 256-token context."""
    from caprese.export.exporter import export

    if (kind, method) not in _ENGINES:
        _, src = get_export(tmp_path_factory, tiny_model_dir, kind, method)
        out = tmp_path_factory.mktemp(f"chat_{kind}_{method}") / "engine"
        _ENGINES[kind, method] = export(src, out, max_seq_len=CHAT_SEQ).out
    return _ENGINES[kind, method]


def chat(g: Generator, turns, n: int = 10, system: str | None = "be brief", rho: int = 0):
    conv = Conversation(g, system)
    results = []
    for text in turns:
        results.append(conv.say(text, n, reselect_every=rho).consume())
    return conv, results


@pytest.mark.parametrize("kind,method,backend,rho", [
    ("llama", "dense", "onnxruntime", 0), ("llama", "griffin", "onnxruntime", 0),
    ("llama", "griffin", "onnxruntime", 4), ("qwen2", "griffin", "torch", 0),
])
def test_conversation_equals_one_generate_over_it(kind, method, backend, rho, tmp_path_factory, tiny_model_dir):
    engine = chat_engine(tmp_path_factory, tiny_model_dir, kind, method)
    with one_torch_thread():
        g = Generator.load(engine, backend=backend, threads=1)
        g.eos_ids = ()  # full-length replies: every turn has something to compare
        conv, results = chat(g, TURNS, rho=rho)
        for prev, r in zip(results, results[1:]):
            # dense keeps every slot whose token did not change (the reply too, where it survives decode ->
            # encode); an approximated engine keeps the previous prompt and prefills the reply again
            assert r.stats.reused_tokens == prev.stats.prompt_tokens if method != "dense" else \
                r.stats.reused_tokens >= prev.stats.prompt_tokens
        ids = encode_messages(g.tokenizer, conv.messages[:-1])  # the whole conversation before the last reply
        single = Generator.load(engine, backend=backend, threads=1).stream_ids(ids, 10, reselect_every=rho,
                                                                                 ignore_eos=True).consume()
    assert len(single.tokens) == 10 and single.tokens == results[-1].tokens
    assert conv.context_tokens == len(ids) + 10 - 1


def test_both_backends_chat_alike_on_cats(tmp_path_factory, tiny_model_dir):
    """CATS combines the turns' thresholds (token-weighted mean): not one generate's, but the same on both."""
    engine = chat_engine(tmp_path_factory, tiny_model_dir, "llama", "cats")
    with one_torch_thread():
        a = [r.tokens for r in chat(Generator.load(engine, "onnxruntime", threads=1), TURNS)[1]]
        b = [r.tokens for r in chat(Generator.load(engine, backend="torch", threads=1), TURNS)[1]]
    assert a == b


def test_reset_starts_over(tmp_path_factory, tiny_model_dir):
    engine = chat_engine(tmp_path_factory, tiny_model_dir, "llama", "griffin")
    g = Generator.load(engine, "onnxruntime", threads=1)
    conv, first = chat(g, TURNS[:2])
    conv.reset()
    assert conv.context_tokens == 0 and conv.messages == [{"role": "system", "content": "be brief"}]
    again = conv.say(TURNS[0], 10).consume()
    assert again.tokens == first[0].tokens and again.stats.reused_tokens == 0


def test_context_full(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = Generator.load(engine, "onnxruntime", threads=1)
    conv = Conversation(g)
    r = conv.say("the cat sat on the mat", 200).consume()
    if r.stop_reason == "eos":  # the tiny model ended its reply: fill the rest with a long turn instead
        r = conv.say("the mat " * 20, 200).consume()
    assert r.stop_reason == "context"
    assert conv.context_tokens == MAX_SEQ - 1  # the last sampled token is never fed
    with pytest.raises(ContextFull, match="context full.*reset") as e:
        conv.say("more", 10)
    assert "\n" not in str(e.value)
    conv.reset()
    assert conv.say("more", 4).consume().tokens


def test_stopped_reply_joins_the_conversation(tmp_path_factory, tiny_model_dir):
    engine, _ = get_export(tmp_path_factory, tiny_model_dir, "llama", "dense")
    g = Generator.load(engine, "onnxruntime", threads=1)
    g.eos_ids = ()  # no early EOS: the stop must be what ends it
    conv = Conversation(g)
    stream = conv.say(TURNS[0], 30)
    for i, _ in enumerate(stream.tokens()):
        if i == 4:
            stream.stop()
    assert stream.result.stop_reason == "interrupted" and len(stream.result.tokens) == 5
    assert conv.messages[-1] == {"role": "assistant", "content": stream.result.text}
    nxt = conv.say(TURNS[1], 5).consume()
    assert nxt.stats.reused_tokens > 0 and len(nxt.tokens) == 5
