"""Calibration data: (prompt ids, response ids) samples from a local file, or written by the dense model itself.

The split matters: GRIFFIN / CATS statistics come from the prompt tokens, the distillation loss from the
response tokens (the paper's "prompt" and "generation" phases).

    samples = load_samples("train.jsonl", tokenizer)                  # a user's file
    samples = synthetic_samples(text_model, 2000, cache_dir)          # the dense model's own answers, cached
    print(describe(samples))

File formats read by `load_samples` (any suffix but .txt is read as JSON Lines, one object per line):
  {"prompt": ..., "response": ...}   the prompt becomes a user turn of the chat template (chat=True and the
                                     tokenizer has one), the response is tokenized without special tokens
  {"question": ..., "answer": ...}   GSM8K's layout, read as prompt / response
  {"text": ...}                      the text's tokens split in half: first half prompt, second half response
  a plain .txt file                  tokenized, cut into chunks of 256 tokens (or max_tokens), each split in half

Why half / half for raw text *(an inference: the paper does not say)*: the paper only trains on question +
answer data and does not say how the prompt / generation split is simulated on a training sequence. Raw text
has no such boundary, and both sides are needed: the prompt tokens drive the method's prompt-time statistics
(GRIFFIN's neuron selection, CATS's per-prompt threshold) and the response tokens carry the distillation loss.
An even split gives the statistics as much context as the loss gets tokens; any fixed fraction would do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterator

from caprese.calibration.problems import PROBLEM_SET_VERSION, calibration_prompt, problems
from caprese.errors import CapreseError
from caprese.model.generation import generate
from caprese.model.tokenizer import encode_prompt


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.response_ids)


TEXT_CHUNK_TOKENS = 256  # chunk length for plain .txt files when max_tokens is not given
_KNOWN_KEYS = '"prompt"/"response", "question"/"answer" or "text"'


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Local files


def _tok(tokenizer, text: str, special: bool) -> list[int]:
    # verbose=False: a long text is fine here (it gets chunked), so no "sequence length is longer than" warning
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def _prefix_ids(tokenizer) -> list[int]:
    """What the tokenizer adds in front of a plain encode (BOS for Llama-style tokenizers, nothing for many)."""
    return _tok(tokenizer, "", True)


def _half_split(prefix: list[int], body: list[int]) -> Sample | None:
    """prefix + first half of body as prompt, the rest as response; None when either half would be empty."""
    cut = len(body) // 2
    if cut == 0:
        return None
    return Sample(prefix + body[:cut], body[cut:])


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise CapreseError(f"{path}:{n}: not UTF-8 text; save the file as UTF-8") from None
            yield n, line


def _jsonl_samples(path: Path, tokenizer, chat: bool, max_tokens: int | None,
                   skipped: list[int]) -> Iterator[Sample]:
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    prefix = None
    for n, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (plain text files must end in .txt)" if n == 1 else ""
            raise CapreseError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
        if not isinstance(obj, dict):
            raise CapreseError(f"{path}:{n}: expected a JSON object with {_KNOWN_KEYS}, "
                               f"got a JSON {type(obj).__name__}")
        if "prompt" in obj and "response" in obj:
            keys = ("prompt", "response")
        elif "question" in obj and "answer" in obj:
            keys = ("question", "answer")
        elif "text" in obj:
            keys = ("text",)
        else:
            found = ", ".join(f'"{k}"' for k in list(obj)[:6]) or "none"
            raise CapreseError(f"{path}:{n}: none of the known keys {_KNOWN_KEYS} (found: {found})")
        for k in keys:
            if not isinstance(obj[k], str):
                raise CapreseError(f'{path}:{n}: "{k}" must be a string, got {type(obj[k]).__name__}')
        if len(keys) == 1:
            if prefix is None:
                prefix = _prefix_ids(tokenizer)
            body = _tok(tokenizer, obj["text"], False)
            if max_tokens is not None:
                body = body[:max(0, max_tokens - len(prefix))]
            sample = _half_split(prefix, body)
        else:
            prompt, response = obj[keys[0]], obj[keys[1]]
            sample = None
            if prompt.strip() and response.strip():
                prompt_ids = encode_prompt(tokenizer, prompt, use_chat)
                response_ids = _tok(tokenizer, response, False)
                if max_tokens is not None:  # a prompt that alone fills max_tokens leaves no response: skipped
                    response_ids = response_ids[:max(0, max_tokens - len(prompt_ids))]
                if prompt_ids and response_ids:
                    sample = Sample(prompt_ids, response_ids)
        if sample is None:
            skipped.append(n)
        else:
            yield sample


def _text_samples(path: Path, tokenizer, max_tokens: int | None) -> Iterator[Sample]:
    size = max_tokens or TEXT_CHUNK_TOKENS
    text = "".join(line for _, line in _read_lines(path))
    if not text.strip():
        return
    prefix = _prefix_ids(tokenizer)
    if size - len(prefix) < 2:
        raise CapreseError(f"max_tokens={size} is too small to split {path} into prompt + response chunks")
    body = _tok(tokenizer, text, False)
    step = size - len(prefix)
    for start in range(0, len(body), step):
        sample = _half_split(prefix, body[start:start + step])
        if sample is not None:  # only a 1-token tail can fail
            yield sample


def load_samples(path: str | Path, tokenizer, chat: bool = True, max_samples: int | None = None,
                 max_tokens: int | None = None, log: Callable[[str], None] = _stderr) -> list[Sample]:
    """Samples from a local .jsonl (prompt/response, question/answer or text per line) or .txt file.

    max_samples: stop after that many usable samples. max_tokens: cap on a sample's total length (prompt +
    response; a response is truncated to fit, a sample whose prompt alone fills it is skipped) and the chunk
    length for .txt files (default 256). Lines whose prompt or response is empty are skipped with one summary
    line to `log`; all errors are CapreseError naming the file (and line).
    """
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise CapreseError(f"max_samples must be at least 1 (got {max_samples})")
    if max_tokens is not None and max_tokens < 2:
        raise CapreseError(f"max_tokens must be at least 2 (got {max_tokens})")
    if not path.exists():
        raise CapreseError(f"calibration data file {path} does not exist")
    if not path.is_file():
        raise CapreseError(f"{path} is not a file; give a .jsonl or .txt calibration data file")
    if path.stat().st_size == 0:
        raise CapreseError(f"calibration data file {path} is empty")
    skipped: list[int] = []
    if path.suffix.lower() == ".txt":
        source = _text_samples(path, tokenizer, max_tokens)
    else:
        source = _jsonl_samples(path, tokenizer, chat, max_tokens, skipped)
    samples: list[Sample] = []
    for sample in source:
        samples.append(sample)
        if max_samples is not None and len(samples) >= max_samples:
            break
    lines = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
    if not samples:
        if skipped:
            raise CapreseError(f"{path}: no usable samples: all {len(skipped)} had an empty prompt or response "
                               f"(or a prompt of max_tokens or more) (lines {lines})")
        raise CapreseError(f"calibration data file {path} has no samples (only blank lines or whitespace)")
    if skipped:
        log(f"caprese: skipped {len(skipped)} sample(s) of {path} with an empty prompt or response "
            f"(lines {lines})")
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data: the dense model answers the built-in training problems; cached on disk, resumable.

CACHE_FORMAT = "caprese-synthetic"
CACHE_VERSION = 1  # bump when the prompt construction or the record layout changes: old caches stop matching
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")


def _tokenizer_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = model_dir / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _check(key: str, i: int, prompt_ids: list[int], response_ids: list[int]) -> str:
    blob = json.dumps([key, i, prompt_ids, response_ids], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _record_line(key: str, i: int, prompt_ids: list[int], response_ids: list[int]) -> bytes:
    rec = {"i": i, "prompt_ids": prompt_ids, "response_ids": response_ids,
           "check": _check(key, i, prompt_ids, response_ids)}
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


def _header_line(key: str, settings: dict) -> bytes:
    return (json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "settings": settings},
                       sort_keys=True) + "\n").encode()


def _parse_cache(data: bytes, key: str) -> tuple[list[Sample], list[int]]:
    """The trusted records of a cache file's bytes, and ends[k] = the byte offset where the first k records end
    (ends[0]: end of the header); ends == [] when the header is missing or belongs to other settings.

    A record is trusted only if its line is complete (ends in a newline), parses, carries the next index and
    its checksum matches; reading stops at the first line that is not, so a line cut by a kill (or garbage
    after a crash) and everything after it is ignored, and later overwritten.
    """
    records: list[Sample] = []
    nl = data.find(b"\n")
    if nl < 0:
        return records, []
    try:
        header = json.loads(data[:nl])
        ok = header.get("format") == CACHE_FORMAT and header.get("version") == CACHE_VERSION \
            and header.get("key") == key
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        return records, []
    ends = [nl + 1]
    while (nl := data.find(b"\n", ends[-1])) >= 0:
        try:
            rec = json.loads(data[ends[-1]:nl])
            i, p, r = rec["i"], rec["prompt_ids"], rec["response_ids"]
            if i != len(records) or rec["check"] != _check(key, i, p, r):
                break
        except (ValueError, KeyError, TypeError):
            break
        records.append(Sample(p, r))
        ends.append(nl + 1)
    return records, ends


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer per cache is the rule
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def through_first_stop(tokens, stops) -> list[int]:
    """`tokens` up to and including the first of the `stops` ids (all of them when none occurs): a calibration
    reply keeps its stop token, which generate() drops."""
    cut = next((j for j, t in enumerate(tokens) if t in stops), None)
    return [int(t) for t in (tokens if cut is None else tokens[:cut + 1])]


def synthetic_samples(text_model, n: int, cache_dir: str | Path, response_tokens: int = 64, batch_size: int = 16,
                      seed: int = 0, progress: bool = True, threads: int | None = None) -> list[Sample]:
    """n samples: problems("train", n, seed) as prompts (calibration_prompt: "Please reason step by step. ...";
    chat-wrapped where the tokenizer has a chat template), each answered greedily by the DENSE `text_model`;
    response = the generated tokens up to and including EOS when one is produced, at most `response_tokens`.

    Cached in `cache_dir/synthetic-<key>.jsonl`, the key hashing everything that decides the tokens but not n
    (model fingerprint, tokenizer files, stop ids, weight dtype, response_tokens, seed, chat, problem set version).
    Records are appended batch by batch (flushed and fsynced), so an interrupted run resumes after its last finished
    batch, and a call for n' <= the cached count returns without running the model. Problem i is the same for every n,
    so one cache serves all sizes. `threads`: CPU intra-op threads, by default one per free CPU
    (caprese.cpu_threads).
    """
    from caprese.calibration.artifact import fingerprint
    from caprese.calibration.methods import efficient_layers
    from caprese.model.sampling import Sampling

    for name, value, least in (("n", n, 0), ("response_tokens", response_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CapreseError(f"synthetic_samples: {name} must be an integer >= {least}; got {value!r}")
    if efficient_layers(text_model.decoder):
        raise CapreseError("synthetic calibration data must come from the dense model; load it without a method")
    if n == 0:
        return []
    tokenizer, model_dir = text_model.tokenizer, Path(text_model.model_dir)
    chat = bool(getattr(tokenizer, "chat_template", None))
    eos_ids = tuple(int(e) for e in text_model.eos_ids)
    settings = {"fingerprint": fingerprint(model_dir), "tokenizer": _tokenizer_hash(model_dir),
                "eos_ids": list(eos_ids), "dtype": str(text_model.decoder.model.embed_tokens.weight.dtype),
                "response_tokens": response_tokens, "seed": seed, "chat": chat, "problems": PROBLEM_SET_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"synthetic-{key}.jsonl"
    probs = problems("train", n, seed)
    prompt_cache: dict[int, list[int]] = {}

    def prompt_ids(i: int) -> list[int]:
        if i not in prompt_cache:
            prompt_cache[i] = encode_prompt(tokenizer, calibration_prompt(probs[i]), chat)
        return prompt_cache[i]

    # Fast path, no lock: enough trusted records, and the first and last still match the prompts we would build.
    if path.is_file():
        records, _ = _parse_cache(path.read_bytes(), key)
        if len(records) >= n and all(records[i].prompt_ids == prompt_ids(i) for i in (0, n - 1)):
            return records[:n]

    cache_dir.mkdir(parents=True, exist_ok=True)
    limit = text_model.decoder.spec.max_position_embeddings
    with open(path, "a+b") as f:
        _lock(f)  # another process filling the same cache: wait for it, then take over from what it wrote
        f.seek(0)
        records, ends = _parse_cache(f.read(), key)
        # every kept record must answer the prompt we would build now (the key covers what decides them; this
        # also catches a changed problems() generator without a version bump)
        have = next((i for i, s in enumerate(records[:n]) if s.prompt_ids != prompt_ids(i)), min(len(records), n))
        if not ends:  # no file, a cut header, or another format: start over
            f.truncate(0)
            f.write(_header_line(key, settings))
        elif have < n:
            records = records[:have]
            f.truncate(ends[have])  # drop a partial or untrusted tail before appending
        f.flush()
        os.fsync(f.fileno())
        if have >= n:
            return records[:n]

        from tqdm import tqdm

        bar = tqdm(total=n, initial=have, desc="synthetic data", file=sys.stderr, disable=not progress,
                   bar_format="{desc}: {n_fmt}/{total_fmt} samples |{bar}| [{elapsed}<{remaining}]")
        try:
            for start in range(have, n, batch_size):
                idx = range(start, min(n, start + batch_size))
                batch = [prompt_ids(i) for i in idx]
                longest = max(map(len, batch))
                if longest + response_tokens > limit:
                    raise CapreseError(f"a calibration prompt ({longest} tokens) + response_tokens "
                                       f"({response_tokens}) exceeds the model's context of {limit}")
                # No stop ids here: generate() drops the stop token and does not say which one it was, so run
                # to the cap and cut at the first stop id ourselves (greedy, so the tokens are the same).
                out = generate(text_model.decoder, batch, response_tokens, Sampling(), eos_ids=(), threads=threads)
                lines = []
                for i, p, toks in zip(idx, batch, out.tokens):
                    resp = through_first_stop(toks, eos_ids)
                    lines.append(_record_line(key, i, p, resp))
                    records.append(Sample(p, resp))
                f.write(b"".join(lines))  # whole lines only; a kill mid-write leaves a tail the reader ignores
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(idx))
        finally:
            bar.close()
    return records[:n]


def describe(samples: list[Sample]) -> dict:
    """Counts for a log line / JSON report: how many samples, how long their prompts, how many loss tokens."""
    p = [len(s.prompt_ids) for s in samples]
    r = [len(s.response_ids) for s in samples]
    return {"count": len(samples),
            "prompt_tokens_mean": round(statistics.fmean(p), 2) if p else 0.0,
            "prompt_tokens_max": max(p, default=0),
            "response_tokens_mean": round(statistics.fmean(r), 2) if r else 0.0,
            "response_tokens_total": sum(r),
            "tokens_total": sum(p) + sum(r)}
