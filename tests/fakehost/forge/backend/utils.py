# Fake of backend/utils.py (stable-diffusion-webui-forge dfdcbab6): attribute helpers and the file loader. Forge Neo
# 2.26 has the same (tests/fakehost/neo/backend/utils.py adds what Neo added).
import safetensors.torch
import torch


def load_torch_file(ckpt, safe_load=False, device=None):
    if device is None:
        device = torch.device("cpu")
    return safetensors.torch.load_file(ckpt, device=device.type)


def set_attr_raw(obj, attr, value):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    setattr(obj, attrs[-1], value)


def set_attr(obj, attr, value):
    set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    get_attr(obj, attr).data.copy_(value)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    parent = obj
    name = None
    for name in attr.split("."):
        parent = obj
        obj = getattr(obj, name)
    return parent, name, obj


def dtype_to_element_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def tensor2parameter(x):
    if isinstance(x, torch.nn.Parameter):
        return x
    return torch.nn.Parameter(x, requires_grad=False)


def nested_move_to_device(obj, **kwargs):
    # Real Forge mutates the shared lists in place; the fake does the same so tests see that hazard.
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = nested_move_to_device(obj[k], **kwargs)
    elif isinstance(obj, tuple):
        return tuple(nested_move_to_device(i, **kwargs) for i in obj)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            obj[i] = nested_move_to_device(obj[i], **kwargs)
    elif isinstance(obj, torch.Tensor):
        return obj.to(**kwargs)
    return obj
