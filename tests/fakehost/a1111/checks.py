# Test helpers, not a host file: what "the model is as if DynFuse never existed" means, measured.
from __future__ import annotations

import torch


def current_model():
    from modules import shared

    return shared.sd_model


def probe(model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's output on a fixed input and the text encoder's output on a fixed prompt (host LoRA paths run)."""
    model = model or current_model()
    g = torch.Generator().manual_seed(99)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        context = model.get_learned_conditioning(["a photo of a dog", "a painting"])
        return model.apply_model(x, t, {"c_crossattn": [context], "c_concat": [None]}), context


def state(model=None) -> dict[str, torch.Tensor]:
    model = model or current_model()
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differs: {different[:5]}"


def dynfuse_hooks(model=None) -> int:
    model = model or current_model()
    return sum(1 for m in model.modules() for fn in m._forward_hooks.values() if getattr(fn, "__dynfuse_hook__", False))


def dynfuse_args(enabled: bool = True, **fields) -> list:
    """The DynFuse script args as the page sends them: the accordion, then ui.UI_FIELDS in order."""
    from lib_dynfuse.hosts import ui
    from lib_dynfuse.settings import DEFAULTS

    unknown = set(fields) - set(ui.UI_FIELDS)
    assert not unknown, unknown
    return [enabled] + [fields.get(name, getattr(DEFAULTS, name)) for name in ui.UI_FIELDS]
