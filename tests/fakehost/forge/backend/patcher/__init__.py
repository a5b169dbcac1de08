# Fake of backend/patcher/ (stable-diffusion-webui-forge dfdcbab6): package marker.
