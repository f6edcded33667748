"""The shipped model's samples in fp32 and bf16, judged as tests/test_default_model.py judges them.

    PYTHONPATH=$PWD python scripts/cpu_bf16_quality.py

48 DDIM-20 samples and the main job's 16 DDPM-1000 samples from one generator (noise="generator", so every
provider gets the same noise): nearest-training-digit RMS distance (vs held-out real digits), a logistic
digit classifier's mean confidence, classes hit, and the pixel difference from the fp32 reference.
Results: benchmarks/results/cpu-2026-12-02-bf16-quality.md.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

# The test's own judge: tests/ goes on sys.path first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_default_model import nn_distance

from ddpm_fast.io.checkpoint import default_checkpoint_path, load_checkpoint
from ddpm_fast.sampling import sample
from ddpm_fast.training.data import digits_images

PROVIDERS = {
    "ref fp32": {"backend": "reference", "dtype": "fp32"},
    "fast fp32": {"backend": "fast", "dtype": "fp32"},
    "fast bf16 cl": {"backend": "fast", "dtype": "bf16", "channels_last": True},
    "ref bf16": {"backend": "reference", "dtype": "bf16"},
}


def main():
    model, config = load_checkpoint(default_checkpoint_path())
    x, y = digits_images(16)
    x, y = x.reshape(len(x), -1).numpy().astype(np.float64), y.numpy()
    train = x[200:]
    real = nn_distance(x[:200], train)
    clf = LogisticRegression(max_iter=200, C=0.05).fit(x[200:], y[200:])
    print(f"held-out real digits: nn {real:.4f} conf {float(clf.predict_proba(x[:200]).max(1).mean()):.3f}")
    for sampler, steps, n in (("ddim", 20, 48), ("ddpm", 1000, 16)):
        outs = {}
        for name, kw in PROVIDERS.items():
            o = sample(model, batch_size=n, num_inference_steps=steps, sampler=sampler, output_type="pt",
                       generator=torch.Generator().manual_seed(0), progress=False, config=config, noise="generator",
                       **kw)
            outs[name] = o
            v = o.reshape(n, -1).numpy().astype(np.float64)
            counts = np.bincount(clf.predict(v), minlength=10)
            nn = nn_distance(v, train)
            diff = (o - outs["ref fp32"]).abs()
            print(f"{sampler}{steps} n={n} {name}: nn {nn:.4f} ({nn / real:.2f}x real) "
                  f"conf {float(clf.predict_proba(v).max(1).mean()):.3f} classes {(counts > 0).sum()} "
                  f"max/class {counts.max()}  max|diff| vs ref fp32 {float(diff.max()):.3f} "
                  f"mean|diff| {float(diff.mean()):.4f}", flush=True)


if __name__ == "__main__":
    main()
