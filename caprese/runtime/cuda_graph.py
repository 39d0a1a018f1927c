"""One decode step captured as a CUDA graph and replayed: no per-kernel launch cost at batch-1 decode.

`CapturedStep(fn, *inputs)` runs fn(*inputs) twice on a side stream (allocator and library handles warm up; the
step must be safe to repeat, as a decode step at a fixed slot is: it writes the same K/V), then captures one call.
`replay()` reruns the captured kernels on whatever the input buffers hold now and returns the output buffer the
capture produced (valid until the next replay). Anything the step reads must keep its address: inputs written in
place (fill_, copy_), never re-bound.
"""

from __future__ import annotations

import torch


class CapturedStep:
    def __init__(self, fn, *inputs, warmup: int = 2):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*inputs)

    def replay(self):
        self.graph.replay()
        return self.out
