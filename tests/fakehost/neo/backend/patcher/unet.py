# Fake of backend/patcher/unet.py (Forge Neo 2.26): UnetPatcher on Neo's ModelPatcher.
# Kept: from_model(model, diffusers_scheduler, config, *, k_predictor), clone() = ModelPatcher.clone plus the
# controlnet list (shared), preserved memory, extra patchers (copied) and concat condition; the model_options /
# transformer_options helpers, which are the fake Forge's (the same in Neo). Simplified: no Nunchaku patcher.
from neo_overlay import forge_module

from backend.modules.k_model import KModel
from backend.patcher.base import ModelPatcher

_Forge = forge_module("backend.patcher.unet").UnetPatcher


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, *, k_predictor=None):
        model = KModel(model=model, diffusers_scheduler=diffusers_scheduler, k_predictor=k_predictor, config=config)
        return UnetPatcher(model, load_device=model.diffusion_model.load_device,
                           offload_device=model.diffusion_model.offload_device,
                           current_device=model.diffusion_model.initial_device)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    add_extra_preserved_memory_during_sampling = _Forge.add_extra_preserved_memory_during_sampling
    list_controlnets = _Forge.list_controlnets
    append_model_option = _Forge.append_model_option
    append_transformer_option = _Forge.append_transformer_option
    add_conditioning_modifier = _Forge.add_conditioning_modifier
    add_block_modifier = _Forge.add_block_modifier
