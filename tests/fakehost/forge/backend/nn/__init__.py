# Fake of backend/nn/ (stable-diffusion-webui-forge dfdcbab6): package marker.
