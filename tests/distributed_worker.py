"""Run under torchrun by tests/test_distillation.py: layer-wise then end-to-end calibration with 2 CPU processes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR

Writes OUT_DIR/lw (layer-wise artifact), OUT_DIR/e2e (end-to-end artifact from it) and OUT_DIR/ranks.json.
The test repeats the same calls in one process and compares. Everything both sides need lives here.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

LAYERWISE = dict(epochs=4, lr=3e-3, batch_size=32, seed=3)
E2E = dict(epochs=2, lr=2e-3, batch_size=4, seed=3)
CALIB = dict(method="griffin", density=0.5, layers="all", rank=8)


def make_samples(n: int = 12, seed: int = 0, vocab: int = 300):
    from caprese.calibration.data import Sample

    rng = random.Random(seed)
    return [Sample([rng.randrange(5, vocab) for _ in range(rng.randint(3, 10))],
                   [rng.randrange(5, vocab) for _ in range(rng.randint(4, 14))]) for _ in range(n)]


def run(model_dir: str, out_dir: Path, progress: bool = False):
    """(layer-wise artifact, end-to-end artifact) with the shared settings; the same in one or many processes."""
    from caprese.calibration.calibrate import calibrate
    from caprese.calibration.recipe import CalibrationOptions, CalibrationRecipe, E2EConfig, LayerwiseConfig

    samples = make_samples()
    lw = calibrate(model_dir, out_dir / "lw",
                   CalibrationRecipe(stage="layerwise", layerwise=LayerwiseConfig(**LAYERWISE), **CALIB), samples,
                   CalibrationOptions(work_dir=out_dir / "lw.work", progress=progress))
    e2 = calibrate(model_dir, out_dir / "e2e", CalibrationRecipe(stage="e2e", init=out_dir / "lw",
                                                                 e2e=E2EConfig(**E2E)), samples,
                   CalibrationOptions(work_dir=out_dir / "e2e.work", progress=progress))
    return lw, e2


def main() -> None:
    import torch.distributed as dist

    from caprese.calibration.distributed import init_distributed

    torch.set_num_threads(1)
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, world = init_distributed("cpu")
    lw, e2 = run(model_dir, out_dir)
    if rank == 0:
        (out_dir / "ranks.json").write_text(json.dumps({
            "world": world, "backend": dist.get_backend(),
            "per_rank": lw.metrics["timing"]["layerwise"].get("per_rank"),
            "e2e_world": e2.recipe["world_size"]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
