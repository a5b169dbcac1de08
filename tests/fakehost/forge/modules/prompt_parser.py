# Fake of modules/prompt_parser.py (stable-diffusion-webui-forge dfdcbab6): reconstruct_multicond_batch,
# reconstruct_cond_batch and DictWithShape (SDXL's conds: a dict of tensors with the crossattn shape and
# advanced_indexing). Simplified: conds are already the batch ([B, tokens, width] tensors or a DictWithShape), one
# sub-prompt (no AND, no prompt editing) per image; the composition list has the real shape [[(row, weight)], ...].
import torch


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape

    def to(self, *args, **kwargs):
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                self[k] = self[k].to(*args, **kwargs)
        return self

    def advanced_indexing(self, item):
        result = {}
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                result[k] = self[k][item]
        return DictWithShape(result)


def reconstruct_multicond_batch(c, current_step):
    c = reconstruct_cond_batch(c, current_step)
    return [[(i, 1.0)] for i in range(c.shape[0])], c


def reconstruct_cond_batch(c, current_step):
    return DictWithShape(c) if isinstance(c, dict) else c
