# Not a Forge Neo file: the small pieces the fake families share (Neo's own files import them from backend/nn/flux.py
# and backend/attention.py): joint attention over [batch, heads, tokens, head width] with rope, 2x2 patches of a
# 4-D latent, and a seeded rotary embedding of token positions.
import torch

from backend.nn.flux import EmbedND, apply_rope, timestep_embedding  # noqa: F401 - re-exported for the families


def attend(q, k, v, pe=None):
    """q, k, v: [B, H, N, D] (k and v may have fewer heads: grouped-query attention) -> [B, N, H * D]."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def heads(x, count):
    """[B, N, count * D] -> [B, count, N, D]."""
    b, n, _ = x.shape
    return x.view(b, n, count, -1).transpose(1, 2)


def patchify(x, patch=2):
    """[B, C, H, W] (H, W multiples of ``patch``) -> [B, H/p * W/p, C * p * p] tokens."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens, shape, patch=2):
    b, c, h, w = shape
    return tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def positions(batch, txt, h, w, device):
    """Rope ids (3 axes) of ``txt`` text tokens then an h x w grid of image tokens."""
    ids = torch.zeros(batch, txt + h * w, 3, device=device)
    ids[:, :txt, 0] = torch.arange(txt, device=device, dtype=torch.float32)
    ids[:, txt:, 1] = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    ids[:, txt:, 2] = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return ids
