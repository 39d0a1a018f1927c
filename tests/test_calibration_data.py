"""Calibration data: every local file format and error, and the dense model's synthetic samples (checked against
unbatched generate(), resumed after an interruption, served from the cache without running the model)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import caprese.calibration.data as data
from caprese.calibration.data import Sample, describe, load_samples, synthetic_samples
from caprese.calibration.methods import apply_method
from caprese.calibration.problems import calibration_prompt, problems
from caprese.errors import CapreseError
from caprese.model.generation import generate
from caprese.model.sampling import Sampling
from caprese.model.text_model import TextModel
from caprese.model.tokenizer import encode_prompt, load_tokenizer

KIND = "llama"
BOS = 1  # tiny_models.BOS_ID: the tiny tokenizer prepends it to plain encodes


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir(KIND))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def plain(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# File formats


def test_prompt_response_chat_and_plain(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat sees a red ball", "response": "It is 12 out of 300!"},
                                           {"prompt": "my friend reads", "response": "a long book today.",
                                            "extra": 1}])
    got = load_samples(f, tok)
    assert len(got) == 2 and all(isinstance(s, Sample) for s in got)
    assert got[0].prompt_ids == encode_prompt(tok, "the cat sees a red ball", True)
    assert tok.decode(got[0].prompt_ids).endswith("<|im_start|>assistant\n")  # a user turn, reply opened
    assert got[0].response_ids == plain(tok, "It is 12 out of 300!")
    assert got[1].response_ids == plain(tok, "a long book today.")
    flat = load_samples(f, tok, chat=False)
    assert flat[0].prompt_ids == [BOS] + plain(tok, "the cat sees a red ball")
    assert flat[0].response_ids == got[0].response_ids


def test_chat_without_template_falls_back_to_plain(tmp_path, tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the sun", "response": "moves slowly."}])
    assert load_samples(f, bare, chat=True)[0].prompt_ids == [BOS] + plain(tok, "the sun")


def test_gsm8k_question_answer(tmp_path, tok):
    q, a = "Tom has 3 apples and buys 4 more. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"
    f = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": q, "answer": a}])
    (s,) = load_samples(f, tok)
    assert s == Sample(encode_prompt(tok, q, True), plain(tok, a))


def test_text_lines_split_in_half(tmp_path, tok):
    text = "The old man paints the quiet house at night. It is 7 out of 120!"
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": "a"}])  # "a" is one token: no response
    body = plain(tok, text)
    (s,) = load_samples(f, tok, log=lambda m: None)
    cut = len(body) // 2
    assert s.prompt_ids == [BOS] + body[:cut] and s.response_ids == body[cut:]
    # max_tokens caps the whole sample (BOS included) before the split
    (s,) = load_samples(f, tok, max_tokens=11, log=lambda m: None)
    assert s.prompt_ids == [BOS] + body[:5] and s.response_ids == body[5:10]


def test_txt_chunks(tmp_path, tok):
    from tiny_models import corpus_text

    text = corpus_text(400, seed=3)
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    body = plain(tok, text)
    assert len(body) > 3 * 256  # several default-size chunks
    for size, samples in ((256, load_samples(f, tok)), (40, load_samples(f, tok, max_tokens=40))):
        assert all(s.prompt_ids[0] == BOS for s in samples)
        assert all(len(s.ids) == size for s in samples[:-1]) and len(samples[-1].ids) <= size
        for s in samples:
            assert len(s.response_ids) - (len(s.prompt_ids) - 1) in (0, 1)  # half / half of the body
        assert sum((s.prompt_ids[1:] + s.response_ids for s in samples), []) == body  # nothing lost or repeated
    assert len(load_samples(f, tok, max_tokens=40, max_samples=3)) == 3


def test_max_samples_and_max_tokens_on_pairs(tmp_path, tok):
    rows = [{"prompt": f"the cat counts {i} numbers", "response": "the final answer is here again today"}
            for i in range(5)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(load_samples(f, tok, max_samples=2)) == 2
    full = load_samples(f, tok, chat=False)[0]
    cap = len(full.prompt_ids) + 3
    short = load_samples(f, tok, chat=False, max_tokens=cap)[0]
    assert short.prompt_ids == full.prompt_ids and short.response_ids == full.response_ids[:3]
    with pytest.raises(CapreseError, match="no usable samples"):  # the prompt alone fills max_tokens
        load_samples(f, tok, chat=False, max_tokens=len(full.prompt_ids))


def test_blank_lines_and_skipped_samples_are_reported(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the sun", "response": "moves."}, "",
                                           {"prompt": "  ", "response": "x"}, {"prompt": "a dog", "response": ""}])
    logged = []
    got = load_samples(f, tok, log=logged.append)
    assert len(got) == 1
    assert len(logged) == 1 and "skipped 2" in logged[0] and "lines 3, 4" in logged[0] and str(f) in logged[0]


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the file (and the line)


def load_error(path, tok, **kw) -> str:
    with pytest.raises(CapreseError) as e:
        load_samples(path, tok, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_errors(tmp_path, tok):
    assert "does not exist" in load_error(tmp_path / "missing.jsonl", tok)
    assert "not a file" in load_error(tmp_path, tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in load_error(empty, tok)
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in load_error(tmp_path / "empty.txt", tok)
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    assert "has no samples" in load_error(blank, tok)
    (tmp_path / "ws.txt").write_text("\n\n   \n")
    assert "has no samples" in load_error(tmp_path / "ws.txt", tok)

    good = {"prompt": "the sun", "response": "moves."}
    bad_json = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"prompt": "the sun", "response": '])
    assert f"{bad_json}:3: invalid JSON" in load_error(bad_json, tok)
    text_as_jsonl = write_jsonl(tmp_path / "notes.jsonl", ["just some words"])
    assert ":1: invalid JSON" in load_error(text_as_jsonl, tok) and ".txt" in load_error(text_as_jsonl, tok)
    unknown = write_jsonl(tmp_path / "keys.jsonl", [good, {"input": "x", "output": "y"}])
    msg = load_error(unknown, tok)
    assert f"{unknown}:2: none of the known keys" in msg and '"input"' in msg
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "only a prompt"}])
    assert ":1: none of the known keys" in load_error(half, tok)
    arr = write_jsonl(tmp_path / "arr.jsonl", [["prompt", "response"]])
    assert ":1: expected a JSON object" in load_error(arr, tok)
    num = write_jsonl(tmp_path / "num.jsonl", [good, {"question": "1+1?", "answer": 2}])
    assert ':2: "answer" must be a string' in load_error(num, tok)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(good).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert ":2: not UTF-8" in load_error(latin, tok)
    skipped = write_jsonl(tmp_path / "skip.jsonl", [{"prompt": "", "response": "x"}, {"text": "a"}])
    msg = load_error(skipped, tok)
    assert "no usable samples" in msg and "all 2" in msg and "lines 1, 2" in msg


# ---------------------------------------------------------------------------------------------------------------
# Synthetic samples

N, RESPONSE, BATCH = 6, 10, 4


def fresh_model(folder: Path) -> TextModel:
    return TextModel.load(folder)


def chat_prompt(tm: TextModel, i: int, n: int = N) -> list[int]:
    return encode_prompt(tm.tokenizer, calibration_prompt(problems("train", n)[i]), True)


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir):
    """The tiny model with one extra stop id, a token it really generates mid-answer for some prompts and never
    for others, so that both kinds of response (cut at EOS / at the cap) show up. Also its unbatched runs."""
    tm = fresh_model(tiny_model_dir(KIND))
    free = [generate(tm.decoder, chat_prompt(tm, i), RESPONSE, Sampling(), eos_ids=()).tokens[0] for i in range(N)]
    stop = next(t for row in free for t in row[2:-2]
                if sum(t in r[:-1] for r in free) < N and t not in tm.eos_ids)
    tm.eos_ids = tuple(tm.eos_ids) + (stop,)
    return tm, free


class CountingGenerate:
    """Wraps generate() where data.py calls it: counts rows generated; can fail on a given call (a 'kill')."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.rows, self.fail_on_call = 0, 0, fail_on_call

    def __call__(self, model, prompts, *args, **kwargs):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.rows += len(prompts)
        return generate(model, prompts, *args, **kwargs)


def cache_file(folder: Path) -> Path:
    (f,) = Path(folder).glob("synthetic-*.jsonl")
    return f


def test_synthetic_equals_unbatched_generate(eos_model, tmp_path, capsys):
    tm, free = eos_model
    got = synthetic_samples(tm, N, tmp_path, response_tokens=RESPONSE, batch_size=BATCH, progress=True)
    assert "synthetic data: " in capsys.readouterr().err
    reasons = []
    for i, s in enumerate(got):
        ref = generate(tm.decoder, chat_prompt(tm, i), RESPONSE, Sampling(), eos_ids=tm.eos_ids)
        want = ref.tokens[0]
        if ref.stop_reason[0] == "eos":  # the stop token itself is part of the response
            want = want + [free[i][len(want)]]
            assert want[-1] in tm.eos_ids
        reasons.append(ref.stop_reason[0])
        assert s.prompt_ids == chat_prompt(tm, i)
        assert s.response_ids == want, i
    assert "eos" in reasons and "length" in reasons
    assert tm.tokenizer.decode(got[0].prompt_ids).count("Please reason step by step.") == 1
    d = describe(got)
    assert d["count"] == N and d["response_tokens_total"] == sum(len(s.response_ids) for s in got)
    assert d["prompt_tokens_mean"] == pytest.approx(sum(len(s.prompt_ids) for s in got) / N, abs=0.01)


def test_synthetic_resumes_after_kill(eos_model, tmp_path, monkeypatch):
    tm, _ = eos_model
    whole = synthetic_samples(tm, N, tmp_path / "a", RESPONSE, batch_size=2, progress=False)

    # killed during the third batch: two batches (4 samples) are on disk ...
    killed = CountingGenerate(fail_on_call=3)
    monkeypatch.setattr(data, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        synthetic_samples(tm, N, tmp_path / "b", RESPONSE, batch_size=2, progress=False)
    f = cache_file(tmp_path / "b")
    assert len(f.read_text().splitlines()) == 1 + 4
    # ... and a kill in the middle of writing left half of a fifth record
    bogus = data._record_line(f.name[len("synthetic-"):-len(".jsonl")], 4, [1, 2, 3], [4, 5, 6])
    with open(f, "ab") as fh:
        fh.write(bogus[:len(bogus) // 2])

    rerun = CountingGenerate()
    monkeypatch.setattr(data, "generate", rerun)
    got = synthetic_samples(tm, N, tmp_path / "b", RESPONSE, batch_size=2, progress=False)
    assert got == whole
    assert rerun.rows == 2  # only the missing samples were generated
    assert f.read_bytes() == cache_file(tmp_path / "a").read_bytes()  # the half line was overwritten


def test_untrusted_record_is_regenerated(eos_model, tmp_path, monkeypatch):
    tm, _ = eos_model
    whole = synthetic_samples(tm, N, tmp_path, RESPONSE, batch_size=BATCH, progress=False)
    f = cache_file(tmp_path)
    lines = f.read_text().splitlines(keepends=True)
    rec = json.loads(lines[1 + 3])
    rec["response_ids"] = rec["response_ids"][:-1]  # complete, valid JSON, but its checksum no longer matches
    lines[1 + 3] = json.dumps(rec) + "\n"
    f.write_text("".join(lines))
    counting = CountingGenerate()
    monkeypatch.setattr(data, "generate", counting)
    assert synthetic_samples(tm, N, tmp_path, RESPONSE, batch_size=BATCH, progress=False) == whole
    assert counting.rows == 3  # samples 3, 4, 5


def test_cache_hit_and_extension(eos_model, tmp_path, monkeypatch):
    tm, _ = eos_model
    whole = synthetic_samples(tm, N, tmp_path, RESPONSE, batch_size=BATCH, progress=False)
    monkeypatch.setattr(data, "generate", CountingGenerate(fail_on_call=1))  # any model call fails the test
    assert synthetic_samples(tm, N, tmp_path, RESPONSE, batch_size=BATCH) == whole
    assert synthetic_samples(tm, 3, tmp_path, RESPONSE, batch_size=1, progress=False) == whole[:3]
    assert synthetic_samples(tm, 0, tmp_path, RESPONSE) == []
    # more samples than cached: only the new ones are generated, the cached ones are reused as they are
    more = CountingGenerate()
    monkeypatch.setattr(data, "generate", more)
    bigger = synthetic_samples(tm, N + 2, tmp_path, RESPONSE, batch_size=BATCH, progress=False)
    assert bigger[:N] == whole and more.rows == 2 and len(bigger) == N + 2
    assert bigger[N].prompt_ids == chat_prompt(tm, N, N + 2)
    # other settings are another cache entry
    other = CountingGenerate()
    monkeypatch.setattr(data, "generate", other)
    synthetic_samples(tm, 2, tmp_path, RESPONSE - 1, batch_size=BATCH, progress=False)
    synthetic_samples(tm, 2, tmp_path, RESPONSE, seed=1, batch_size=BATCH, progress=False)
    assert other.rows == 4 and len(list(tmp_path.glob("synthetic-*.jsonl"))) == 3


def test_synthetic_refuses_a_non_dense_model(tiny_model_dir, tmp_path):
    tm = fresh_model(tiny_model_dir(KIND))
    apply_method(tm.decoder, "griffin", 0.5, "first-half", rank=0)
    with pytest.raises(CapreseError, match="dense model"):
        synthetic_samples(tm, 2, tmp_path, 4, progress=False)
    assert not list(tmp_path.iterdir())


def test_describe_empty():
    assert describe([]) == {"count": 0, "prompt_tokens_mean": 0.0, "prompt_tokens_max": 0,
                            "response_tokens_mean": 0.0, "response_tokens_total": 0, "tokens_total": 0}


def test_demo_says_what_the_synthetic_step_costs():
    """tools/demo.sh prints, before its calibrate step, what writing the synthetic samples cost when measured
    (per sample, and in all for the count it passes), instead of "a few minutes"."""
    import re

    demo = (Path(__file__).resolve().parents[1] / "tools" / "demo.sh").read_text()
    assert re.search(r"^SAMPLES=\d+$", demo, re.M)
    assert '--synthetic "$SAMPLES"' in demo and "a few minutes" not in demo
    cost = re.search(r'^SYNTHETIC_COST="(.+)"$', demo, re.M).group(1)
    assert re.search(r"\d s per sample on a .*AMD EPYC", cost) and re.search(r"\d+ minutes for \$SAMPLES", cost)
    assert demo.index(": $SYNTHETIC_COST;") < demo.index("$C calibrate")  # echoed before the step runs
