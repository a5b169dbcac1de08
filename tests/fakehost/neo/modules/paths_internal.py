# Fake of modules/paths_internal.py (Forge Neo 2.26): the webui root and models folder. The root is the folder that
# holds both fakes: the fake Neo's packages continue in the fake Forge's folders, and host detection wants a host's
# packages inside its root.
import os

script_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
data_path = script_path
models_path = os.path.join(data_path, "models")
