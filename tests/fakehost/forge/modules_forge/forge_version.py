# Fake of modules_forge/forge_version.py (stable-diffusion-webui-forge dfdcbab6).
version = '2.0.1v1.10.1'
