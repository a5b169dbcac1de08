# Fake of comfy_api/latest/__init__.py (ComfyUI 0.30.0): ComfyExtension and the `io` module of node types.
from abc import ABC, abstractmethod

from . import _io as io


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """The extension's node classes."""


__all__ = ["ComfyExtension", "io"]
