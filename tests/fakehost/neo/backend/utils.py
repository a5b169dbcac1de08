# Fake of backend/utils.py (Forge Neo 2.26): the fake Forge's helpers, which Neo kept, and what Neo added or changed
# for its ModelPatcher: deepcopy_ (dicts and lists copied, every other object -- tuples, functions, tensors -- shared)
# and nested_compute_size counting a weight adapter's tensors.
import torch
from neo_overlay import forge_module, public

globals().update(public(forge_module("backend.utils")))


def deepcopy_(obj, memo=None):
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        copy = {deepcopy_(k, memo): deepcopy_(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        copy = [deepcopy_(item, memo) for item in obj]
    else:
        copy = obj
    memo[id(obj)] = copy
    return copy


def nested_compute_size(obj, element_size):
    from modules_forge.packages.comfy.weight_adapter import WeightAdapterBase

    if isinstance(obj, dict):
        return sum(nested_compute_size(v, element_size) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nested_compute_size(v, element_size) for v in obj)
    if isinstance(obj, WeightAdapterBase):
        return nested_compute_size(obj.weights, element_size)
    return obj.nelement() * element_size if isinstance(obj, torch.Tensor) else 0
