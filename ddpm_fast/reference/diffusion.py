"""DDPM/DDIM math in plain PyTorch: the schedule, q_sample, labml's p_sample, the loss, and the
per-step coefficient tables that drive `reverse_step` for every sampler variant.

Conventions (labml): steps are 0-indexed, t in [0, T-1] (code t = 0 is the paper's t = 1);
beta = linspace(beta_start, beta_end, T) (or the config's other schedule, see DiffusionConfig.betas);
alpha = 1 - beta; alpha_bar = cumprod(alpha).
Everything is computed in float64 and stored float32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import DDPM_VARIANTS, DiffusionConfig
from .functional import C_X0_EPS, C_X0_X, M_EPS, M_X, M_X0, N_COEFFS, SIGMA

__all__ = ["DDPM_VARIANTS", "Schedule", "gather"]


def gather(consts: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """labml's gather: consts[t] reshaped to [B, 1, 1, 1] for broadcasting over images."""
    return consts.gather(-1, t).reshape(-1, 1, 1, 1)


class Schedule:
    """The fixed noise schedule. float64 masters (`*_64`) and float32 copies for the model's math."""

    def __init__(self, config: DiffusionConfig = DiffusionConfig(), device=None):
        self.config = config
        self.n_steps = config.n_steps
        if config.beta_schedule == "linear" and config.trained_betas is None:
            self.beta_64 = torch.linspace(config.beta_start, config.beta_end, config.n_steps, dtype=torch.float64)
        else:
            self.beta_64 = torch.tensor(config.betas(), dtype=torch.float64)
        self.alpha_64 = 1.0 - self.beta_64
        self.alpha_bar_64 = torch.cumprod(self.alpha_64, dim=0)
        self.beta = self.beta_64.to(device=device, dtype=torch.float32)
        self.alpha = self.alpha_64.to(device=device, dtype=torch.float32)
        self.alpha_bar = self.alpha_bar_64.to(device=device, dtype=torch.float32)
        self.sigma2 = self.beta

    def to(self, device) -> "Schedule":
        return Schedule(self.config, device)

    # -- training side -----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) with the given eps."""
        ab = gather(self.alpha_bar.to(x0.device), t)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def loss(self, model, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """labml's simple loss: MSE(eps, model(q_sample(x0, t, eps), t)), t ~ U{0..T-1} per sample."""
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.n_steps, (b,), generator=generator, device="cpu").to(x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t), eps)

    # -- labml's sampling step, literally ---------------------------------------------------
    def p_sample(self, model, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """labml p_sample: mean = (x_t - beta/sqrt(1-alpha_bar) eps)/sqrt(alpha); + sqrt(beta) z, t = 0 too."""
        eps = model(x_t, t)
        d = x_t.device
        ab, a = gather(self.alpha_bar.to(d), t), gather(self.alpha.to(d), t)
        eps_coef = (1 - a) / (1 - ab) ** 0.5
        mean = 1 / (a ** 0.5) * (x_t - eps_coef * eps)
        var = gather(self.sigma2.to(d), t)
        return mean + (var ** 0.5) * z

    # -- sampler tables ---------------------------------------------------------------------
    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Descending steps for a sampler of S steps: every T // S-th step ending at 0 (S = T: all)."""
        s, t_max = num_inference_steps, self.n_steps
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"num_inference_steps must be an int, got {s!r}")
        if not 1 <= s <= t_max:
            raise ValueError(f"num_inference_steps must be in [1, {t_max}] (the schedule's T), got {s}")
        stride = t_max // s
        return (torch.arange(s, dtype=torch.long) * stride).flip(0)

    def ddpm_coeffs(self, timesteps: Sequence[int] | torch.Tensor, variant: str = "labml") -> torch.Tensor:
        """[S, 6] float32 rows for DDPM ancestral steps t -> t_prev (strided schedules too).

        labml:     mean from eps as in p_sample, sigma^2 = beta, noise at every step (t = 0 too).
        paper:     same mean and sigma^2 = beta, but no noise at the last step (Algorithm 2).
        posterior: sigma^2 = beta_tilde = beta (1 - alpha_bar_prev) / (1 - alpha_bar_t), 0 at t = 0.
        For a strided schedule, alpha_t and beta_t are the effective ones between t and t_prev.
        The x0 columns carry the posterior-mean form so that x0 clipping can apply; without clipping,
        prev = m_x x_t + m_eps eps exactly as labml writes it.
        """
        if variant not in DDPM_VARIANTS:
            raise ValueError(f"unknown DDPM variant {variant!r}; choose one of {DDPM_VARIANTS}")
        ts, ab_t, ab_prev = self._pairs(timesteps)
        alpha = ab_t / ab_prev
        beta = 1.0 - alpha
        rows = torch.zeros(len(ts), N_COEFFS, dtype=torch.float64)
        rows[:, M_X] = 1.0 / alpha.sqrt()
        rows[:, M_EPS] = -beta / ((1.0 - ab_t).sqrt() * alpha.sqrt())
        if variant == "posterior":
            rows[:, SIGMA] = (beta * (1.0 - ab_prev) / (1.0 - ab_t)).sqrt()
        else:
            rows[:, SIGMA] = beta.sqrt()
            if variant == "paper":
                rows[-1, SIGMA] = 0.0 if int(ts[-1]) == 0 else rows[-1, SIGMA]
        return rows.to(torch.float32)

    def ddpm_coeffs_clipped(self, timesteps, variant: str = "labml") -> torch.Tensor:
        """DDPM rows in the x0 form: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab), clipped by the kernel,
        then the posterior mean coef1 x0 + coef2 x_t (identical to the eps form when nothing clips)."""
        rows = self.ddpm_coeffs(timesteps, variant).to(torch.float64)
        ts, ab_t, ab_prev = self._pairs(timesteps)
        beta = 1.0 - ab_t / ab_prev
        rows[:, C_X0_X] = 1.0 / ab_t.sqrt()
        rows[:, C_X0_EPS] = -(1.0 - ab_t).sqrt() / ab_t.sqrt()
        rows[:, M_X0] = ab_prev.sqrt() * beta / (1.0 - ab_t)
        rows[:, M_X] = (ab_t / ab_prev).sqrt() * (1.0 - ab_prev) / (1.0 - ab_t)
        rows[:, M_EPS] = 0.0
        return rows.to(torch.float32)

    def ddim_coeffs(self, timesteps, eta: float = 0.0) -> torch.Tensor:
        """[S, 6] rows for DDIM (Song et al. 2021, eq. 12): x0 from eps, then
        prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)."""
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ts, ab_t, ab_prev = self._pairs(timesteps)
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t)).sqrt() * (1.0 - ab_t / ab_prev).sqrt()
        rows = torch.zeros(len(ts), N_COEFFS, dtype=torch.float64)
        rows[:, C_X0_X] = 1.0 / ab_t.sqrt()
        rows[:, C_X0_EPS] = -(1.0 - ab_t).sqrt() / ab_t.sqrt()
        rows[:, M_X0] = ab_prev.sqrt()
        rows[:, M_EPS] = (1.0 - ab_prev - sigma ** 2).clamp_min(0.0).sqrt()
        rows[:, SIGMA] = sigma
        return rows.to(torch.float32)

    def _pairs(self, timesteps):
        ts = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
        if ts.numel() == 0:
            raise ValueError("timesteps must not be empty")
        if int(ts.min()) < 0 or int(ts.max()) >= self.n_steps:
            raise ValueError(f"timesteps must lie in [0, {self.n_steps - 1}]")
        if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("timesteps must be strictly decreasing")
        ab = self.alpha_bar_64
        ab_t = ab[ts]
        prev = torch.cat([ts[1:], torch.tensor([-1])])
        ab_prev = torch.where(prev >= 0, ab[prev.clamp_min(0)], torch.ones((), dtype=torch.float64))
        return ts, ab_t, ab_prev

