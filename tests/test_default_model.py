"""The shipped default model (ddpm_fast/assets/digits16.safetensors) loads and draws digits, not noise.

"Not noise" is measured two ways against the built-in digits at 16x16, each with a margin:
- distance to the nearest training image: samples sit about as close to the training set as
  held-out real digits do, and far closer than pure noise or samples from an untrained model;
- a logistic-regression digit classifier fitted here: it is confident on the samples and the
  samples spread over many digit classes (no collapse onto one shape).
"""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast.io.checkpoint import default_checkpoint_path, load_checkpoint
from ddpm_fast.config import PRESETS
from ddpm_fast.training.data import digits_images
from ddpm_fast.reference import UNet
from ddpm_fast.sampling import sample

ASSETS = Path(__file__).resolve().parents[1] / "ddpm_fast" / "assets"
N = 48          # samples per source
DDIM_STEPS = 20


@pytest.fixture(scope="module")
def shipped():
    path = default_checkpoint_path()
    assert path is not None, "the default model ddpm_fast/assets/digits16.safetensors is missing"
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_images(16)
    return x.reshape(len(x), -1).numpy().astype(np.float64), y.numpy()


def draw(model, config, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = sample(model, batch_size=N, num_inference_steps=DDIM_STEPS, sampler="ddim", generator=g,
               output_type="pt", progress=False, device="cpu", config=config)
    return x.reshape(N, -1).numpy().astype(np.float64)


def nn_distance(a, b):
    """RMS pixel distance from each row of a to its nearest row of b, averaged over a."""
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T
    return float(np.sqrt(np.maximum(d2.min(1), 0.0) / a.shape[1]).mean())


@pytest.fixture(scope="module")
def sources(shipped, digits):
    model, config = shipped
    torch.manual_seed(0)
    untrained = UNet(config.unet).eval()
    g = torch.Generator().manual_seed(1)
    return {
        "model": draw(model, config),
        "untrained": draw(untrained, config),
        "uniform noise": torch.rand(N, 256, generator=g).double().numpy(),
        # Noise with the digits' own per-pixel mean and spread: "plausible brightness", no shape.
        "matched noise": (digits[0].mean(0) + digits[0].std(0) * torch.randn(N, 256, generator=g).double().numpy()
                          ).clip(0, 1),
    }


def test_shipped_model_loads_as_float32_digits16(shipped):
    from safetensors import safe_open

    model, config = shipped
    path = default_checkpoint_path()
    assert config == PRESETS["digits16"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored fp16, upcast on load
    assert path.stat().st_size < 6 * 2 ** 20
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "ddpm_fast/1"
        assert int(f.metadata()["train_step"]) > 0


def test_loss_curve_is_shipped_and_goes_down():
    with open(ASSETS / "digits16_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) >= 10 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_samples_are_near_the_digits_not_noise(sources, digits):
    x, _ = digits
    train, held_out = x[200:], x[:200]
    real = nn_distance(held_out, train)
    dist = {k: nn_distance(v, train) for k, v in sources.items()}
    # Samples are about as close to training digits as real unseen digits are (measured 0.96x) ...
    assert dist["model"] < 1.8 * real, (real, dist)
    # ... and every non-digit source is far further away (measured 2.2x for matched noise, 3.7x
    # for uniform noise, 5x for the untrained model).
    for k in ("untrained", "uniform noise", "matched noise"):
        assert dist["model"] < 0.6 * dist[k], (k, dist)


def test_a_digit_classifier_recognises_the_samples(sources, digits):
    from sklearn.linear_model import LogisticRegression

    x, y = digits
    # Strong regularisation keeps the classifier from being confidently wrong on noise.
    clf = LogisticRegression(max_iter=200, C=0.05).fit(x[200:], y[200:])
    real = float(clf.predict_proba(x[:200]).max(1).mean())  # held-out real digits
    conf = {k: float(clf.predict_proba(v).max(1).mean()) for k, v in sources.items()}
    assert conf["model"] > 0.75 * real, (real, conf)  # measured 0.79 vs 0.79 on real digits
    for k in ("untrained", "uniform noise", "matched noise"):
        assert conf["model"] > conf[k] + 0.2, (k, conf)  # measured 0.23 to 0.33
    # Diverse: many classes appear, none dominates.
    counts = np.bincount(clf.predict(sources["model"]), minlength=10)
    assert (counts > 0).sum() >= 7 and counts.max() <= N // 3, counts
