# Fake of backend/args.py (stable-diffusion-webui-forge dfdcbab6): only the two objects the sampling code reads.
from types import SimpleNamespace

args = SimpleNamespace(disable_gpu_warning=True)
dynamic_args = dict(online_lora=False)
