# Fake of backend/ (stable-diffusion-webui-forge dfdcbab6): package marker.
