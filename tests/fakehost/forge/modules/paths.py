# Fake of modules/paths.py (stable-diffusion-webui-forge dfdcbab6): the names it re-exports from paths_internal.
# script_path is the webui root, which host detection uses to tell Forge's own packages from stray pip packages.
from modules.paths_internal import data_path, models_path, script_path  # noqa: F401
