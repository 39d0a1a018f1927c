"""Arithmetic and word problems generated in code: the built-in calibration prompts and the built-in eval task.

Deterministic per (split, index): the "train" split feeds calibration, the "test" split feeds `caprese eval`.
Test problems are de-duplicated against the first 2,000 train problems (ten times the default calibration set;
a larger set would exclude almost every short "What is a + b?" from the test split). Calibration never sees a
gold answer, only the dense model's own replies, so an overlap beyond that would not leak answers.
"""

from __future__ import annotations

import dataclasses
import random

REASON_PREFIX = "Please reason step by step."
TRAIN_EXCLUDED = 2000

_NAMES = ["Tom", "Mia", "Ali", "Sara", "Ben", "Lena", "Omar", "Nina", "Ravi", "Emma", "Kai", "Zoe"]
_ITEMS = ["apples", "pencils", "marbles", "books", "cookies", "stickers", "coins", "cards", "shells", "eggs"]


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def _make(rng: random.Random) -> Problem:
    kind = rng.randrange(6)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    if kind == 0:
        return Problem(f"What is {a} + {b}?", a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return Problem(f"What is {a} - {b}?", a - b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return Problem(f"What is {a} times {b}?", a * b)
    if kind == 3:
        return Problem(f"{name} has {a} {item}. {other} gives {name} {b} more {item}. "
                       f"How many {item} does {name} have now?", a + b)
    if kind == 4:
        a, b = max(a, b), min(a, b)
        return Problem(f"{name} had {a} {item} and gave {b} of them to {other}. "
                       f"How many {item} does {name} have left?", a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} have?", a * b)


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """n problems of `split` ("train" or "test"); test problems never appear among the first 2,000 train ones."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    if split == "train":
        rng = random.Random(f"caprese-train-{seed}")
        return [_make(rng) for _ in range(n)]
    train = {p.question for p in problems("train", TRAIN_EXCLUDED, seed)}
    rng = random.Random(f"caprese-test-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        p = _make(rng)
        if p.question not in train and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def calibration_prompt(problem: Problem) -> str:
    """The paper prefixes every training sample with this instruction."""
    return f"{REASON_PREFIX} {problem.question}"


def eval_prompt(problem: Problem) -> str:
    return f"{problem.question} Give the final answer as a number at the end."
