"""The UNet-shaped models the benchmarks run: diffusers UNets with SD1.5's and SDXL's real layer shapes and random
weights, their inputs, and the layers two LoRAs patch in them."""

from __future__ import annotations

import torch
from torch import nn

_COMMON = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32)
CONFIGS = {
    "sd15": dict(
        _COMMON, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        _COMMON, sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# kohya's LoCon targets (networks/lora.py with conv_dim): every Linear and Conv2d inside the transformer blocks,
# the resnets and the down/up samplers; not the time embedding, conv_in or conv_out.
LOCON_PARENTS = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")


def build_unet(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**CONFIGS[model]).to(device=device, dtype=dtype).eval().requires_grad_(False)


def unet_inputs(model: str, size: int, batch: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    latent = size // 8
    context_dim = CONFIGS[model]["cross_attention_dim"]
    inputs = dict(
        sample=torch.randn(batch, 4, latent, latent, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, context_dim, generator=g),
    )
    config = CONFIGS[model]
    if config.get("addition_embed_type") == "text_time":  # SDXL: the pooled text embedding and six size numbers
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=g),
                                           time_ids=torch.tensor([[size, size, 0, 0, size, size]] * batch).float())
    return _move(inputs, device, dtype)


def _move(value, device, dtype):
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    return value


def lora_layers(unet: nn.Module, which: str = "all") -> dict[str, nn.Module]:
    """The layers two LoRAs patch: ``all`` those a kohya LoCon LoRA touches, or the attention projections."""
    if which == "attention":
        return {name: m for name, m in unet.named_modules() if name.endswith(ATTENTION_PROJECTIONS) and ".attn" in name}
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(part in name for part in LOCON_PARENTS)}
