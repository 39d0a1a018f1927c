"""Pull the final answer out of a model's reply and compare it with the gold answer.

    extract_answer("... so she has 12 + 30 = 42 apples.")   -> "42"
    extract_answer("The answer is \\boxed{1,234}")            -> "1234"
    extract_answer("work...\\n#### -7")                       -> "-7"
    is_correct("42.0", "42")                                  -> True

Order of preference: the GSM8K `#### X` marker (the last one), then the last `\\boxed{...}`, then the last
number anywhere in the text. Numbers are normalised: thousands commas, `$`, `%`, a trailing period and
an all-zero decimal part (`.0`, `.00`) are dropped; signs and real decimals are kept.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number that starts at a number boundary: "1,234" (proper thousands groups), "1234", "3.5", "-7".
# A minus sign counts only when it does not follow a word character or a closing bracket ("12-5" -> 5).
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?<![\d.,])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
_MARKER = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\s*\{")
_NUMERIC = re.compile(r"^-?(?:\d+(?:\.\d+)?|\.\d+)$")
_FRACTION = re.compile(r"^(-?)\\d?frac\{(-?\d+)\}\{(-?\d+)\}$")


def normalize(answer: str) -> str:
    """Canonical text of an answer: `$1,234.00` -> `1234`, ` -3.50. ` -> `-3.50`, `42%` -> `42`."""
    s = answer.strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").strip()
    s = s.rstrip(".").strip()
    s = s.rstrip("%").strip()
    if s.startswith("+"):
        s = s[1:]
    t = s.replace(",", "")
    if _NUMERIC.match(t):
        if "." in t and set(t.split(".", 1)[1]) == {"0"}:
            t = t.split(".", 1)[0]
        if t in ("-0",):
            t = "0"
        return t
    return s


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize(found[-1]) if found else None


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None when there is none (or it never closes)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1]
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer in `text` as a normalised string, or None when it holds no answer at all."""
    if not text:
        return None
    markers = list(_MARKER.finditer(text))
    if markers:
        tail = text[markers[-1].end():]
        line = tail.strip().splitlines()[0] if tail.strip() else ""
        num = _NUMBER.search(line.replace("$", ""))
        if num:
            return normalize(num.group(0))
    boxed = _last_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}", r"\1", boxed).strip()
        value = normalize(inner)
        if _NUMERIC.match(value):
            return value
        frac = _FRACTION.match(value.replace(" ", ""))
        if frac:  # \frac{1}{2} -> "1/2", compared as a fraction
            return f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
        numbers = _NUMBER.findall(inner)
        if len(numbers) == 1:  # "18 apples", "x = 18"
            return normalize(numbers[0])
        if value:
            return value
    return _last_number(text)


def _as_number(s: str) -> Fraction | None:
    t = normalize(s).replace(",", "")
    if not (_NUMERIC.match(t) or re.fullmatch(r"-?\d+/-?\d+", t)):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(pred: str | None, gold: str | int | float | None) -> bool:
    """True when `pred` equals `gold`: numerically when both are numbers (42 == 42.0 == "42"), else as text."""
    if pred is None or gold is None:
        return False
    p, g = str(pred), str(gold)
    np_, ng = _as_number(p), _as_number(g)
    if np_ is not None and ng is not None:
        return np_ == ng
    return normalize(p).casefold() == normalize(g).casefold()
