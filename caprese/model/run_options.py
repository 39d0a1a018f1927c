"""RunOptions: what one generation asks for, the same object for the reference decoder (TextModel.generate),
an engine folder (caprese.runtime.Generator.generate) and the CLI (`caprese generate` / `run` / `chat` build it
from their flags). Both generate() methods take these fields as keywords in this order, after the prompt:

    reply = model.generate(prompt, **opts.kwargs(), on_text=print)
"""

from __future__ import annotations

import dataclasses

from caprese.model.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class RunOptions:
    max_new_tokens: int = 256
    sampling: Sampling = Sampling()
    chat: bool = False  # wrap a text prompt in the tokenizer's chat template (one user turn)
    system: str | None = None  # the system message of that template
    reselect_every: int = 0  # GRIFFIN: re-select the neurons every N decode steps (0 = never)
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)

    def kwargs(self) -> dict:
        """The fields as generate()'s keyword arguments (Sampling kept as the object)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "RunOptions":
        return dataclasses.replace(self, **changes)
