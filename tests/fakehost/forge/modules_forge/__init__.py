# Fake of modules_forge/ (stable-diffusion-webui-forge dfdcbab6): the package marker host detection probes for.
