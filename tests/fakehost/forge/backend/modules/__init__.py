# Fake of backend/modules/ (stable-diffusion-webui-forge dfdcbab6): package marker.
