"""Arithmetic and word problems generated in code: the built-in calibration prompts and the built-in eval task.

Deterministic per (split, seed, index): the "train" split feeds calibration, the "test" split feeds `caprese eval`.
The two are disjoint by construction, for any seed and any count: every problem reduces to its arithmetic core
(operation and operands, order-free for + and x), and a fixed hash of the core puts it in exactly one split, so a
test question's sum, difference or product never appears in a calibration prompt under any template or name.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

REASON_PREFIX = "Please reason step by step."
TEST_SHARE = 4  # one arithmetic core in TEST_SHARE belongs to the test split, the rest to train
# Bump when the generator or the partition changes: synthetic-data caches key on it.
PROBLEM_SET_VERSION = 2
# The reply budget `caprese eval`, evaluate() and tools/calibration_table.py (the README's accuracy tables) share.
# Here, in a module without torch, so the CLI can show it as its default without importing the evaluation stack.
EVAL_MAX_NEW_TOKENS = 128

_NAMES = ["Tom", "Mia", "Ali", "Sara", "Ben", "Lena", "Omar", "Nina", "Ravi", "Emma", "Kai", "Zoe"]
_ITEMS = ["apples", "pencils", "marbles", "books", "cookies", "stickers", "coins", "cards", "shells", "eggs"]


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def core_split(op: str, a: int, b: int) -> str:
    """The split ("train" or "test") that owns the arithmetic core `a op b`; op is "+", "-" or "x"."""
    if op in "+x":
        a, b = min(a, b), max(a, b)
    return "test" if zlib.crc32(f"{op} {a} {b}".encode()) % TEST_SHARE == 0 else "train"


def _make(rng: random.Random) -> tuple[Problem, tuple[str, int, int]]:
    kind = rng.randrange(6)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    if kind == 0:
        return Problem(f"What is {a} + {b}?", a + b), ("+", a, b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return Problem(f"What is {a} - {b}?", a - b), ("-", a, b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return Problem(f"What is {a} times {b}?", a * b), ("x", a, b)
    if kind == 3:
        return Problem(f"{name} has {a} {item}. {other} gives {name} {b} more {item}. "
                       f"How many {item} does {name} have now?", a + b), ("+", a, b)
    if kind == 4:
        a, b = max(a, b), min(a, b)
        return Problem(f"{name} had {a} {item} and gave {b} of them to {other}. "
                       f"How many {item} does {name} have left?", a - b), ("-", a, b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (Problem(f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} have?", a * b),
            ("x", a, b))


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first n problems of `split` ("train" or "test") for `seed`; problem i is the same for every n.

    Both splits draw from one generator and keep only the problems whose core they own (core_split); the test
    split also drops repeated questions, so an eval set never scores one question twice.
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    rng = random.Random(f"caprese-{split}-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    draws = 0
    while len(out) < n:
        draws += 1
        if draws > 100 * n + 10_000:  # the test space holds ~10^5 distinct questions; far more is a caller's bug
            raise ValueError(f"cannot draw {n} distinct {split} problems")
        p, core = _make(rng)
        if core_split(*core) != split:
            continue
        if split == "test":
            if p.question in seen:
                continue
            seen.add(p.question)
        out.append(p)
    return out


def calibration_prompt(problem: Problem) -> str:
    """The paper prefixes every training sample with this instruction."""
    return f"{REASON_PREFIX} {problem.question}"


def eval_prompt(problem: Problem) -> str:
    return f"{problem.question} Give the final answer as a number at the end."
