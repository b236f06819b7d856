"""Models of the magnitude distribution of gradient coordinates (design note §3 and §4).

A model is fitted per row of a (rows, n) tensor (from the row and its mean magnitude) and answers,
in closed form, the integrals the threshold objectives need. `params` has the model's parameters in
its last dimension and any batch dimensions before, which broadcast against the argument `a`.
Everything is a torch tensor on the gradient's device: fitting and solving never copy a value to the
host.
"""
from __future__ import annotations

import math

import torch

# Fitting looks at a strided sample at most this large: quantiles and Hill's estimator converge
# long before, and kthvalue on tens of millions of elements would dominate the encode time.
FIT_SAMPLE = 1 << 16
_TINY = 1e-30


def _sample_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """|x| of each row at FIT_SAMPLE evenly strided positions at most, NaN and Inf read as 0."""
    sample = x[..., :: max(1, x.shape[-1] // FIT_SAMPLE)].abs()
    return torch.where(torch.isfinite(sample), sample, 0.0)


class Laplace:
    """p(g) = exp(-|g| / gamma) / (2 gamma); gamma = mean |g| (maximum likelihood)."""

    id = 1
    name = "laplace"

    @staticmethod
    def fit(x: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
        return mean_abs.clamp_min(_TINY).unsqueeze(-1)

    @staticmethod
    def mass(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """P(|g| <= a)."""
        return -torch.expm1(-a / params[..., 0])

    @staticmethod
    def truncation_error(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """INT_{|g|>a} (|g| - a)^2 p(g) dg."""
        gamma = params[..., 0]
        return 2 * gamma * gamma * torch.exp(-a / gamma)

    @staticmethod
    def root_mass(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """INT_0^a p(g)^(1/3) dg (one side)."""
        gamma = params[..., 0]
        return (2 * gamma) ** (-1 / 3) * 3 * gamma * -torch.expm1(-a / (3 * gamma))

    @staticmethod
    def root_mass_inverse(params: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The x >= 0 with root_mass(x) = m."""
        gamma = params[..., 0]
        return -3 * gamma * torch.log1p(-m * (2 * gamma) ** (1 / 3) / (3 * gamma))


class PowerLaw:
    """Flat body up to g0 and a Pareto tail: p = c for |g| <= g0, c (g0/|g|)^rho beyond.

    g0 is the `quantile` of |g|; rho comes from Hill's estimator on the values above g0 and is
    clamped to [RHO_MIN, RHO_MAX] (the truncation error is finite only for rho > 3).
    """

    id = 2
    name = "powerlaw"
    quantile = 0.9
    RHO_MIN = 3.1
    RHO_MAX = 50.0

    @classmethod
    def fit(cls, x: torch.Tensor, mean_abs: torch.Tensor) -> torch.Tensor:
        sample = _sample_magnitudes(x)
        size = sample.shape[-1]
        k = max(1, min(size, math.ceil(cls.quantile * size)))
        g0 = sample.kthvalue(k, dim=-1, keepdim=True).values.clamp_min(_TINY)
        above = sample > g0
        log_excess = torch.where(above, torch.log(sample.clamp_min(_TINY) / g0), torch.zeros_like(sample))
        count = above.sum(dim=-1).to(sample.dtype)
        rho = 1 + count / log_excess.sum(dim=-1).clamp_min(_TINY)
        return torch.stack([g0.squeeze(-1), rho.clamp(cls.RHO_MIN, cls.RHO_MAX)], dim=-1)

    @staticmethod
    def _body_height(g0: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        return (rho - 1) / (2 * rho * g0)

    @classmethod
    def mass(cls, params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        g0, rho = params[..., 0], params[..., 1]
        body = 2 * cls._body_height(g0, rho) * a
        tail = 1 - (g0 / a.clamp_min(_TINY)) ** (rho - 1) / rho
        return torch.where(a <= g0, body, tail)

    @classmethod
    def truncation_error(cls, params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        g0, rho = params[..., 0], params[..., 1]
        c = cls._body_height(g0, rho)
        tail = 4 * c * g0 ** rho * a.clamp_min(_TINY) ** (3 - rho) / ((rho - 1) * (rho - 2) * (rho - 3))
        body = 2 * c * ((g0 - a) ** 3 / 3 + g0 ** 3 / (rho - 3) - 2 * a * g0 ** 2 / (rho - 2)
                        + a * a * g0 / (rho - 1))
        return torch.where(a >= g0, tail, body)

    @classmethod
    def root_mass(cls, params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        g0, rho = params[..., 0], params[..., 1]
        t = a / g0
        shape = torch.where(t <= 1, t, 1 + 3 / (rho - 3) * (1 - t.clamp_min(1) ** (-(rho - 3) / 3)))
        return cls._body_height(g0, rho) ** (1 / 3) * g0 * shape

    @classmethod
    def root_mass_inverse(cls, params: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        g0, rho = params[..., 0], params[..., 1]
        shape = m / (cls._body_height(g0, rho) ** (1 / 3) * g0)
        base = (1 - (shape - 1) * (rho - 3) / 3).clamp_min(_TINY)
        return g0 * torch.where(shape <= 1, shape, base ** (-3 / (rho - 3)))


TAILS = {model.name: model for model in (Laplace, PowerLaw)}
TAILS_BY_ID = {model.id: model for model in (Laplace, PowerLaw)}
