"""Evaluation tasks: a name and a list of (prompt text, gold answer) pairs.

    load_task("arithmetic", 200)          # the built-in test split: disjoint from every calibration problem
    load_task("jsonl:gsm8k_test.jsonl")   # GSM8K lines {"question", "answer": "...#### 42"}
    load_task("jsonl:mine.jsonl", 50)     # or {"prompt", "answer"} lines, used as they are

A GSM8K-style `question` gets the same final-answer instruction as the built-in task appended; a `prompt`
is sent verbatim. The gold of a GSM8K answer is what follows `####`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from caprese.errors import CapreseError
from caprese.evaluation.answers import extract_answer, normalize

DEFAULT_LIMIT = 200
ANSWER_INSTRUCTION = "Give the final answer as a number at the end."
TASK_HELP = "arithmetic (built-in test problems) or jsonl:FILE (GSM8K {question, answer} or {prompt, answer} lines)"


@dataclasses.dataclass
class Task:
    name: str
    items: list[tuple[str, str]]  # (prompt text, gold answer)

    def __len__(self) -> int:
        return len(self.items)


def arithmetic_task(limit: int = DEFAULT_LIMIT) -> Task:
    from caprese.calibration.problems import eval_prompt, problems

    return Task("arithmetic", [(eval_prompt(p), str(p.answer)) for p in problems("test", limit)])


def _gold(answer) -> str | None:
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return normalize(repr(answer))
    if not isinstance(answer, str) or not answer.strip():
        return None
    if "####" in answer:
        return extract_answer(answer)
    return normalize(answer)


def jsonl_task(path: str | Path, limit: int | None = None) -> Task:
    """Read a JSON-lines file; blank lines are skipped, lines without a prompt/question and answer too."""
    path = Path(path)
    if not path.exists():
        raise CapreseError(f"task file {path} does not exist")
    if not path.is_file():
        raise CapreseError(f"task file {path} is not a file; give a JSON-lines file")
    items: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CapreseError(f"task file {path} is not UTF-8 text; give a JSON-lines file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CapreseError(f"{path}: bad JSON on line {n} ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise CapreseError(f"{path}: line {n} is not a JSON object; expected {{\"question\", \"answer\"}} "
                               "or {\"prompt\", \"answer\"}")
        gold = _gold(obj.get("answer"))
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            prompt = obj["prompt"]
        elif isinstance(obj.get("question"), str) and obj["question"].strip():
            prompt = f"{obj['question'].strip()} {ANSWER_INSTRUCTION}"
        else:
            continue
        if gold is None:
            continue
        items.append((prompt, gold))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise CapreseError(f"{path} has no usable items; each line needs \"question\" (GSM8K, gold after ####) "
                           "or \"prompt\", and a non-empty \"answer\"")
    return Task(f"jsonl:{path.name}", items)


def load_task(spec: str, limit: int | None = DEFAULT_LIMIT) -> Task:
    """`arithmetic` or `jsonl:FILE`; `limit` keeps the first N items (None: all of a file, 200 arithmetic)."""
    if limit is not None and limit < 1:
        raise CapreseError(f"--limit must be at least 1; got {limit}")
    spec = (spec or "").strip()
    if spec == "arithmetic":
        return arithmetic_task(DEFAULT_LIMIT if limit is None else limit)
    if spec.startswith("jsonl:"):
        file = spec[len("jsonl:"):]
        if not file:
            raise CapreseError("--task jsonl: needs a file, as in jsonl:gsm8k_test.jsonl")
        return jsonl_task(file, limit)
    raise CapreseError(f"unknown task {spec!r}; use {TASK_HELP}")
