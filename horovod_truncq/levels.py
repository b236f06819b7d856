"""Thresholds and level grids of the truncated schemes (design note §1, §2).

Each scheme minimises its per-coordinate error E(a) = quantization variance + truncation error
under the fitted tail model. The minimum is found by a coarse-to-fine search on a log grid of
candidate thresholds between a floor and max|g| (a threshold above the largest magnitude only adds
variance), entirely in tensor operations, so it stays on the gradient's device without a host sync.
Every function takes batch dimensions in front (one threshold per row of a batch of chunks):
`params` is (..., k), `amax` and the thresholds are (...), levels are (..., s + 1).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

Objective = Callable[[torch.Tensor], torch.Tensor]

GRID_POINTS = 64
GRID_ROUNDS = 4
SEARCH_DECADES = 8  # candidates span [max|g| * 1e-8, max|g|]


def _refine_bounds(grid: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    last = grid.shape[-1] - 1
    lo = grid.gather(-1, (best - 1).clamp(0, last).unsqueeze(-1)).squeeze(-1)
    hi = grid.gather(-1, (best + 1).clamp(0, last).unsqueeze(-1)).squeeze(-1)
    return lo, hi


def minimize_threshold(objective: Objective, amax: torch.Tensor) -> torch.Tensor:
    """argmin of objective(a) over a in [amax * 1e-8, amax], to about 1e-6 relative precision.
    `objective` takes candidates of shape (..., GRID_POINTS)."""
    hi = amax.clamp_min(1e-30)
    lo = hi * 10.0 ** -SEARCH_DECADES
    steps = torch.linspace(0, 1, GRID_POINTS, device=amax.device, dtype=amax.dtype)
    for _ in range(GRID_ROUNDS):
        grid = lo.unsqueeze(-1) * (hi / lo).unsqueeze(-1) ** steps
        best = torch.nan_to_num(objective(grid), nan=float("inf")).argmin(dim=-1)
        lo, hi = _refine_bounds(grid, best)
    return torch.sqrt(lo * hi)


@functools.lru_cache(maxsize=None)
def _lambert_w(x: float) -> float:
    """W(x) for x >= 0 (Newton's method on w e^w = x)."""
    w = math.log1p(x)
    for _ in range(100):
        w -= (w * math.exp(w) - x) / (math.exp(w) * (w + 1))
    return w


def laplace_uniform_threshold(gamma: torch.Tensor, s: int) -> torch.Tensor:
    """TUQSGD under the Laplace model, closed form (design note §3): a* = gamma W(s^2)."""
    return gamma * _lambert_w(float(s * s))


def laplace_nonuniform_threshold(gamma: torch.Tensor, s: int) -> torch.Tensor:
    """TNQSGD under the Laplace model, closed form (design note §3): a* = 3 gamma ln(1 + sqrt(6) s / 9)."""
    return 3 * gamma * math.log1p(math.sqrt(6) * s / 9)


def uniform_threshold(tail, params: torch.Tensor, amax: torch.Tensor, s: int) -> torch.Tensor:
    """TUQSGD: minimise (a/s)^2 + truncation error (worst-case variance of a uniform grid)."""
    per_candidate = params.unsqueeze(-2)
    return minimize_threshold(lambda a: (a / s) ** 2 + tail.truncation_error(per_candidate, a), amax)


def nonuniform_threshold(tail, params: torch.Tensor, amax: torch.Tensor, s: int) -> torch.Tensor:
    """TNQSGD: minimise (INT_{-a}^{a} p^(1/3))^3 / (4 s^2) + truncation error (levels ~ p^(1/3))."""
    per_candidate = params.unsqueeze(-2)
    return minimize_threshold(lambda a: (2 * tail.root_mass(per_candidate, a)) ** 3 / (4 * s * s)
                              + tail.truncation_error(per_candidate, a), amax)


def biscaled_error(tail, params: torch.Tensor, c: torch.Tensor, a: torch.Tensor,
                   s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TBQSGD error A/s1^2 + B/s2^2 + truncation error, A and B as in design note §2, and its s1.

    The continuous optimum s1 : s2 = A^(1/3) : B^(1/3) is rounded to the better of its two odd
    neighbours in [1, s - 2], so the error is that of a grid that can actually be built.
    """
    inner = tail.mass(params, c)
    fine = c * c * inner
    coarse = (a - c) ** 2 * (tail.mass(params, a) - inner).clamp_min(0)
    root_fine, root_coarse = fine ** (1 / 3), coarse ** (1 / 3)
    share = torch.where(root_fine + root_coarse > 0, root_fine / (root_fine + root_coarse), torch.ones_like(fine))
    below = (torch.floor((share * s - 1) / 2) * 2 + 1).clamp(1, s - 2)
    above = (below + 2).clamp(1, s - 2)
    err_below = fine / below ** 2 + coarse / (s - below) ** 2
    err_above = fine / above ** 2 + coarse / (s - above) ** 2
    s1 = torch.where(err_above < err_below, above, below)
    return torch.minimum(err_below, err_above) + tail.truncation_error(params, a), s1


def biscaled_threshold(tail, params: torch.Tensor, amax: torch.Tensor, s: int) -> torch.Tensor:
    """TBQSGD: [a, c, s1] (last dimension) minimising `biscaled_error` (s1 odd, s2 = s - s1 even and
    >= 2). Searches a on a log grid and c = f * a with f in (0, 1), refining both around the best cell.
    """
    hi = amax.clamp_min(1e-30)
    lo = hi * 10.0 ** -SEARCH_DECADES
    f_lo, f_hi = torch.zeros_like(hi), torch.ones_like(hi)
    steps = torch.linspace(0, 1, GRID_POINTS, device=amax.device, dtype=amax.dtype)
    per_cell = params.unsqueeze(-2).unsqueeze(-2)
    for _ in range(GRID_ROUNDS):
        a_grid = lo.unsqueeze(-1) * (hi / lo).unsqueeze(-1) ** steps
        f_grid = f_lo.unsqueeze(-1) + (f_hi - f_lo).unsqueeze(-1) * steps
        c_grid = a_grid.unsqueeze(-1) * f_grid.unsqueeze(-2)
        err, _ = biscaled_error(tail, per_cell, c_grid, a_grid.unsqueeze(-1), s)
        best = torch.nan_to_num(err, nan=float("inf")).flatten(-2).argmin(dim=-1)
        lo, hi = _refine_bounds(a_grid, best // GRID_POINTS)
        f_lo, f_hi = _refine_bounds(f_grid, best % GRID_POINTS)
    a = torch.sqrt(lo * hi)
    c = a * (f_lo + f_hi) / 2
    _, s1 = biscaled_error(tail, params, c, a, s)
    return torch.stack([a, c, s1], dim=-1)


def step_rounded_up(span: torch.Tensor, intervals: int) -> torch.Tensor:
    """span / intervals in float32, rounded up where needed so that intervals * step >= span: a grid
    j * step clamped to span then ends exactly at span."""
    step = span.float() / intervals
    return torch.where(step * intervals < span, torch.nextafter(step, torch.full_like(step, math.inf)), step)


def uniform_levels(a: torch.Tensor, s: int) -> torch.Tensor:
    """s + 1 equally spaced float32 levels on [-a, a]: (2 j - s) h clamped to [-a, a], h = a / s
    rounded up so that the clamp makes the ends exactly -a and a. Each level is one rounded
    product, so a decoder that computes it from h and a (kernels.grid_values) gets the same float,
    and the levels are exactly antisymmetric."""
    a = a.float()
    h = step_rounded_up(a, s)
    j = torch.arange(s + 1, device=a.device, dtype=torch.float32)
    end = a.unsqueeze(-1)
    return torch.minimum(torch.maximum((2 * j - s) * h.unsqueeze(-1), -end), end)


def nonuniform_levels(tail, params: torch.Tensor, a: torch.Tensor, s: int) -> torch.Tensor:
    """Levels l_j = G^-1(j/s) for the density lambda ~ p^(1/3) on [-a, a] (symmetric)."""
    u = torch.arange(s + 1, device=a.device, dtype=torch.float32) * (2.0 / s) - 1
    magnitude = tail.root_mass_inverse(params.unsqueeze(-2), u.abs() * tail.root_mass(params, a).unsqueeze(-1))
    return _antisymmetric(torch.sign(u) * torch.minimum(magnitude, a.unsqueeze(-1)), a)


def biscaled_levels(a: torch.Tensor, c: torch.Tensor, s1: torch.Tensor, s: int) -> torch.Tensor:
    """Coarse grid on [-a, -c], s1 fine intervals on [-c, c], coarse grid on [c, a]."""
    j = torch.arange(s + 1, device=a.device, dtype=torch.float32)
    a, c, s1 = a.unsqueeze(-1), c.unsqueeze(-1), s1.unsqueeze(-1)
    half = (s - s1) / 2
    left = -a + (a - c) * j / half
    fine = -c + 2 * c * (j - half) / s1
    right = c + (a - c) * (j - half - s1) / half
    return _antisymmetric(torch.where(j < half, left, torch.where(j <= half + s1, fine, right)), a.squeeze(-1))


def _antisymmetric(levels: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The levels made exactly antisymmetric (levels[s - j] == -levels[j], the lower half mirrored
    from the upper one), so that encoding can round |g| on the upper half alone, with the end levels
    exactly -a and a, so that constant tensors (a = |value|) come back exactly."""
    upper = levels[..., levels.shape[-1] // 2:].clone()
    upper[..., -1] = a
    return torch.cat([-upper.flip(-1), upper], dim=-1)
