# Fake of comfy/sd.py (ComfyUI 0.30.0): load_lora_for_models (as the real one: the key maps of the model and of
# the CLIP, convert_lora, load_lora, then a clone of each with add_patches at its strength), CLIP (a patcher around
# the text encoder; clone and add_patches go to the patcher) and VAE (decode: latent -> IMAGE [B, H, W, C] in 0..1).
# The text encoder and the VAE are tiny stand-ins with the real objects' interfaces.
import torch
from tiny_unet import CONTEXT
from torch import nn

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.ops


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, lora_metadata=None):
    key_map = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    lora = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora, key_map)
    if model is not None:
        new_modelpatcher = model.clone()
        new_modelpatcher.add_patches(loaded, strength_model)
    else:
        new_modelpatcher = None
    if clip is not None:
        new_clip = clip.clone()
        new_clip.add_patches(loaded, strength_clip)
    else:
        new_clip = None
    return (new_modelpatcher, new_clip)


class TinyTextEncoder(nn.Module):
    """transformer.text_model.* names as SD1.5's CLIP-L has them; a text becomes tokens by its characters."""

    def __init__(self, seed=5, tokens=5):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens = tokens
        self.transformer = nn.Module()
        self.transformer.text_model = nn.Module()
        self.transformer.text_model.embeddings = nn.Embedding(256, CONTEXT)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = comfy.ops.disable_weight_init.Linear(CONTEXT, CONTEXT)
        layer.mlp = nn.Module()
        layer.mlp.fc1 = comfy.ops.disable_weight_init.Linear(CONTEXT, CONTEXT)
        self.transformer.text_model.encoder = nn.Module()
        self.transformer.text_model.encoder.layers = nn.ModuleList([layer])
        for m in (layer.self_attn.q_proj, layer.mlp.fc1):
            nn.init.normal_(m.weight, std=0.3)
            nn.init.normal_(m.bias, std=0.1)

    def forward(self, text):
        ids = torch.tensor([[ord(ch) % 256 for ch in (text + " " * self.tokens)[: self.tokens]]])
        h = self.transformer.text_model.embeddings(ids)
        layer = self.transformer.text_model.encoder.layers[0]
        h = h + layer.self_attn.q_proj(h)
        return h + layer.mlp.fc1(torch.tanh(h))


class CLIP:
    def __init__(self, cond_stage_model=None, patcher=None):
        self.cond_stage_model = cond_stage_model if cond_stage_model is not None else TinyTextEncoder()
        device = comfy.model_management.get_torch_device()
        self.patcher = patcher if patcher is not None else comfy.model_patcher.ModelPatcher(
            self.cond_stage_model, load_device=device, offload_device=device)

    def clone(self):
        n = CLIP(self.cond_stage_model, self.patcher.clone())
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def encode(self, text):
        comfy.model_management.load_models_gpu([self.patcher])
        return self.cond_stage_model(text)


class TinyAutoencoder(nn.Module):
    """decode(z): the unscaled latent -> an image in [-1, 1], 8 times the latent's size."""

    def __init__(self, channels=4, seed=6):
        super().__init__()
        torch.manual_seed(seed)
        self.post_quant_conv = nn.Conv2d(channels, 3, 1)

    def decode(self, z):
        return torch.tanh(nn.functional.interpolate(self.post_quant_conv(z), scale_factor=8.0, mode="nearest"))


class VAE:
    def __init__(self, channels=4):
        self.first_stage_model = TinyAutoencoder(channels)

    def decode(self, samples_in):
        pixels = self.first_stage_model.decode(samples_in)
        return torch.clamp((pixels + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)
