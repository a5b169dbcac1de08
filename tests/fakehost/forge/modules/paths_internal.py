# Fake of modules/paths_internal.py (stable-diffusion-webui-forge dfdcbab6): the webui root and models folder
# (no --models-dir).
import os

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = script_path
models_path = os.path.join(data_path, "models")
