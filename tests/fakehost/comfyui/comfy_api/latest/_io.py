# Fake of comfy_api/latest/_io.py (ComfyUI 0.30.0), the V3 node API: io types with nested Input / Output classes
# (an `io_type` each: "MODEL", "CLIP", "FLOAT", "COMBO", ...), widget inputs with their defaults and bounds,
# Schema, ComfyNode (define_schema, execute, GET_SCHEMA), NodeOutput. Kept: the constructor signatures DynFuse uses
# and `as_dict`'s widget options (min, max, step, options). Left out: the front-end dict of a whole node, lazy
# inputs, hidden inputs, the UI outputs, validation and caching.
from dataclasses import dataclass, field
from typing import Any


class _Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None,
                 raw_link=None, advanced=None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip

    @property
    def io_type(self):
        return self.Parent.io_type

    def as_dict(self):
        return {k: v for k, v in {"display_name": self.display_name, "optional": self.optional or None,
                                   "tooltip": self.tooltip}.items() if v is not None}


class _WidgetInput(_Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, widget_type=None, force_input=None, extra_dict=None, raw_link=None, advanced=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link, advanced)
        self.default = default

    def as_dict(self):
        return super().as_dict() | ({"default": self.default} if self.default is not None else {})


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip

    @property
    def io_type(self):
        return self.Parent.io_type


def comfytype(io_type):
    def decorate(cls):
        cls.io_type = io_type
        for name in ("Input", "Output"):
            inner = getattr(cls, name, None)
            if inner is not None:
                inner.Parent = cls
        return cls
    return decorate


class ComfyTypeIO:
    class Input(_Input):
        pass

    class Output(_Output):
        pass


def _typed(io_type):
    """A ComfyTypeIO of its own for ``io_type`` (nested classes are per type)."""
    return comfytype(io_type)(type(io_type.title(), (ComfyTypeIO,), {
        "Input": type("Input", (_Input,), {}), "Output": type("Output", (_Output,), {})}))


Model = _typed("MODEL")
Clip = _typed("CLIP")
Vae = _typed("VAE")
Image = _typed("IMAGE")
Latent = _typed("LATENT")
Conditioning = _typed("CONDITIONING")


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    class Input(_WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None, extra_dict=None,
                     raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)

    class Output(_Output):
        pass


class _Number(_WidgetInput):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                 max=None, step=None, **kwargs):
        super().__init__(id, display_name, optional, tooltip, lazy, default)
        self.min, self.max, self.step = min, max, step

    def as_dict(self):
        return super().as_dict() | {k: v for k, v in (("min", self.min), ("max", self.max), ("step", self.step))
                                    if v is not None}


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    class Input(_Number):
        pass

    class Output(_Output):
        pass


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    class Input(_Number):
        pass

    class Output(_Output):
        pass


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    class Input(_WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None,
                     extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.multiline = multiline

    class Output(_Output):
        pass


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    class Input(_WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None, extra_dict=None, raw_link=None, advanced=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.options = list(options) if options is not None else []

        def as_dict(self):
            return super().as_dict() | {"options": self.options}

    class Output(_Output):
        pass


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    search_aliases: list = field(default_factory=list)
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> Any:
        return None

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        return cls.define_schema()
