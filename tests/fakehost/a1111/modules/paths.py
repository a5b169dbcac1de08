# Follows modules/paths.py and modules/paths_internal.py of AUTOMATIC1111 v1.10.1 (82a973c0).
import os

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
