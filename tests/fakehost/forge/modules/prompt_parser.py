# Fake of modules/prompt_parser.py (stable-diffusion-webui-forge dfdcbab6): reconstruct_multicond_batch and
# reconstruct_cond_batch. Simplified: conds are plain [B, tokens, width] tensors, one sub-prompt (no AND, no
# prompt editing) per image; the composition list has the real shape [[(row, weight)], ...].
def reconstruct_multicond_batch(c, current_step):
    return [[(i, 1.0)] for i in range(c.shape[0])], c


def reconstruct_cond_batch(c, current_step):
    return c
