"""Calibration data: (prompt ids, response ids) samples from a local file, or written by the dense model itself.

The split matters: GRIFFIN / CATS statistics come from the prompt tokens, the distillation loss from the
response tokens (the paper's "prompt" and "generation" phases).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.response_ids)
