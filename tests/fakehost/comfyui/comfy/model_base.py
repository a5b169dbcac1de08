# Fake of comfy/model_base.py (ComfyUI 0.30.0): BaseModel holds the `diffusion_model` (so model keys read
# "diffusion_model.<path>"), the latent format and the model sampling; `apply_model` runs the APPLY_MODEL wrappers
# found in the call's transformer_options around `_apply_model`, which scales the input for the sigma, calls the
# diffusion model with `transformer_options` and turns its output into the x0 estimate.
# The diffusion models are stand-ins: tests/tiny_unet.py's SD1.5-named UNet (for SD15 and SDXL) and a tiny
# Flux-named DiT with fused qkv / linear1 weights, both built of comfy.ops layers as ComfyUI builds its models.
import torch
import torch.nn.functional as F
from tiny_unet import CONTEXT, TinyUNet
from torch import nn

import comfy.latent_formats
import comfy.ops
import comfy.patcher_extension


class ModelSamplingDiscrete(nn.Module):
    """EPS prediction over a sigma schedule (the real one derives its sigmas from the betas)."""

    def __init__(self, sigma_min=0.03, sigma_max=2.0):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(sigma_min, sigma_max, 1000))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image):
        return noise * sigma + latent_image


class TinyLdmUNet(nn.Module):
    """tests/tiny_unet.TinyUNet's layers, paths and forward, its layers made comfy.ops layers."""

    def __init__(self, operations, seed=0):
        super().__init__()
        tiny = TinyUNet(seed)
        for name, child in tiny.unet.named_children():
            self.add_module(name, child)
        for module in self.modules():
            if type(module) is nn.Linear:
                module.__class__ = operations.Linear
            elif type(module) is nn.Conv2d:
                module.__class__ = operations.Conv2d

    @property
    def unet(self):
        return self

    layer = TinyUNet.layer
    _attention = TinyUNet._attention

    def forward(self, x, timesteps=None, context=None, transformer_options={}, **kwargs):
        return TinyUNet.forward(self, x, context)


class TinyFluxBlock(nn.Module):
    pass


class TinyFluxDiT(nn.Module):
    """Flux's layer names and fused weights: double_blocks.N.img_attn.qkv (q, k, v side by side), its proj, the
    text stream's txt_attn.qkv, single_blocks.N.linear1 (q, k, v, then the MLP input) and linear2."""

    def __init__(self, operations, seed=0, hidden_size=8, mlp=16, channels=16, depth=1, depth_single=1):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_size = hidden_size
        ops = operations
        self.img_in = ops.Linear(channels, hidden_size)
        self.txt_in = ops.Linear(CONTEXT, hidden_size)
        self.double_blocks = nn.ModuleList()
        for _ in range(depth):
            block = TinyFluxBlock()
            block.img_attn = TinyFluxBlock()
            block.img_attn.qkv = ops.Linear(hidden_size, 3 * hidden_size)
            block.img_attn.proj = ops.Linear(hidden_size, hidden_size)
            block.txt_attn = TinyFluxBlock()
            block.txt_attn.qkv = ops.Linear(hidden_size, 3 * hidden_size)
            self.double_blocks.append(block)
        self.single_blocks = nn.ModuleList()
        for _ in range(depth_single):
            block = TinyFluxBlock()
            block.linear1 = ops.Linear(hidden_size, 3 * hidden_size + mlp)
            block.linear2 = ops.Linear(hidden_size + mlp, hidden_size)
            self.single_blocks.append(block)
        self.final_layer = TinyFluxBlock()
        self.final_layer.linear = ops.Linear(hidden_size, channels)
        # comfy.ops layers skip initialisation (ComfyUI loads every weight from the checkpoint): a random checkpoint
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.normal_(0.0, 0.3 if name.endswith("weight") else 0.05)

    def forward(self, x, timesteps=None, context=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt = self.txt_in(context)
        n = self.hidden_size
        for block in self.double_blocks:
            q, k, v = block.img_attn.qkv(img).split(n, dim=-1)
            tq, tk, tv = block.txt_attn.qkv(txt).split(n, dim=-1)
            attn = F.scaled_dot_product_attention(q, torch.cat([tk, k], 1), torch.cat([tv, v], 1))
            img = img + block.img_attn.proj(attn)
        for block in self.single_blocks:
            q, k, v, mlp = block.linear1(img).split([n, n, n, block.linear1.out_features - 3 * n], dim=-1)
            attn = F.scaled_dot_product_attention(q, k, v)
            img = img + block.linear2(torch.cat([attn, F.gelu(mlp)], -1))
        return self.final_layer.linear(img).transpose(1, 2).reshape(b, c, h, w)


class BaseModel(nn.Module):
    latent_format_class = comfy.latent_formats.SD15

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.latent_format = self.latent_format_class()
        self.model_sampling = ModelSamplingDiscrete()
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._apply_model, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                     transformer_options),
        ).execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        model_output = self.diffusion_model(xc, t, context=c_crossattn, control=control,
                                            transformer_options=transformer_options).float()
        return self.model_sampling.calculate_denoised(sigma, model_output, x)

    def process_latent_in(self, latent):
        return self.latent_format.process_in(latent)

    def process_latent_out(self, latent):
        return self.latent_format.process_out(latent)

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def memory_required(self, input_shape, cond_shapes={}):
        return 0


class SD15(BaseModel):
    latent_format_class = comfy.latent_formats.SD15


class SDXL(BaseModel):
    latent_format_class = comfy.latent_formats.SDXL


class Flux(BaseModel):
    latent_format_class = comfy.latent_formats.Flux
