"""The built-in problems: the eval (test) and calibration (train) splits never share a question, nor even the
arithmetic behind one, for any seed and count; checked by re-deriving each problem's arithmetic from its text."""

from __future__ import annotations

import re
import time

import pytest

from caprese.calibration.problems import core_split, problems

SEEDS = (0, 1, 2, 7, 12345)
COUNTS = (200, 2000, 20_000)  # 20,000: the paper's calibration scale


def _core(question: str) -> tuple[str, int, int]:
    """The arithmetic of a question, read from its text (independent of the generator's own bookkeeping)."""
    a, b = (int(x) for x in re.findall(r"\d+", question))
    if " + " in question or "more" in question:
        return "+", min(a, b), max(a, b)
    if " - " in question or "gave" in question:
        return "-", a, b
    assert "times" in question or "bags" in question, question
    return "x", min(a, b), max(a, b)


def _answer(core: tuple[str, int, int]) -> int:
    op, a, b = core
    return a + b if op == "+" else a - b if op == "-" else a * b


@pytest.fixture(scope="module")
def eval_sets():
    """The eval set `caprese eval` uses (seed 0), large, and the test split of other seeds."""
    return {seed: problems("test", 2000, seed) for seed in SEEDS}


def test_eval_and_calibration_problems_are_disjoint_for_any_seed_and_count(eval_sets):
    t0 = time.perf_counter()
    test_questions = {p.question for ps in eval_sets.values() for p in ps}
    test_cores = {_core(p.question) for ps in eval_sets.values() for p in ps}
    for seed in SEEDS:
        for n in COUNTS:
            train = problems("train", n, seed)
            assert len(train) == n
            shared = test_questions & {p.question for p in train}
            assert not shared, (seed, n, len(shared), sorted(shared)[:3])
            # stronger: no calibration prompt does the arithmetic of an eval question under another name/template
            assert not test_cores & {_core(p.question) for p in train}, (seed, n)
    print(f"\n{len(SEEDS) * len(COUNTS)} train sets up to {max(COUNTS)} problems checked in "
          f"{time.perf_counter() - t0:.2f} s")


def test_each_problem_sits_in_the_split_that_owns_its_arithmetic(eval_sets):
    for split, ps in (("test", eval_sets[0]), ("train", problems("train", 2000, 3))):
        for p in ps:
            core = _core(p.question)
            assert core_split(*core) == split, p
            assert p.answer == _answer(core), p
    assert len({p.question for p in eval_sets[0]}) == 2000  # an eval set never asks the same question twice


def test_problem_i_does_not_depend_on_the_count():
    for split in ("train", "test"):
        assert problems(split, 50, 4) == problems(split, 500, 4)[:50]
    assert problems("test", 20, 0) != problems("test", 20, 1)
    with pytest.raises(ValueError):
        problems("valid", 3)
