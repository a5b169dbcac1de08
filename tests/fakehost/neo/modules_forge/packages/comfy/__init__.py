# Fake of modules_forge/packages/comfy/ (Forge Neo 2.26): the ComfyUI LoRA code Neo vendors.
