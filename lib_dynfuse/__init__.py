"""Dynamic training-free fusion of a subject LoRA and a style LoRA.

The package is host-independent: it imports torch, safetensors and Pillow only, so that it can be used and
tested without a WebUI. Host glue lives in ``lib_dynfuse.hosts``.
"""

__version__ = "0.1.0"
