"""The world's text encoder: one token per word, token and position embeddings, a small transformer.

``sks`` and ``zwx`` are in the vocabulary but never in the base model's captions, so their embeddings keep their
random initial values: rare tokens, as in Stable Diffusion, that only the LoRAs give a meaning to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lib_dynfuse.quality.world import OBJECTS, SIZES, STYLES

VOCABULARY = ("<pad>", "a", ",", "style") + SIZES + OBJECTS + STYLES
MAX_TOKENS = 8
WIDTH = 64


def tokenize(prompts: Sequence[str]) -> Tensor:
    """Token ids ``[B, 8]``; the empty prompt is all padding (the unconditional input)."""
    index = {word: i for i, word in enumerate(VOCABULARY)}
    rows = []
    for prompt in prompts:
        words = prompt.replace(",", " , ").split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(f"the world's text encoder does not know {', '.join(map(repr, unknown))}; "
                             f"it knows: {' '.join(VOCABULARY[1:])}")
        if len(words) > MAX_TOKENS:
            raise ValueError(f"prompt {prompt!r} is longer than {MAX_TOKENS} words")
        rows.append([index[w] for w in words] + [0] * (MAX_TOKENS - len(words)))
    return torch.tensor(rows, dtype=torch.long)


class TextEncoder(nn.Module):
    def __init__(self, width: int = WIDTH, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(len(VOCABULARY), width)
        self.position_embedding = nn.Parameter(torch.zeros(MAX_TOKENS, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        """Hidden states ``[B, 8, width]``: the UNet's cross-attention context."""
        h = self.token_embedding(tokens) + self.position_embedding
        return self.final_norm(self.encoder(h))

    def encode(self, prompts: Sequence[str]) -> Tensor:
        device = self.position_embedding.device
        return self(tokenize(prompts).to(device))
