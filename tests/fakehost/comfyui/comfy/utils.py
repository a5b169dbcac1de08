# Fake of comfy/utils.py (ComfyUI 0.30.0): what the LoRA path and the patcher use. load_torch_file reads
# safetensors (the real one also reads .ckpt/.pt); set_attr_param clones an inference tensor outside inference
# mode as the real one does; deepcopy_list_dict copies dicts and lists only (functions and objects by reference).
import safetensors.torch
import torch


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    sd = safetensors.torch.load_file(str(ckpt), device=str(device or "cpu"))
    if return_metadata:
        with safetensors.safe_open(str(ckpt), framework="pt") as f:
            return sd, f.metadata()
    return sd


def resolve_attr(obj, attr):
    attrs = attr.split(".")
    for name in attrs[:-1]:
        obj = getattr(obj, name)
    return obj, attrs[-1]


def get_attr(obj, attr):
    obj, name = resolve_attr(obj, attr)
    return getattr(obj, name)


def set_attr(obj, attr, value):
    obj, name = resolve_attr(obj, attr)
    prev = getattr(obj, name, None)
    setattr(obj, name, value)
    return prev


def set_attr_param(obj, attr, value):
    if (not torch.is_inference_mode_enabled()) and value.is_inference():
        value = value.clone()
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    obj, name = resolve_attr(obj, attr)
    getattr(obj, name).data.copy_(value)


def deepcopy_list_dict(obj, memo=None):
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(i, memo) for i in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res
