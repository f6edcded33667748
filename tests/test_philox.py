"""The counter-based noise generator: Philox4x32-10 + Box-Muller, in the reference
(functional.philox4x32 / philox_normal) and in the C++ kernel (ddpm_fast._C).

Statistical bounds: every test draws a fixed, seeded stream, so the outcomes are deterministic; the
bounds are chosen so that a correct generator would fail them with probability < 1e-6 (5 sigma for a
mean or correlation of N samples, whose standard error is 1/sqrt(N); sqrt(2/N) for the variance of
N normals; Kolmogorov-Smirnov at sqrt(N) D > 2.0, p ~ 7e-4, the one loose level, far from what a
biased transform produces at these N).
"""
import importlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_fast.reference import functional as F
from tolerances import tol

rs = importlib.import_module("ddpm_fast.ops.reverse_step")
_C = importlib.import_module("ddpm_fast._C") if rs.HAS_EXTENSION else None

M32 = 0xFFFFFFFF
# Random123's published known-answer vectors for philox4x32 with 10 rounds: (counter, key, output).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SIGMA_ONLY = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # a coefficient row whose output is z itself


def _need_ext():
    if _C is None:
        pytest.fail(f"ddpm_fast._C did not load ({rs._LOAD_ERROR})")


def _ref_words(counter, key):
    words = F.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    return tuple(int(w) for w in words)


def kernel_normal(shape, seed, step, channels_last=False, image_offset=0):
    """z from the C++ kernel: the reverse step with the row (0, 0, 0, 0, 0, 1) returns the noise."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return rs.reverse_step(x, x, torch.tensor(step), SIGMA_ONLY.repeat(step + 1, 1), seed=seed,
                           image_offset=image_offset)


# --- known answers and integer identity --------------------------------------------------------------
@pytest.mark.parametrize("counter,key,expected", KATS, ids=["zeros", "ones", "pi"])
def test_reference_known_answers(counter, key, expected):
    assert _ref_words(counter, key) == expected


@pytest.mark.parametrize("counter,key,expected", KATS, ids=["zeros", "ones", "pi"])
def test_kernel_known_answers(counter, key, expected):
    _need_ext()
    assert tuple(w & M32 for w in _C.philox4x32(list(counter), list(key))) == expected


def test_kernel_words_equal_reference_words():
    _need_ext()
    rng = random.Random(1)
    cases = [([rng.getrandbits(32) for _ in range(4)], [rng.getrandbits(32) for _ in range(2)]) for _ in range(256)]
    ctr = tuple(torch.tensor([c[0][i] for c in cases], dtype=torch.int64) for i in range(4))
    keys = {}
    for i, (c, k) in enumerate(cases):  # the reference takes one key per call
        keys.setdefault(tuple(k), []).append(i)
    for k, idx in keys.items():
        words = F.philox4x32(tuple(t[idx] for t in ctr), k)
        for j, i in enumerate(idx):
            got = tuple(w & M32 for w in _C.philox4x32(cases[i][0], list(k)))
            assert got == tuple(int(w[j]) for w in words)


# --- kernel stream == reference stream ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7, 2 ** 40 + 5, 2 ** 64 - 1])
@pytest.mark.parametrize("shape,channels_last", [((5,), False), ((4, 3, 16, 16), False), ((3, 96, 7, 9), True),
                                                 ((2, 3, 32, 32), True)], ids=["n5", "b4", "odd-cl", "cifar-cl"])
def test_kernel_matches_reference_normal(shape, channels_last, seed):
    _need_ext()
    for step in (0, 3):
        got = kernel_normal(shape, seed, step, channels_last)
        torch.testing.assert_close(got, F.philox_normal(shape, seed, step), **tol("philox_normal", torch.float32))


def test_reproducible_and_keyed():
    _need_ext()
    shape = (2, 3, 16, 16)
    a = F.philox_normal(shape, 5, 3)
    assert torch.equal(a, F.philox_normal(shape, 5, 3))
    assert torch.equal(kernel_normal(shape, 5, 3), kernel_normal(shape, 5, 3))
    # every key/counter component changes the stream: seed low and high words, step
    for other in (F.philox_normal(shape, 6, 3), F.philox_normal(shape, 5 + 2 ** 32, 3), F.philox_normal(shape, 5, 4)):
        assert (other != a).float().mean() > 0.99
    # the stream is a function of the element index only: a prefix of a longer draw is the shorter draw
    assert torch.equal(F.philox_normal((1000,), 5, 3)[:37], F.philox_normal((37,), 5, 3))
    torch.testing.assert_close(kernel_normal((1000,), 5, 3)[:37], kernel_normal((37,), 5, 3), rtol=0, atol=0)


# --- distribution --------------------------------------------------------------------------------------
def _corr(a, b):
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _check_normal(z):
    n = z.numel()
    z = z.double().reshape(-1)
    assert torch.isfinite(z).all()
    # |z| <= sqrt(-2 ln u_min) with u_min = 2^-25: the transform's hard bound
    assert float(z.abs().max()) <= math.sqrt(-2 * math.log(2.0 ** -25)) + 1e-5
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    s = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))
    assert d * math.sqrt(n) < 2.0, f"KS statistic sqrt(n) D = {d * math.sqrt(n):.3f}"
    # neighbours: lags 1..8 cover the pairs inside a Box-Muller pair, across pairs of one Philox block
    # and across blocks; squares catch a shared radius (dependence that is not linear). For independent
    # variables the sample correlation has standard error 1/sqrt(n) whatever their distribution.
    bound = 5 / math.sqrt(n)
    for lag in range(1, 9):
        assert abs(_corr(z[:-lag], z[lag:])) < bound, lag
        assert abs(_corr(z[:-lag] ** 2, z[lag:] ** 2)) < bound, lag


def test_reference_distribution():
    _check_normal(F.philox_normal((2 ** 18,), 123, 0))


def test_kernel_distribution():
    _need_ext()
    _check_normal(kernel_normal((2 ** 22,), 123, 0))


def test_kernel_no_correlation_across_steps_and_seeds():
    _need_ext()
    n = 2 ** 20
    bound = 5 / math.sqrt(n)
    base = kernel_normal((n,), 42, 0)
    for other in (kernel_normal((n,), 42, 1), kernel_normal((n,), 42, 2), kernel_normal((n,), 43, 0),
                  kernel_normal((n,), 42 + 2 ** 32, 0)):
        assert abs(_corr(base, other)) < bound
        assert abs(_corr(base ** 2, other ** 2)) < bound


def test_reference_no_correlation_across_steps():
    n = 2 ** 16
    a, b = F.philox_normal((n,), 42, 0), F.philox_normal((n,), 42, 1)
    assert abs(_corr(a, b)) < 5 / math.sqrt(n)


def test_cpu_isa_variants_agree_bitwise(tmp_path):
    """The CPU kernel picks an AVX2 variant of its noise loops at run time where the CPU has it;
    DDPM_FAST_CPU_ISA=generic forces the portable one. Both must give the same bits."""
    _need_ext()
    code = (
        "import importlib, sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import test_philox as t\n"
        "torch.save([t.kernel_normal((n,), 2 ** 63 + 11, 5) for n in (1, 7, 4096 + 3, 2 ** 20 + 5)], sys.argv[1])\n"
    )
    out = tmp_path / "generic.pt"
    env = dict(os.environ, DDPM_FAST_CPU_ISA="generic")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    generic = torch.load(out)
    for n, g in zip((1, 7, 4096 + 3, 2 ** 20 + 5), generic):
        assert torch.equal(kernel_normal((n,), 2 ** 63 + 11, 5), g), n


# --- image offsets: image i draws the same noise in any batch position ----------------------------------
# (shape of one batch, channels_last): P = C*H*W a multiple of 4 (Philox-block aligned batches), and not
# (3 x 7 x 9 = 189: a batch can start inside a Philox block, the kernel's per-element path).
OFFSET_SHAPES = [((5, 1, 16, 16), False), ((4, 3, 7, 9), False), ((3, 3, 7, 9), True), ((2, 96, 7, 9), True)]
OFFSET_IDS = ["digits", "odd", "odd-cl", "c96-cl"]


@pytest.mark.parametrize("shape,channels_last", OFFSET_SHAPES, ids=OFFSET_IDS)
def test_image_offset_keys_noise_by_global_image(shape, channels_last):
    """A batch at offset k holds images k..k+B-1 of the run drawn in one batch: reference and kernel."""
    _need_ext()
    b, per = shape[0], shape[1:]
    seed, step = 2 ** 63 + 17, 4
    whole_ref = F.philox_normal((b + 6,) + per, seed, step)
    whole_ker = kernel_normal((b + 6,) + per, seed, step, channels_last)
    for offset in (0, 1, 3, 6):
        ref = F.philox_normal(shape, seed, step, image_offset=offset)
        assert torch.equal(ref, whole_ref[offset:offset + b]), offset
        ker = kernel_normal(shape, seed, step, channels_last, image_offset=offset)
        assert torch.equal(ker, whole_ker[offset:offset + b]), offset
        torch.testing.assert_close(ker, ref, **tol("philox_normal", torch.float32))
    # one image alone, at its index, is that image of any batch
    torch.testing.assert_close(kernel_normal((1,) + per, seed, step, channels_last, image_offset=5), whole_ker[5:6],
                               rtol=0, atol=0)


@pytest.mark.parametrize("shape,channels_last", OFFSET_SHAPES[:2], ids=OFFSET_IDS[:2])
def test_image_offset_writes_every_element(shape, channels_last):
    # In place over a sentinel input (the row (0, 0, 0, 0, 0, 1) maps x to 0 * x + z = z): an element the
    # kernel skipped keeps 1e30 and fails the comparison.
    _need_ext()
    x = torch.full(shape, 1e30)
    rs.reverse_step_(x, x, torch.tensor(2), SIGMA_ONLY.repeat(3, 1), seed=9, image_offset=3)
    torch.testing.assert_close(x, F.philox_normal(shape, 9, 2, image_offset=3), **tol("philox_normal", torch.float32))


def test_image_offset_tensor_equals_int_and_changes_the_stream():
    _need_ext()
    shape = (3, 3, 8, 8)
    want = kernel_normal(shape, 11, 1, image_offset=7)
    assert torch.equal(kernel_normal(shape, 11, 1, image_offset=torch.tensor(7)), want)
    assert (kernel_normal(shape, 11, 1, image_offset=8) != want).float().mean() > 0.99
    assert torch.equal(F.philox_normal(shape, 11, 1, image_offset=torch.tensor(7)),
                       F.philox_normal(shape, 11, 1, image_offset=7))


def test_x_T_stream_is_separate_and_normal():
    n = 2 ** 16
    steps = F.philox_normal((n,), 42, 0)
    x_T = F.philox_normal((n,), 42, 0, stream=F.STREAM_X_T)
    assert abs(_corr(steps, x_T)) < 5 / math.sqrt(n)
    _check_normal(x_T)
    # batches of x_T are keyed by image like the step noise
    whole = F.philox_normal((9, 3, 5, 5), 42, 0, stream=F.STREAM_X_T)
    assert torch.equal(F.philox_normal((4, 3, 5, 5), 42, 0, image_offset=5, stream=F.STREAM_X_T), whole[5:])


@pytest.mark.parametrize("offset,exc,msg", [
    (-1, ValueError, "image_offset"), (2 ** 63, ValueError, "image_offset"), (1.0, TypeError, "image_offset"),
    (True, TypeError, "image_offset"), (torch.tensor(1.0), TypeError, "image_offset_tensor must be an int64"),
    (torch.tensor([1, 2]), ValueError, "exactly one index"),
    (torch.tensor(-3), ValueError, "image_offset must be >= 0"),
    (2 ** 62, ValueError, "too large")], ids=["negative", "2^63", "float", "bool", "tensor-float", "tensor-two",
                                              "tensor-negative", "overflow"])
def test_bad_image_offset_raises(offset, exc, msg):
    _need_ext()
    with pytest.raises(exc, match=msg):
        kernel_normal((2, 3, 4, 4), 0, 0, image_offset=offset)


def test_reference_bad_offset_and_stream_raise():
    with pytest.raises(ValueError, match="image_offset"):
        F.philox_normal((2, 3), 0, 0, image_offset=-1)
    with pytest.raises(ValueError, match="stream"):
        F.philox_normal((2, 3), 0, 0, stream=2)
