# Fake of modules/paths.py (stable-diffusion-webui-forge dfdcbab6): script_path is the webui root, which host
# detection uses to tell Forge's own packages from stray pip packages.
import os

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = script_path
