"""The latency report of one generation on an engine folder: GenerationStats (the reference decoder's report,
the same type) plus memory traffic and memory use.

Every backend fills the same object, so `--json` has the same fields whichever runs:
  ttft_ms, ms_per_token (mean, p50, p90), tokens_per_s, tokens_generated, prompt_tokens   (GenerationStats)
  backend          what ran; backend_requested "auto" when --backend auto chose it (the report: "native (auto)")
  bytes_per_step   weights a decode step reads, from the engine spec (traffic.py: EngineSpec.decode_reads, one
                   row of each table only gathered from, the GRIFFIN selection buffers; no graph is parsed),
                   less what the backend skipped (the native kernel's unread CATS up/down rows and screened-head
                   savings, mean over the steps)
                   + the KV cache the step attends to (mean over the steps of the slots read)
  gb_per_s         achieved bandwidth: bytes_per_step / ms_per_token
  peak_rss_mb      the process's peak resident memory (host); peak_device_mb where the backend can tell
"""

from __future__ import annotations

import dataclasses
import resource
import sys

from caprese.model.generation import GenerationStats


@dataclasses.dataclass
class RuntimeStats(GenerationStats):
    backend_requested: str = ""  # the backend asked for ("auto", or the one that ran)
    device: str = "cpu"
    reused_tokens: int = 0  # conversation tokens whose KV cache entries were reused (chat), not prefilled again
    prefill_tokens: int = 0  # tokens run through the prefill graph before the first new token
    kv_slots: int = 0  # KV cache slots per layer allocated for this generation
    weight_bytes_per_step: int = 0
    kv_bytes_per_step: float = 0.0
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes_per_step + self.kv_bytes_per_step

    @property
    def gb_per_s(self) -> float:
        """Achieved memory bandwidth of the decode steps: bytes read per step / time per step."""
        if not self.step_ms:
            return float("nan")
        return self.bytes_per_step / (self.ms_per_token * 1e-3) / 1e9

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update({"backend": self.backend, "backend_requested": self.backend_requested or self.backend,
                  "device": self.device, "reused_tokens": self.reused_tokens,
                  "prefill_tokens": self.prefill_tokens, "kv_slots": self.kv_slots,
                  "bytes_per_step": int(round(self.bytes_per_step)), "gb_per_s": _round(self.gb_per_s, 3),
                  "peak_rss_mb": round(self.peak_rss_mb, 1),
                  "peak_device_mb": None if self.peak_device_mb is None else round(self.peak_device_mb, 1)})
        return d

    def report_parts(self) -> list[str]:
        parts = super().report_parts()
        if self.reused_tokens:
            parts[0] += f" ({self.reused_tokens} reused)"
        mem = f"peak RSS {self.peak_rss_mb:.0f} MB"
        if self.peak_device_mb is not None:
            mem += f", device {self.peak_device_mb:.0f} MB"
        return parts + [f"{self.bytes_per_step / 1e6:.1f} MB/step, {self.gb_per_s:.2f} GB/s", mem]

    def report(self) -> str:
        """One human line (stderr of `caprese run`, `/stats` in chat): "... | backend: native (auto)"."""
        label = self.backend + (" (auto)" if self.backend_requested == "auto" else "")
        return " | ".join(self.report_parts() + [f"backend: {label}"])


def _round(x: float, n: int):
    return None if x != x else round(x, n)  # NaN (no decode step) -> null in JSON


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
