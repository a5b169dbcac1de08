# Fake of backend/diffusion_engine/ (stable-diffusion-webui-forge dfdcbab6): package marker.
