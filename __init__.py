"""DynFuse as ComfyUI custom nodes: ComfyUI imports this file when the repository is cloned into
``ComfyUI/custom_nodes/``; the nodes are in lib_dynfuse.hosts.comfyui_nodes. The AUTOMATIC1111 and Forge WebUIs
never import it (they load ``scripts/``). Anything else that imports it (pytest treats the folder as a package)
gets an empty module: the nodes are only defined where ComfyUI's node API is."""

import importlib.util
import os
import sys

if importlib.util.find_spec("comfy_api") is not None:
    # ComfyUI imports this folder as a module of its own name without putting the folder on sys.path; appended,
    # not prepended, so that nothing here shadows ComfyUI's modules.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if _HERE not in sys.path:
        sys.path.append(_HERE)

    from lib_dynfuse.hosts.comfyui_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
