"""End-to-end distillation of the Caprese bypasses (paper §3): all (L_i, R_i) jointly, base weights frozen,

    min  MSE( teacher final hidden state , student final hidden state )   on RESPONSE tokens     (loss "mse")
    min  mean_t KL( softmax(head(teacher_t)) || softmax(head(student_t)) )  on RESPONSE tokens     (loss "kl")

where "final hidden state" is after the final norm, before the LM head (Decoder.hidden_states). "mse" is the
paper's; "kl" (E2EConfig.loss) weighs the hidden-state error by what the LM head makes of it: on int4 RTN +
bypass (SmolLM2-135M) it scored 20.4% against MSE's 19.7%, a gain within noise (docs/quantization.md). The
metrics report the final-hidden MSE either way (`mse_*`), and with "kl" the KL too (`kl_*`, nats per token).
Responses (E2EConfig.responses): "dense" trains on the calibration samples as given (for synthetic data, the
dense model's own replies: the paper's); "student" first re-answers every sample's prompt with the student as the
layer-wise stage left it (greedy, at most as long as the longest given response, cut after the model's first stop
id) and trains on those: on-policy distillation (GKD's λ = 1 with one fixed set of replies), the teacher scoring the
student's own prefixes, so the errors that send a quantized student's replies astray are the ones it learns from;
"on-policy" re-answers the prompts before every epoch with the student as it then stands (the replies follow the
student as it learns; each epoch's replies are written to WORK/e2e so a resumed run reads them back).
On int4 RTN + bypass (SmolLM2-135M, KL) it scored 22.1% against 20.4% on the dense replies with one calibration
seed, 18.7% against 18.4% with another: ahead both times, by less than the seeds differ (docs/quantization.md).
Per sample:
  teacher  = the same decoder in phase "prefill" over prompt + response (every FFN dense, no bypass), no grad;
             kept in memory for later epochs while it fits `teacher_cache_bytes`, recomputed otherwise;
  student  = phase "prefill" over the prompt from slot 0 (no grad: dense, sets the GRIFFIN selection / CATS τ from
             the prompt and fills the prompt's KV slots), then the whole response as ONE chunk at start = len(prompt)
             in phase "decode" (FF̂ + x·L·R on every approximated layer), with grad.
The response's K/V are written into the static cache in place, so autograd runs through the cache writes
(CopySlices); before every sample the cache tensors are detached so no graph outlives its sample.

Batches: `batch_size` sequences per Adam step; their gradients are accumulated sample by sample in float32
(`batch_gradients`: a bf16 model's per-sample gradients are bf16, and summing 16 of them in bf16 would round
away the small ones), the loss scaled by the batch's response-token count, so the step minimises the token-mean
MSE of the batch. Under torchrun each rank runs every world_size-th sequence of each batch and the gradients are
all-reduced (summed) before the step: plain data parallelism, identical adapters on every rank. The optimiser
steps fp32 master copies of L, R, which are copied back into the model's own (bf16 in a bf16 model).

Quantized student (`student`, quantized_student.StudentWeights): the whole stage runs with the quantized weights
in place (forward AND backward: autograd saved them), and only the teacher pass swaps the originals in, so the
teacher is the unquantized dense model and the student the quantized one, prompt prefill included.

Resumable per epoch: WORK/e2e/checkpoint.pt (masters, optimiser, schedule step, losses; temp + rename) is written
after each epoch; a rerun with the same key continues after the last finished epoch, reshuffling each epoch
with a generator seeded by (seed, epoch), so the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from caprese.atomic_output import atomic_file
from caprese.calibration.distributed import all_reduce_sum, barrier, world
from caprese.calibration.fingerprint import adapters_digest, digest
from caprese.calibration.layerwise import ensure_caches
from caprese.calibration.methods import apply_method, efficient_layers
from caprese.calibration.progress import Callback, bar
from caprese.calibration.recipe import CalibrationOptions, CalibrationPlan
from caprese.calibration.schedule import linear_schedule
from caprese.errors import CapreseError


@dataclasses.dataclass
class E2EResult:
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]
    metrics: dict
    timing: dict


def detach_caches(decoder) -> None:
    """Cut the KV buffers loose from the previous sample's autograd graph (values are overwritten anyway)."""
    for layer in decoder.layers:
        c = layer.self_attn.cache
        if c is not None and (c.k.requires_grad or c.v.requires_grad):
            c.k, c.v = c.k.detach(), c.v.detach()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision activations (the loss is summed in at least fp32), as is otherwise."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Distiller:
    """Teacher / student passes over one decoder whose target layers carry an EfficientFFN with a bypass."""

    def __init__(self, decoder, samples, teacher_cache_bytes: int = 1 << 30, student=None, loss: str = "mse"):
        self.decoder, self.samples, self.student_weights, self.loss = decoder, samples, student, loss
        self.device = decoder.model.embed_tokens.weight.device
        self.dim = decoder.spec.hidden_size
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_left = teacher_cache_bytes
        ensure_caches(decoder, samples)

    def teacher(self, j: int) -> torch.Tensor:
        """[T_resp, D] (fp32 or wider): the dense model's final hidden states on sample j's response tokens."""
        if j in self.cache:
            return self.cache[j]
        s = self.samples[j]
        detach_caches(self.decoder)
        sw = self.student_weights
        with torch.no_grad(), sw.teacher() if sw is not None else contextlib.nullcontext():
            ids = torch.tensor([s.ids], device=self.device)
            h = _wide(self.decoder.hidden_states(ids, 0, phase="prefill")[0, len(s.prompt_ids):])
        size = h.numel() * h.element_size()
        if size <= self.cache_left:
            self.cache[j] = h
            self.cache_left -= size
        return h

    def student(self, j: int) -> torch.Tensor:
        """[T_resp, D]: prompt prefilled (dense, no grad), then the response as one decode chunk (grad flows)."""
        s = self.samples[j]
        detach_caches(self.decoder)
        p = len(s.prompt_ids)
        with torch.no_grad():
            self.decoder.hidden_states(torch.tensor([list(s.prompt_ids)], device=self.device), 0, phase="prefill")
        resp = torch.tensor([list(s.response_ids)], device=self.device)
        return self.decoder.hidden_states(resp, p, phase="decode")[0]

    def sse(self, j: int) -> torch.Tensor:
        """Sum of squared errors over sample j's response tokens and features (teacher first: it re-observes)."""
        t = self.teacher(j)
        return (_wide(self.student(j)) - t).square().sum()

    def kl_sum(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Σ over tokens of KL(p_teacher || p_student), p = softmax of the LM head's (soft-capped) logits, in fp32."""
        lt = torch.log_softmax(self.decoder.logits(teacher.to(student.dtype)).float(), dim=-1)
        ls = torch.log_softmax(self.decoder.logits(student).float(), dim=-1)
        return (lt.exp() * (lt - ls)).sum()

    def objective(self, j: int) -> torch.Tensor:
        """Sample j's training loss summed over its response tokens (and features, for "mse"); see `denominator`."""
        if self.loss == "mse":
            return self.sse(j)
        t = self.teacher(j)
        return self.kl_sum(t, self.student(j))

    def denominator(self, indices) -> float:
        """What a batch's summed objective is divided by: its token-feature count ("mse"), its token count ("kl")."""
        tokens = sum(len(self.samples[j].response_ids) for j in indices)
        return float(tokens * (self.dim if self.loss == "mse" else 1))

    @torch.no_grad()
    def errors(self, indices: list[int] | None = None) -> dict[str, float]:
        """{"mse": token- and feature-mean squared error of the final hidden states, and with loss "kl" "kl": the
        token-mean KL in nats}, over the samples (sharded over ranks, summed); one student pass per sample."""
        me, ws = world()
        idx = list(range(len(self.samples))) if indices is None else indices
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        for j in idx[me::ws]:
            t = self.teacher(j)
            s = self.student(j)
            acc[0] += (_wide(s) - t).square().sum().double()
            if self.loss == "kl":
                acc[1] += self.kl_sum(t, s).double()
            acc[2] += len(self.samples[j].response_ids)
        detach_caches(self.decoder)
        all_reduce_sum(acc)
        n = acc[2].clamp_min(1)
        out = {"mse": float(acc[0] / (n * self.dim))}
        if self.loss == "kl":
            out["kl"] = float(acc[1] / n)
        return out

    def mse(self, indices: list[int] | None = None) -> float:
        """Token- and feature-mean squared error over the samples (sharded over ranks, summed)."""
        return self.errors(indices)["mse"]


def _bypasses(decoder):
    return [(i, f.bypass) for i, f in sorted(efficient_layers(decoder).items()) if f.bypass is not None]


def _without_bypass(dist: Distiller) -> dict[str, float]:
    ffns = efficient_layers(dist.decoder)
    saved = {i: f.bypass for i, f in ffns.items()}
    try:
        for f in ffns.values():
            f.bypass = None
        return dist.errors()
    finally:
        for i, f in ffns.items():
            f.bypass = saved[i]


def batch_gradients(dist: Distiller, params: list[torch.Tensor], indices, denom: float
                    ) -> tuple[list[torch.Tensor], float]:
    """(Σ_j ∇ objective_j / denom for each of `params`, as float32 tensors; Σ_j objective_j / denom) over samples
    `indices` (objective: the summed squared error, or the summed KL with loss "kl").

    Each sample's backward fills p.grad in the parameter's dtype; it is added into a float32 buffer and cleared
    before the next sample, so the batch's sum is float32 whatever the model's dtype (for fp32 parameters the
    same sums in the same order as accumulating in p.grad)."""
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    total = 0.0
    for j in indices:
        loss = dist.objective(j) / denom
        loss.backward()
        total += float(loss.detach())
        for a, p in zip(acc, params):
            if p.grad is not None:
                a.add_(p.grad)
                p.grad = None
    detach_caches(dist.decoder)
    return acc, total


def student_responses(decoder, samples, path: Path, key: str, progress: bool, batch_size: int = 16) -> list:
    """The samples with their responses replaced by the student's greedy replies to the same prompts (the decoder
    as it is: quantized weights, method and bypasses in place), each at most as long as the longest given response
    and cut after the first of the model's stop ids (generation_config.json's EOS; none: the full length).

    Rank 0 generates and writes them to `path` (temp + rename); every rank, and a resumed run, reads that file
    back, so all ranks and all epochs see the same replies. A file of another key or sample count is replaced."""
    from caprese.calibration.data import Sample, through_first_stop
    from caprese.model.generation import generate
    from caprese.model.sampling import Sampling

    def read() -> list | None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if state.get("key") != key or len(state.get("responses", ())) != len(samples):
            return None
        return [Sample(list(s.prompt_ids), list(r)) for s, r in zip(samples, state["responses"])]

    me, _ = world()
    got = read() if path.is_file() else None
    if got is None and me == 0:
        cap = max(len(s.response_ids) for s in samples)
        stops = set(int(e) for e in (decoder.spec.eos_token_ids or ()))
        replies: list[list[int]] = []
        pbar = bar(len(samples), "student replies", progress)
        try:
            for b in range(0, len(samples), batch_size):
                prompts = [list(s.prompt_ids) for s in samples[b:b + batch_size]]
                out = generate(decoder, prompts, cap, Sampling(), eos_ids=())  # cut below: keep the stop id
                replies += [through_first_stop(toks, stops) for toks in out.tokens]
                pbar.update(len(prompts))
        finally:
            pbar.close()
        with atomic_file(path) as tmp:
            torch.save({"key": key, "responses": replies}, tmp)
    barrier()
    got = got if got is not None else read()
    if got is None:
        raise CapreseError(f"cannot read the student's replies back from {path}; delete it and rerun")
    return got  # every reply has a token: generate gives at least one and the cut keeps the stop id


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return state if state.get("key") == key else None


def run_e2e(decoder, samples, plan: CalibrationPlan, init_adapters: dict[int, tuple[torch.Tensor, torch.Tensor]],
            work: Path, key: str, options: CalibrationOptions, callback: Callback | None = None,
            student=None) -> E2EResult:
    """Jointly fine-tune every layer's (L, R) of `plan` from `init_adapters`; returns the trained adapters (fp32,
    cpu).

    `key` must identify the base model, method, density, layers, samples, precision and quantized weights; the
    checkpoint key adds rank, the end-to-end config and the initial adapters. `student`: the quantized student's
    weights (quantized_student.StudentWeights, in its teacher state) or None.
    """
    with contextlib.ExitStack() as stack:
        return _run_e2e(decoder, samples, plan, init_adapters, work, key, options, callback, student, stack)


def _run_e2e(decoder, samples, plan, init_adapters, work, key, options, callback, student,
             stack: contextlib.ExitStack) -> E2EResult:
    t_start = time.monotonic()
    me, ws = world()
    cfg, progress = plan.recipe.e2e, options.progress
    work = Path(work) / "e2e"
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    cfg_key = dataclasses.asdict(cfg)
    if cfg.loss == "mse":  # the keys of runs from before these options stay what they were
        del cfg_key["loss"]
    if cfg.responses == "dense":
        del cfg_key["responses"]
    ckey = digest({"base": key, "rank": plan.rank, "cfg": cfg_key, "init": adapters_digest(init_adapters)})

    apply_method(decoder, plan.method, plan.density, list(plan.layers), plan.rank, seed=cfg.seed)
    if student is not None:  # after apply_method: a static selection comes from the unquantized weights
        stack.enter_context(student.student())
    decoder.requires_grad_(False)
    bps = _bypasses(decoder)
    missing = [i for i, _ in bps if i not in init_adapters]
    if missing:
        raise ValueError(f"no initial adapters for layers {missing}")
    params = []
    with torch.no_grad():
        for i, bp in bps:
            bp.L.copy_(init_adapters[i][0])
            bp.R.copy_(init_adapters[i][1])
            params += [bp.L, bp.R]
    for p in params:
        p.requires_grad_(True)
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(master, lr=cfg.lr)
    given, given_tokens = samples, sum(len(s.response_ids) for s in samples)
    on_policy = cfg.responses == "on-policy"
    replies_s = 0.0

    def replies(epoch: int) -> list:
        """The student's replies as its adapters stand now: before epoch 0 (the layer-wise stage's), and with
        "on-policy" before every later epoch (each epoch's file keyed by it, so a resumed run reads them back)."""
        nonlocal replies_s
        t = time.monotonic()
        name, k = (f"student_replies_e{epoch}.pt", f"{ckey}:{epoch}") if on_policy else ("student_replies.pt", ckey)
        got = student_responses(decoder, given, work / name, k, progress and me == 0)
        replies_s += time.monotonic() - t
        return got

    if cfg.responses != "dense":  # the student as the layer-wise stage left it (adapters copied in above)
        samples = replies(0)
    reply_tokens: list[int] = []  # on-policy: each epoch's reply tokens
    n = len(samples)
    spe = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * spe
    sched = linear_schedule(opt, total, cfg.warmup)

    def distiller(on: list) -> Distiller:  # the passes over one set of replies (on-policy: one per epoch)
        return Distiller(decoder, on, options.teacher_cache_bytes, student, cfg.loss)

    dist_ = distiller(samples)

    state = _load_checkpoint(ckpt_path, ckey)
    if state is not None:
        with torch.no_grad():
            for m, p, v in zip(master, params, state["master"]):
                m.copy_(v)
                p.copy_(v)
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start_epoch, history, before = state["epoch"], list(state["history"]), dict(state["before"])
        reply_tokens = list(state.get("reply_tokens", ()))
        if on_policy and start_epoch >= cfg.epochs:  # killed after the last epoch: the errors after on its replies
            samples = replies(cfg.epochs - 1)
            dist_ = distiller(samples)
    else:
        start_epoch, history = 0, []
        t0 = time.monotonic()
        alone, start = _without_bypass(dist_), dist_.errors()
        before = {f"{k}_approx": v for k, v in alone.items()} | {f"{k}_before": v for k, v in start.items()}
        before["eval_s"] = round(time.monotonic() - t0, 3)
    if progress and me == 0:
        print(f"caprese: e2e: final-hidden MSE on response tokens: FF̂ alone {before['mse_approx']:.5g}, "
              f"layer-wise bypass {before['mse_before']:.5g}"
              + (f"; KL (nats/token) {before['kl_approx']:.5g}, {before['kl_before']:.5g}" if cfg.loss == "kl"
                 else ""), file=sys.stderr)

    t_train = time.monotonic()
    pbar = bar(total, "e2e", progress and me == 0, initial=start_epoch * spe)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if on_policy and epoch > 0:  # the adapters after epoch - 1 (a resumed run: the checkpoint's)
                samples = replies(epoch)
                dist_ = distiller(samples)
            if on_policy:
                reply_tokens.append(sum(len(s.response_ids) for s in samples))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
            ep_sse = ep_count = 0.0
            for b in range(spe):
                batch = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                denom = dist_.denominator(batch)
                grads, local = batch_gradients(dist_, params, batch[me::ws], denom)
                flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([local], device=params[0].device)])
                all_reduce_sum(flat)
                off = 0
                for m, p in zip(master, params):
                    m.grad = flat[off:off + p.numel()].view_as(m).clone()
                    off += p.numel()
                batch_loss = float(flat[-1])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for m, p in zip(master, params):
                        p.copy_(m)
                ep_sse += batch_loss * denom
                ep_count += denom
                pbar.update(1)
                pbar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{batch_loss:.4g}", refresh=False)
                if callback is not None:
                    callback({"stage": "e2e", "event": "step", "epoch": epoch, "step": epoch * spe + b + 1,
                              "steps": total, "loss": batch_loss})
            history.append(ep_sse / max(1.0, ep_count))
            if me == 0:
                _save_checkpoint(ckpt_path, {"key": ckey, "epoch": epoch + 1,
                                             "master": [m.detach().cpu() for m in master],
                                             "optim": opt.state_dict(), "sched": sched.state_dict(),
                                             "history": history, "before": before,
                                             "reply_tokens": reply_tokens})
            barrier()
            if callback is not None:
                callback({"stage": "e2e", "event": "epoch_done", "epoch": epoch,
                          f"train_{cfg.loss}": history[-1]})
    finally:
        pbar.close()
        detach_caches(decoder)
    train_s = time.monotonic() - t_train
    t0 = time.monotonic()
    after = dist_.errors()
    for p in params:
        p.requires_grad_(False)
    if progress and me == 0:
        print(f"caprese: e2e: final-hidden MSE {before['mse_before']:.5g} -> {after['mse']:.5g}"
              + (f"; KL {before['kl_before']:.5g} -> {after['kl']:.5g}" if cfg.loss == "kl" else ""),
              file=sys.stderr)
    metrics = {**before, **{f"{k}_after": v for k, v in after.items()}, f"epoch_train_{cfg.loss}": history,
               "loss": cfg.loss, "responses": cfg.responses, "steps": total,
               "tokens": sum(len(s.response_ids) for s in samples)}
    if cfg.responses != "dense":
        metrics["given_tokens"] = given_tokens
    if on_policy:  # per epoch; "tokens" and the metrics after: the last epoch's replies
        metrics["reply_tokens"] = reply_tokens
    timing = {"student_replies_s": round(replies_s, 3), "train_s": round(train_s, 3),
              "eval_after_s": round(time.monotonic() - t0, 3), "total_s": round(time.monotonic() - t_start, 3),
              "resumed_from_epoch": start_epoch}
    adapters = {i: (bp.L.detach().float().cpu().clone(), bp.R.detach().float().cpu().clone()) for i, bp in bps}
    return E2EResult(adapters, metrics, timing)
