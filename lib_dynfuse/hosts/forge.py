"""Stable Diffusion WebUI Forge (main, `backend/` layout): its LoRA store for the Forge-family takeover
(lib_dynfuse.hosts.forge_family).

Forge files each LoRA's patches under its own key, `unet.lora_patches[(file, strength, strength_model, online)] =
{model_key: [[strength, patch, strength_model, offset, function], ...]}`, and re-merges the store only when the
list of keys changes (`LoraLoader.refresh`). The clone's store is a shallow copy: DynFuse drops the subject's and
style's keys from it and never edits the per-file dicts, which Forge's cached patchers share. Patches DynFuse cannot
fuse (`strength_model` != 1, norm layers, DoRA-type patches on a quantised weight) go back under a renamed key,
where the LoRA was, so that Forge merges them (and notices a strength override: the key carries the strength).
"""

from __future__ import annotations

from typing import Any

import torch

from lib_dynfuse.hosts.base import Job
from lib_dynfuse.hosts.forge_family import ForgeFamilyAdapter, role_of_file, strength_overrides
from lib_dynfuse.hosts.patch_store import Split, Taken

# Entries dynfuse leaves to Forge get a key of their own: Forge re-merges only when the key list changes.
STATIC_SUFFIX = "#dynfuse-static"


class ForgeAdapter(ForgeFamilyAdapter):
    name = "forge"
    host_label = "Forge"
    store = "per-file"

    def store_problem(self, unet: Any) -> str | None:
        problem = super().store_problem(unet)
        if problem is None and not hasattr(unet, "lora_loader"):
            return "this Forge's UNet has LoRA patches but no LoraLoader to merge them; DynFuse cannot take them over."
        return problem

    def take_patches(self, unet: Any, job: Job) -> list[Taken]:
        role_of = role_of_file(job)
        return [Taken(role, key, patches) for key, patches in unet.lora_patches.items()
                if isinstance(key[0], str) and not key[0].endswith(STATIC_SUFFIX) and (role := role_of(key[0]))]

    def keep_with_host(self, unet: Any, job: Job, taken: list[Taken], split: Split) -> None:
        """The clone's store in Forge's order, each taken LoRA's kept layers under its renamed key where the LoRA
        was: Forge merges the store in order, and a patch with strength_model != 1 scales everything merged into
        the weight before it."""
        by_role = strength_overrides(job)
        overrides = {item.source: by_role[item.role] for item in taken}
        replaced = {item.source for item in taken}
        store = {}
        for key, patches in unet.lora_patches.items():
            if key not in replaced:
                store[key] = patches
            elif key in split.kept:
                # The key carries the strength: Forge sees an override as a change and merges anew.
                store[(f"{key[0]}{STATIC_SUFFIX}", key[1] if overrides[key] is None else overrides[key], *key[2:])] = {
                    model_key: [new for _old, new in pairs] for model_key, pairs in split.kept[key].items()}
        unet.lora_patches = store

    def base_weight(self, unet: Any, key: str, module: torch.nn.Module) -> torch.Tensor:
        return unet.lora_loader.backup.get(key, getattr(module, key.rpartition(".")[2]))
