"""Test-only: a sampling run (sampling.runs.sample_to_folder) under torchrun whose model raises on rank
FAIL_RANK once that rank has drawn its first batch, to check that a failing rank ends the whole run.

    python -m torch.distributed.run --nproc-per-node 2 tests/failing_rank_run.py OUT_DIR
"""
import os
import sys

import torch

import ddpm_fast
from ddpm_fast.io.checkpoint import load_checkpoint
from ddpm_fast.sampling.runs import sample_to_folder

STEPS = 4


class FailsAfterFirstBatch(torch.nn.Module):
    """The UNet, but on rank FAIL_RANK its call after the first batch's STEPS calls raises."""

    def __init__(self, inner, fail: bool):
        super().__init__()
        self.inner, self.fail, self.calls = inner, fail, 0

    def forward(self, x, t):
        self.calls += 1
        if self.fail and self.calls > STEPS:
            raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
        return self.inner(x, t)


def main(out_dir: str) -> None:
    model, cfg = load_checkpoint(ddpm_fast.default_checkpoint_path())
    fail = os.environ["RANK"] == os.environ.get("FAIL_RANK", "1")
    # batch 4 <= model_batch 16: one model call per step, so the first batch is STEPS calls
    sample_to_folder(FailsAfterFirstBatch(model, fail), out_dir, 400, 4, config=cfg, device="cpu", progress=False,
                     sampler="ddim", num_inference_steps=STEPS, backend="fast")


if __name__ == "__main__":
    main(sys.argv[1])
