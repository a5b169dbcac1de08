# Fake of modules_forge/ (Forge Neo 2.26): the package marker host detection probes for, and Neo's vendored ComfyUI
# LoRA code under packages/comfy.
