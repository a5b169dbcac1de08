# Fake of backend/patcher/unet.py (Forge Neo 2.26): UnetPatcher is the fake Forge's on Neo's ModelPatcher (Neo kept
# its helpers: preserved memory, extra patchers, model and transformer options), with Neo's
# from_model(model, diffusers_scheduler, config, *, k_predictor) and clone() = ModelPatcher.clone plus the controlnet
# list (shared), preserved memory, extra patchers (copied) and concat condition. Simplified: no Nunchaku patcher.
from neo_overlay import forge_module

from backend.modules.k_model import KModel

# The fake Forge's module, imported here, builds its UnetPatcher on `backend.patcher.base`: Neo's ModelPatcher.
_ForgeUnetPatcher = forge_module("backend.patcher.unet").UnetPatcher


class UnetPatcher(_ForgeUnetPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, *, k_predictor=None):
        model = KModel(model=model, diffusers_scheduler=diffusers_scheduler, k_predictor=k_predictor, config=config)
        return UnetPatcher(model, load_device=model.diffusion_model.load_device,
                           offload_device=model.diffusion_model.offload_device,
                           current_device=model.diffusion_model.initial_device)

    def clone(self):
        n = super(_ForgeUnetPatcher, self).clone()  # ModelPatcher.clone: Forge's copies lora_patches instead
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n
