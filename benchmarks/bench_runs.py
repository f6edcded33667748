"""Sampling runs to files, `ddpm_fast.sampling.runs.sample_to_folder(...)`, in images per second.

One timed call = a whole run of RUN_IMAGES images into a fresh folder: batches of x_T -> S steps ->
uint8 PNGs encoded and written on the writer thread, manifest included (what `ddpm-fast sample
--out-dir` costs, minus process start-up and model loading). The shipped digits16 model, DDIM with
few steps, the fast backend, at two batch sizes; extra_info: images/s and the time per batch.

Checked, not only timed: after the timed rounds the folder holds RUN_IMAGES PNGs byte-identical to
those of a run at the other batch size (image i depends only on (seed, i)).
Grid: CPU 48 images, DDIM-5, batches 16 and 48; CUDA 1024 images, DDIM-10, batches 64 and 256.
DDPM_FAST_BENCH_BATCHES (e.g. "8,32") picks other batch sizes.
"""
import itertools
import shutil
import tempfile
from pathlib import Path

import pytest

import ddpm_fast
from conftest import DEVICE, HAS_CUDA, env_list, run_bench
from ddpm_fast.io.checkpoint import load_checkpoint
from ddpm_fast.sampling.runs import sample_to_folder

RUN_IMAGES, STEPS = (1024, 10) if HAS_CUDA else (48, 5)
BATCHES = [int(b) for b in env_list("DDPM_FAST_BENCH_BATCHES", ["64", "256"] if HAS_CUDA else ["16", "48"])]
_counter = itertools.count()


@pytest.fixture(scope="module")
def digits():
    model, config = load_checkpoint(ddpm_fast.default_checkpoint_path(), device=DEVICE)
    return model, config


@pytest.fixture(scope="module")
def scratch():
    root = Path(tempfile.mkdtemp(prefix="bench_runs_"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}


@pytest.mark.parametrize("batch", BATCHES)
def test_run_to_folder(benchmark, digits, scratch, batch):
    model, config = digits
    last = {}

    def run():
        out = scratch / f"b{batch}-{next(_counter)}"  # a fresh folder: every round draws every image
        last["out"] = out
        return sample_to_folder(model, out, RUN_IMAGES, batch, config=config, device=DEVICE, progress=False,
                                sampler="ddim", num_inference_steps=STEPS, backend="fast", seed=0)

    benchmark.group = f"runs[digits16 {RUN_IMAGES} images ddim{STEPS}]"
    result = run_bench(benchmark, run, provider="fast", batch=batch, images=RUN_IMAGES, steps=STEPS)
    median_ms = benchmark.extra_info.get("median_ms")
    if median_ms:
        benchmark.extra_info["images/s"] = RUN_IMAGES / (median_ms * 1e-3)
        benchmark.extra_info["per_batch_ms"] = median_ms / -(-RUN_IMAGES // batch)
    assert result.written == RUN_IMAGES
    files = _files(last["out"])
    assert len(files) == RUN_IMAGES
    other = scratch / f"check-{batch}"
    if not other.exists():
        other_batch = next((b for b in BATCHES if b != batch), max(1, batch // 2))
        sample_to_folder(model, other, RUN_IMAGES, other_batch, config=config, device=DEVICE, progress=False,
                         sampler="ddim", num_inference_steps=STEPS, backend="fast", seed=0)
    assert _files(other) == files, "a run's images changed with the batch size"
