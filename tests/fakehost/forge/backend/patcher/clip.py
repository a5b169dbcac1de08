# Fake of backend/patcher/clip.py (stable-diffusion-webui-forge dfdcbab6): CLIP with .patcher, .cond_stage_model,
# .tokenizer and clone(). Simplified: a tiny byte-level text encoder stands in for CLIP-L.
import torch

from backend.patcher.base import ModelPatcher


class TinyTextEncoder(torch.nn.Module):
    tokens = 8

    def __init__(self, width=16):
        super().__init__()
        self.embedding = torch.nn.Embedding(256, width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, prompts):
        ids = [list(p.encode("utf-8")[:self.tokens].ljust(self.tokens, b" ")) for p in prompts]
        return self.proj(self.embedding(torch.tensor(ids)))


class CLIP:
    def __init__(self, model=None, tokenizer=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = model
        self.tokenizer = tokenizer
        self.patcher = ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
