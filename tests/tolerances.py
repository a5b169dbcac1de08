"""Tolerances for comparing two fp32 results of the same arithmetic done in another order.

A UNet run as one batch of two and as two batches of one, or with a LoRA merged into the weight instead of added
to the layer output, computes the same sums in another order: the BLAS kernels block a product differently for
each shape and processor, so the results may differ in their last bits, and those differences travel through
every later layer and step. Exact equality is for computations done the same way; a reordered one is held to
what fp32 guarantees for its sizes:

* one dot product of ``terms`` rounded products, summed in another order, moves by at most ``terms * u`` of the
  magnitude of its terms (u = 2^-24, the unit roundoff; Higham, *Accuracy and Stability of Numerical Algorithms*,
  §3.1), and in practice by about ``sqrt(terms) * u``, since the roundings are independent (Higham and Mary,
  SIAM J. Sci. Comput. 2019);
* a value that passes through ``depth`` such products in sequence (the layers of every step) collects one such
  difference per product, and independent differences add in quadrature: ``sqrt(depth * terms) * u`` in all;
* the sampler scales the latents by its sigmas, so the differences are relative to the largest value compared.

Four times that, ``4 * sqrt(depth * terms) * u * max|expected|``, is the tolerance: about twenty times the
largest difference measured between two orders on AMD and Intel processors (3.3e-4 on the fake AUTOMATIC1111's
latents), and a five-hundredth of what a LoRA applied 1 % too strongly changes in the same latents (3.9).
"""

from __future__ import annotations

import math

import torch
from torch import nn

UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, depth: int) -> None:
    """``actual`` equals ``expected``, an fp32 result computed in another order, within what fp32 guarantees: each
    value went through ``depth`` products in sequence, each a sum of at most ``terms`` terms."""
    scale = float(expected.detach().abs().max())
    # Below the smallest normal number fp32 keeps no relative precision: a difference that small is not one.
    atol = 4 * math.sqrt(depth * terms) * UNIT_ROUNDOFF * scale + torch.finfo(torch.float32).smallest_normal
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)


def assert_sampled_close(actual: torch.Tensor, expected: torch.Tensor, model: nn.Module, steps: int) -> None:
    """:func:`assert_reordered_close` for latents ``[..., H, W]`` sampled over ``steps`` steps by ``model``: per step a value
    goes through at most as many products as the model has weighted layers, and the widest sum is a layer's input
    (a linear layer's features, a convolution's channels times its kernel) or an attention's sum over the latent's
    H * W tokens."""
    # Any module with a linear or convolution weight: the hosts' own layer classes need not be torch's.
    weights = [w for m in model.modules() if isinstance(w := getattr(m, "weight", None), torch.Tensor)
               and w.dim() in (2, 4)]
    widest = max(w[0].numel() for w in weights)
    tokens = expected.shape[-2] * expected.shape[-1]
    assert_reordered_close(actual, expected, terms=max(widest, tokens), depth=steps * len(weights))
