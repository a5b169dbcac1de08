"""Conversions between epsilon predictions and x0 estimates (VP / DDPM parametrisation).

Timestep samplers (A1111's DDIM, PLMS, UniPC) hand the CFG callbacks epsilon predictions for x_t with
``x_t = sqrt(abar) * x0 + sqrt(1 - abar) * eps``. Guidance works on x0; these helpers move between the two
with x_t held fixed. ``alpha_bar`` is a float or one value per row.
"""
from __future__ import annotations

import torch


def _per_row(alpha_bar: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=like.device)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() > 0 else a


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar) * eps) / sqrt(abar), in fp32."""
    a = _per_row(alpha_bar, x_t)
    return (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """The epsilon that, with the same x_t, gives x0: eps = (x_t - sqrt(abar) * x0) / sqrt(1 - abar), fp32."""
    a = _per_row(alpha_bar, x_t)
    return (x_t.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()


def shift_eps(eps: torch.Tensor, delta_x0: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """The epsilon whose x0 estimate moved by ``delta_x0`` (x_t fixed):
    eps' = eps - sqrt(abar) / sqrt(1 - abar) * delta_x0. Keeps eps's dtype."""
    a = _per_row(alpha_bar, eps)
    return (eps.float() - a.sqrt() / (1 - a).sqrt() * delta_x0.float()).to(eps.dtype)


__all__ = ["eps_from_x0", "shift_eps", "x0_from_eps"]
