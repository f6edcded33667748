"""The diffusion math: schedule, q_sample, labml p_sample, coefficient tables and the table-driven step.
Every expected value is computed here from the formulas (float64 numpy/Python), not from the module."""
import math

import numpy as np
import pytest
import torch

from ddpm_fast import DiffusionConfig, Schedule
from ddpm_fast.reference import functional
from ddpm_fast.reference.functional import C_X0_EPS, C_X0_X, M_EPS, M_X, M_X0, SIGMA
from tolerances import tol

T = 1000
BETA = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ALPHA = 1.0 - BETA
ALPHA_BAR = np.cumprod(ALPHA)


def ab(t):
    """alpha_bar_t with alpha_bar_{-1} = 1 (the step before the first)."""
    return 1.0 if t < 0 else float(ALPHA_BAR[t])


@pytest.fixture(scope="module")
def sched():
    return Schedule(DiffusionConfig())


class FixedEps(torch.nn.Module):
    """A stand-in model whose eps depends on x and t (so a wrong t or x would show)."""

    def forward(self, x, t):
        return torch.tanh(x * 0.7) + 0.01 * t.to(x.dtype)[:, None, None, None]


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
def test_schedule_matches_float64_values(sched):
    for name, want in (("beta", BETA), ("alpha", ALPHA), ("alpha_bar", ALPHA_BAR)):
        got = getattr(sched, name)
        assert got.dtype == torch.float32 and got.shape == (T,)
        # Stored as the float32 rounding of the float64 value (a float32 cumprod is measurably further off).
        torch.testing.assert_close(got.double(), torch.from_numpy(want), **tol("schedule_fp32", torch.float32))
        torch.testing.assert_close(getattr(sched, name + "_64"), torch.from_numpy(want),
                                   **tol("schedule_fp64", torch.float64))
    assert torch.equal(sched.sigma2, sched.beta)


def test_float32_cumprod_would_fail_the_schedule_tolerance():
    # Shows the tolerance above can fail: computing alpha_bar in float32 is measurably off.
    ab32 = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float32), 0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ab32.double(), torch.from_numpy(ALPHA_BAR), **tol("schedule_fp32", torch.float32))


def test_schedule_of_another_config():
    cfg = DiffusionConfig(n_steps=50, beta_start=1e-3, beta_end=0.05)
    s = Schedule(cfg)
    want = np.cumprod(1.0 - np.linspace(1e-3, 0.05, 50))
    torch.testing.assert_close(s.alpha_bar_64, torch.from_numpy(want), **tol("schedule_fp64", torch.float64))


@pytest.mark.parametrize("n,want", [(1000, list(range(999, -1, -1))), (10, list(range(900, -1, -100))),
                                    (3, [666, 333, 0]), (1, [0])])
def test_timesteps(sched, n, want):
    ts = sched.timesteps(n)
    assert ts.dtype == torch.long and ts.tolist() == want


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True])
def test_timesteps_rejects(sched, bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.timesteps(bad)


# --------------------------------------------------------------------------------------------
# q_sample and the loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_statistics(sched, t):
    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with eps ~ N(0, 1): mean sqrt(ab) x0, variance 1 - ab.
    # With n samples the sample mean has standard error sqrt((1 - ab) / n) and the sample variance
    # (1 - ab) sqrt(2 / (n - 1)) (Gaussian); 6 standard errors: a false alarm has probability ~1e-9,
    # and the test is seeded, so it is deterministic anyway. Using ab instead of sqrt(ab) would miss
    # by far more than 6 standard errors at every t tested.
    n = 400_000
    x0_value = 0.8
    x0 = torch.full((n, 1, 1, 1), x0_value)
    eps = torch.randn(n, 1, 1, 1, dtype=torch.float64).float()
    xt = sched.q_sample(x0, torch.full((n,), t, dtype=torch.long), eps).double().flatten()
    mean, var = math.sqrt(ab(t)) * x0_value, 1.0 - ab(t)
    assert abs(xt.mean().item() - mean) < 6 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 6 * var * math.sqrt(2 / (n - 1))


def test_q_sample_is_the_formula_per_sample(sched):
    x0 = torch.randn(4, 3, 5, 5)
    eps = torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 600, 999])
    want = torch.stack([math.sqrt(ab(int(ti))) * x0[i].double() + math.sqrt(1 - ab(int(ti))) * eps[i].double()
                        for i, ti in enumerate(t)])
    torch.testing.assert_close(sched.q_sample(x0, t, eps).double(), want, **tol("diffusion_fp32", torch.float32))


def test_loss_is_mse_of_eps(sched):
    model = FixedEps()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([5, 50, 500])
    xt = sched.q_sample(x0, t, eps)
    want = ((model(xt, t) - eps) ** 2).mean()
    torch.testing.assert_close(sched.loss(model, x0, t=t, eps=eps), want, **tol("diffusion_fp32", torch.float32))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sched.loss(model, x0, generator=g1), sched.loss(model, x0, generator=g2))


# --------------------------------------------------------------------------------------------
# labml p_sample and the table-driven step
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_labml_p_sample_matches_formula(sched, t):
    x = torch.randn(3, 2, 7, 9)
    z = torch.randn(3, 2, 7, 9)
    tt = torch.full((3,), t, dtype=torch.long)
    eps = FixedEps()(x, tt).double()
    beta, alpha = float(BETA[t]), float(ALPHA[t])
    want = (x.double() - beta / math.sqrt(1.0 - ab(t)) * eps) / math.sqrt(alpha) + math.sqrt(beta) * z.double()
    got = sched.p_sample(FixedEps(), x, tt, z)
    torch.testing.assert_close(got.double(), want, **tol("diffusion_fp32", torch.float32))


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_reverse_step_with_ddpm_coeffs_equals_labml_p_sample(sched, t):
    ts = sched.timesteps(T)
    coeffs = sched.ddpm_coeffs(ts, "labml")
    row = T - 1 - t
    assert int(ts[row]) == t
    x, z = torch.randn(3, 2, 7, 9), torch.randn(3, 2, 7, 9)
    tt = torch.full((3,), t, dtype=torch.long)
    eps = FixedEps()(x, tt)
    got = functional.reverse_step(x, eps, torch.tensor(row), coeffs, noise=z)
    torch.testing.assert_close(got, sched.p_sample(FixedEps(), x, tt, z), **tol("reverse_step", torch.float32))


def test_ddpm_coeffs_rows_are_the_formula(sched):
    # Strided: between t and t_prev, alpha = ab_t / ab_prev and beta = 1 - alpha.
    ts = [900, 450, 100, 0]
    rows = sched.ddpm_coeffs(ts, "labml").double()
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a = ab(t) / ab(prev)
        want = [0.0, 0.0, 0.0, 1 / math.sqrt(a), -(1 - a) / (math.sqrt(1 - ab(t)) * math.sqrt(a)), math.sqrt(1 - a)]
        torch.testing.assert_close(rows[i], torch.tensor(want, dtype=torch.float64),
                                   **tol("diffusion_fp32", torch.float32))


def _q_pair(sched, t, x0):
    eps = torch.randn_like(x0)
    xt = sched.q_sample(x0, torch.full((x0.shape[0],), t, dtype=torch.long), eps)
    return xt, eps


@pytest.mark.parametrize("variant", ["labml", "paper", "posterior"])
def test_ddpm_coeffs_clipped_equals_unclipped_when_nothing_clips(sched, variant):
    ts = sched.timesteps(20)
    plain, clipped = sched.ddpm_coeffs(ts, variant), sched.ddpm_coeffs_clipped(ts, variant)
    torch.testing.assert_close(plain[:, SIGMA], clipped[:, SIGMA], rtol=0, atol=0)
    for row in (0, 7, 19):
        t = int(ts[row])
        x0 = torch.rand(2, 3, 6, 6) * 1.6 - 0.8  # inside [-1, 1]: the exact eps recovers it, no clipping
        xt, eps = _q_pair(sched, t, x0)
        z = torch.randn_like(xt)
        a = functional.reverse_step(xt, eps, torch.tensor(row), plain, noise=z)
        b = functional.reverse_step(xt, eps, torch.tensor(row), clipped, noise=z, clip=(-1.0, 1.0))
        torch.testing.assert_close(b, a, **tol("coeffs_forms", torch.float32))


def test_ddpm_coeffs_clipped_clips_x0(sched):
    ts = sched.timesteps(20)
    clipped = sched.ddpm_coeffs_clipped(ts, "posterior")
    row = 10
    t, prev = int(ts[row]), int(ts[row + 1])
    x0 = torch.rand(2, 3, 6, 6) * 4 - 2  # half the pixels outside [-1, 1]
    xt, eps = _q_pair(sched, t, x0)
    z = torch.randn_like(xt)
    got = functional.reverse_step(xt, eps, torch.tensor(row), clipped, noise=z, clip=(-1.0, 1.0))
    # Posterior mean with the clamped x0 (DDPM eq. 7), written out:
    a_t, a_p = ab(t), ab(prev)
    beta = 1 - a_t / a_p
    x0_hat = ((xt.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)).clamp(-1, 1)
    mean = math.sqrt(a_p) * beta / (1 - a_t) * x0_hat + math.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * xt.double()
    want = mean + math.sqrt(beta * (1 - a_p) / (1 - a_t)) * z.double()
    torch.testing.assert_close(got.double(), want, **tol("coeffs_forms", torch.float32))
    unclipped = functional.reverse_step(xt, eps, torch.tensor(row), sched.ddpm_coeffs(ts, "posterior"), noise=z)
    assert (got - unclipped).abs().max() > 1e-2


def test_posterior_variance(sched):
    ts = sched.timesteps(T)
    sigma = sched.ddpm_coeffs(ts, "posterior")[:, SIGMA].double()
    want = [math.sqrt(BETA[t] * (1 - ab(t - 1)) / (1 - ab(t))) for t in ts.tolist()]
    torch.testing.assert_close(sigma, torch.tensor(want, dtype=torch.float64), **tol("diffusion_fp32", torch.float32))
    assert sigma[-1] == 0.0  # t = 0: the posterior is a point mass


def test_paper_variant_has_no_noise_only_at_t0(sched):
    ts = sched.timesteps(T)
    paper, labml = sched.ddpm_coeffs(ts, "paper"), sched.ddpm_coeffs(ts, "labml")
    assert paper[-1, SIGMA] == 0.0 and labml[-1, SIGMA] > 0.0
    torch.testing.assert_close(labml[-1, SIGMA].double(), torch.tensor(math.sqrt(BETA[0]), dtype=torch.float64),
                               **tol("diffusion_fp32", torch.float32))
    torch.testing.assert_close(paper[:-1], labml[:-1], rtol=0, atol=0)
    # The noise-free last step ignores z entirely.
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    last = torch.tensor(T - 1)
    a = functional.reverse_step(x, eps, last, paper, noise=torch.randn(2, 3, 4, 4))
    b = functional.reverse_step(x, eps, last, paper, noise=torch.randn(2, 3, 4, 4))
    assert torch.equal(a, b)


def test_unknown_variant(sched):
    with pytest.raises(ValueError, match="variant"):
        sched.ddpm_coeffs([5, 0], "bogus")


# --------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------
def test_ddim_eta0_is_deterministic_and_the_hand_computed_step(sched):
    ts = sched.timesteps(10)
    coeffs = sched.ddim_coeffs(ts, eta=0.0)
    assert torch.all(coeffs[:, SIGMA] == 0)
    x = torch.randn(2, 3, 7, 9)
    for row in (0, 4, 9):
        t = int(ts[row])
        prev = int(ts[row + 1]) if row + 1 < len(ts) else -1
        eps = FixedEps()(x, torch.full((2,), t, dtype=torch.long))
        a = functional.reverse_step(x, eps, torch.tensor(row), coeffs, noise=torch.randn_like(x))
        b = functional.reverse_step(x, eps, torch.tensor(row), coeffs, noise=torch.randn_like(x))
        assert torch.equal(a, b)
        # Song et al. eq. 12 with sigma = 0.
        x0 = (x.double() - math.sqrt(1 - ab(t)) * eps.double()) / math.sqrt(ab(t))
        want = math.sqrt(ab(prev)) * x0 + math.sqrt(1 - ab(prev)) * eps.double()
        torch.testing.assert_close(a.double(), want, **tol("coeffs_forms", torch.float32))


def test_ddim_last_step_returns_predicted_x0(sched):
    ts = sched.timesteps(10)
    row = sched.ddim_coeffs(ts, 0.0)[-1].double()
    t = int(ts[-1])
    want = torch.tensor([1 / math.sqrt(ab(t)), -math.sqrt(1 - ab(t)) / math.sqrt(ab(t)), 1.0, 0.0, 0.0, 0.0],
                        dtype=torch.float64)
    torch.testing.assert_close(row, want, **tol("diffusion_fp32", torch.float32))


@pytest.mark.parametrize("n", [T, 25])
def test_ddim_eta1_sigma_is_the_ddpm_posterior_sigma(sched, n):
    ts = sched.timesteps(n)
    torch.testing.assert_close(sched.ddim_coeffs(ts, eta=1.0)[:, SIGMA], sched.ddpm_coeffs(ts, "posterior")[:, SIGMA],
                               **tol("diffusion_fp32", torch.float32))


def test_ddim_eta_scales_sigma(sched):
    ts = sched.timesteps(25)
    half, full = sched.ddim_coeffs(ts, 0.5), sched.ddim_coeffs(ts, 1.0)
    torch.testing.assert_close(half[:, SIGMA], 0.5 * full[:, SIGMA], **tol("diffusion_fp32", torch.float32))
    # prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps: the eps coefficient shrinks with sigma.
    assert torch.all(full[:-1, M_EPS] < half[:-1, M_EPS])
    for rows in (half, full):
        assert torch.all(rows[:, M_X] == 0) and torch.all(rows[:, M_X0] > 0)
        assert torch.all(rows[:, C_X0_X] >= 1) and torch.all(rows[:, C_X0_EPS] < 0)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_rejects_eta(sched, eta):
    with pytest.raises(ValueError, match="eta"):
        sched.ddim_coeffs(sched.timesteps(10), eta)


@pytest.mark.parametrize("ts,match", [([], "empty"), ([5, 5], "decreasing"), ([1000, 0], r"\[0, 999\]"),
                                      ([0, 5], "decreasing")])
def test_coeff_tables_reject_bad_timesteps(sched, ts, match):
    with pytest.raises(ValueError, match=match):
        sched.ddpm_coeffs(ts)
