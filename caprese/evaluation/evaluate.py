"""Score a TextModel on a Task: greedy, batched generation, the final answer pulled out of each reply.

    from caprese.calibration.source import open_source
    from caprese.evaluation import evaluate, load_task
    tm = open_source("runs/griffin-r64")               # a calibration artifact or a plain HF folder
    res = evaluate(tm, load_task("arithmetic", 60))
    print(res.accuracy, res.mean_generated_tokens, res.wall_s)

Prompts are grouped into batches of similar length (fewer pad slots) and left-padded; the decoder masks the
pads and GRIFFIN / CATS ignore them (the FFN context's `valid` mask), so a reply does not depend on which
batch its prompt landed in. Records come back in the task's order.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from caprese.calibration.problems import EVAL_MAX_NEW_TOKENS
from caprese.errors import CapreseError
from caprese.evaluation.answers import extract_answer, is_correct
from caprese.evaluation.tasks import Task
from caprese.model.generation import generate
from caprese.model.sampling import Sampling


@dataclasses.dataclass
class ItemRecord:
    prompt: str
    gold: str
    prediction: str | None  # extract_answer(text); None when the reply holds no answer
    text: str  # the decoded reply (special tokens skipped)
    tokens: int  # generated tokens, the stop token excluded
    correct: bool
    stop_reason: str  # "eos" | "length"
    token_ids: list[int] = dataclasses.field(default_factory=list, repr=False)  # the generated ids themselves

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EvalResult:
    label: str  # the TextModel's label: "dense", "griffin(d=0.5, first-half)", "caprese(...)"
    task: str
    correct: int
    total: int
    mean_generated_tokens: float
    extra_params_pct: float
    wall_s: float
    records: list[ItemRecord]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self, records: bool = False) -> dict:
        out = {"label": self.label, "task": self.task, "accuracy": self.accuracy, "correct": self.correct,
               "total": self.total, "mean_generated_tokens": self.mean_generated_tokens,
               "extra_params_pct": self.extra_params_pct, "wall_s": self.wall_s}
        if records:
            out["records"] = [r.to_dict() for r in self.records]
        return out


def extra_parameter_share(text_model) -> float:
    """Extra parameters of the low-rank bypasses (Σ numel(L) + numel(R) over efficient layers) as a percentage
    of the base model's parameters (a tied embedding / LM head counted once). 0 for dense or plain GRIFFIN."""
    from caprese.calibration.methods import efficient_layers

    decoder = text_model.decoder if hasattr(text_model, "decoder") else text_model
    extra = sum(f.bypass.L.numel() + f.bypass.R.numel() for f in efficient_layers(decoder).values()
                if f.bypass is not None)
    total = sum(p.numel() for p in decoder.parameters())  # parameters() de-duplicates tied weights
    base = total - extra
    return 100.0 * extra / base if base else 0.0


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Item indices grouped by prompt length (stable), batch_size at a time."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate(text_model, task: Task, max_new_tokens: int = EVAL_MAX_NEW_TOKENS, batch_size: int = 8, chat: bool = True,
             progress: bool = True, reselect_every: int = 0, threads: int | None = None) -> EvalResult:
    """Greedy replies to every prompt of `task`, scored against its golds. See the module docstring.

    `threads`: CPU intra-op threads; by default one per free CPU, re-read as the load changes (caprese.cpu_threads).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task (load_task('arithmetic', 200)); got {type(task).__name__}")
    if max_new_tokens < 1:
        raise CapreseError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if batch_size < 1:
        raise CapreseError(f"batch_size must be at least 1; got {batch_size}")
    if reselect_every < 0:
        raise CapreseError(f"reselect_every must be >= 0; got {reselect_every}")
    if not task.items:
        raise CapreseError(f"task {task.name} has no items")
    t0 = time.perf_counter()
    ids = [text_model.encode(prompt, chat=chat) for prompt, _ in task.items]
    limit = text_model.decoder.spec.max_position_embeddings
    longest = max(len(x) for x in ids)
    if longest + max_new_tokens > limit:
        raise CapreseError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"model's context of {limit}; ask for fewer new tokens or use shorter prompts")
    replies: list[tuple[list[int], str] | None] = [None] * len(ids)
    bar = None
    if progress:
        from tqdm import tqdm

        # one tick per problem, as soon as its reply ends inside the batch, so the rate and ETA move steadily
        bar = tqdm(total=len(ids), desc=f"eval {text_model.label}", unit="problem", file=sys.stderr, leave=False,
                   bar_format="{desc}: {n_fmt}/{total_fmt} problems |{bar}| [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for group in _batches([len(x) for x in ids], batch_size):
            res = generate(text_model.decoder, [ids[i] for i in group], max_new_tokens, Sampling(),
                           text_model.eos_ids, None, reselect_every, threads,
                           on_row_done=None if bar is None else (lambda i: bar.update(1)))
            for i, toks, reason in zip(group, res.tokens, res.stop_reason):
                replies[i] = (toks, reason)
    finally:
        if bar is not None:
            bar.close()
    records = [score_reply(prompt, gold, text_model.tokenizer.decode(toks, skip_special_tokens=True), toks, reason)
               for (prompt, gold), (toks, reason) in zip(task.items, replies)]
    return result_of(text_model.label, task, records, extra_parameter_share(text_model), time.perf_counter() - t0)


def score_reply(prompt: str, gold: str, text: str, tokens: list[int], stop_reason: str) -> ItemRecord:
    """One problem's record: the answer pulled out of the decoded reply, compared with the gold."""
    pred = extract_answer(text)
    return ItemRecord(prompt, gold, pred, text, len(tokens), is_correct(pred, gold), stop_reason, list(tokens))


def result_of(label: str, task: Task, records: list[ItemRecord], extra_params_pct: float, wall_s: float) -> EvalResult:
    correct = sum(r.correct for r in records)
    mean_tokens = sum(r.tokens for r in records) / len(records)
    return EvalResult(label, task.name, correct, len(records), mean_tokens, extra_params_pct, wall_s, records)
