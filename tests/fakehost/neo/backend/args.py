# Fake of backend/args.py (Forge Neo 2.26, webui/backend/args.py l.124-168): dynamic_args is a class whose attributes
# the WebUI sets, readable like a dict through its metaclass (Forge's is a dict). Only the fields the generation
# path reads.
from types import SimpleNamespace

args = SimpleNamespace(disable_gpu_warning=True)


class _DynamicArgsMeta(type):
    def get(cls, key, default=None):
        return getattr(cls, key, default)

    def __getitem__(cls, key, default=None):
        return getattr(cls, key, default)

    def __setitem__(cls, key, value):
        setattr(cls, key, value)

    def __contains__(cls, key):
        return hasattr(cls, key)


class dynamic_args(metaclass=_DynamicArgsMeta):
    online_lora: bool = False
    nunchaku: bool = False
