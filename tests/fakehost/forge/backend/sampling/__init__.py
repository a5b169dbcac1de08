# Fake of backend/sampling/ (stable-diffusion-webui-forge dfdcbab6): package marker.
