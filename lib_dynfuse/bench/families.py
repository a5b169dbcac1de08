"""Transformers shaped like the other families Forge Neo runs LoRAs on, for the benchmark (``python -m
lib_dynfuse.bench --model zimage|lumina2|qwen|chroma|flux2|wan|krea2``): each family's block layers with their real
names, depths and fused shapes (relative to the width), at a width of choice, no diffusers needed.

* zimage (Z-Image, 30 layers + 2 + 2 refiners) and lumina2 (Lumina-Image 2.0, 26 + 2 + 2): NextDiT blocks, a fused
  ``attention.qkv`` (Lumina 2: 24 query heads over 8 key/value heads), ``attention.out``, SwiGLU ``feed_forward.w1 /
  w2 / w3`` (8/3 and 4 x width), ``adaLN_modulation`` (4 x width);
* qwen (Qwen-Image, 60 blocks): two streams with separate ``to_q / to_k / to_v`` and ``add_*_proj``, ``img_mod.1``
  (6 x width), MLPs of 4 x width;
* chroma (19 double + 38 single blocks): FLUX.1's blocks without their modulation layers;
* flux2 (Flux.2 klein 4B, 5 double + 20 single blocks): fused qkv, SiLU-gated MLPs of 3 x width (``img_mlp.0`` and
  ``linear1``'s MLP input twice that), no per-block modulation, no biases;
* wan (Wan 2.2 14B, 40 blocks): ``self_attn`` and ``cross_attn`` ``q / k / v / o`` (cross attention on the text),
  ``ffn.0 / .2`` (2.7 x width);
* krea2 (Krea 2, 28 blocks): ``attn.wq / wk / wv`` (12 key/value heads for 48), a sigmoid ``attn.gate``, ``attn.wo``,
  SwiGLU ``mlp.gate / up / down`` (4 x width).

Only the arithmetic that keeps activations in range is kept (no position embeddings, timestep or QK norms): what
the hooks see is each family's layers, shapes and call counts. The two LoRAs are in the layout that cuts fused layers
finest among those Forge Neo reads for the family (diffusers names: Z-Image's and Lumina 2's to_q / to_k / to_v,
Chroma's FLUX names with proj_mlp, Flux.2's to_q / to_k / to_v with the whole to_qkv_mlp_proj), so fused layers are
hooked part by part where that layout patches them so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The families take FLUX's inputs: 16 latent channels in 2x2 patches, 64 text tokens and a conditioning vector.
from lib_dynfuse.bench.flux import LATENT_CHANNELS, inputs  # noqa: F401 - inputs is this module's too

HEAD = 64  # channels per attention head


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, N, heads * HEAD] each (k and v may have fewer heads) -> [B, N, q's width]."""
    b, n, _ = q.shape
    q = q.view(b, n, -1, HEAD).transpose(1, 2)
    k, v = (t.view(b, t.shape[1], -1, HEAD).transpose(1, 2) for t in (k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


def _linear(out_features: int, in_features: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


def _sub(parent: nn.Module, name: str, module: nn.Module) -> None:
    """``parent.<a>.<b>... = module``, making the plain modules on the way (the families' dotted names)."""
    *path, last = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(last, module)


class NextDiTBlock(nn.Module):
    def __init__(self, width: int, kv: int, ffn: int, modulation: bool) -> None:
        super().__init__()
        self.width, self.kv = width, kv
        _sub(self, "attention.qkv", _linear(width + 2 * kv, width, bias=False))
        _sub(self, "attention.out", _linear(width, width, bias=False))
        for name, shape in (("w1", (ffn, width)), ("w2", (width, ffn)), ("w3", (ffn, width))):
            _sub(self, f"feed_forward.{name}", _linear(*shape, bias=False))
        if modulation:
            self.adaLN_modulation = nn.Sequential(_linear(4 * width, min(width, 256)))

    def forward(self, x: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        scale = gate = 0.0
        if hasattr(self, "adaLN_modulation"):
            scale, gate, _, _ = self.adaLN_modulation(vec[:, :min(self.width, 256)])[:, None].chunk(4, -1)
        q, k, v = self.attention.qkv(_norm(x) * (1 + scale)).split([self.width, self.kv, self.kv], -1)
        x = x + torch.tanh(gate) * self.attention.out(_attend(q, k, v)) if hasattr(self, "adaLN_modulation") else \
            x + self.attention.out(_attend(q, k, v))
        ff = self.feed_forward
        return x + ff.w2(F.silu(ff.w1(_norm(x))) * ff.w3(_norm(x)))


class QwenBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", nn.Sequential(nn.SiLU(), _linear(6 * width, width)))
            _sub(self, f"{stream}_mlp.net.0.proj", _linear(4 * width, width))
            _sub(self, f"{stream}_mlp.net.2", _linear(width, 4 * width))
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            _sub(self, f"attn.{name}", _linear(width, width))
        _sub(self, "attn.to_out.0", _linear(width, width))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mods = {s: getattr(self, f"{s}_mod")(vec)[:, None].chunk(6, -1) for s in ("img", "txt")}
        a = {s: _norm(x) * (1 + mods[s][1]) + mods[s][0] for s, x in (("img", img), ("txt", txt))}
        attn = self.attn
        q = torch.cat([attn.add_q_proj(a["txt"]), attn.to_q(a["img"])], 1)
        k = torch.cat([attn.add_k_proj(a["txt"]), attn.to_k(a["img"])], 1)
        v = torch.cat([attn.add_v_proj(a["txt"]), attn.to_v(a["img"])], 1)
        joint = _attend(q, k, v)
        n = txt.shape[1]
        out = {"img": getattr(attn.to_out, "0")(joint[:, n:]), "txt": attn.to_add_out(joint[:, :n])}
        result = []
        for s, x in (("img", img), ("txt", txt)):
            x = x + mods[s][2] * out[s]
            net = getattr(self, f"{s}_mlp").net
            up, down = getattr(net, "0").proj, getattr(net, "2")
            hidden = F.gelu(up(_norm(x) * (1 + mods[s][4]) + mods[s][3]), approximate="tanh")
            result.append(x + mods[s][5] * down(hidden))
        return result[0], result[1]


class FluxDoubleBlock(nn.Module):
    """FLUX.1's double block as Chroma (no modulation) and Flux.2 (SiLU-gated MLP, no biases) have it."""

    def __init__(self, width: int, mlp: int, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        bias = not gated
        for s in ("img", "txt"):
            _sub(self, f"{s}_attn.qkv", _linear(3 * width, width, bias))
            _sub(self, f"{s}_attn.proj", _linear(width, width, bias))
            self.add_module(f"{s}_mlp", nn.Sequential(_linear((2 if gated else 1) * mlp, width, bias), nn.Identity(),
                                                      _linear(width, mlp, bias)))

    def _mlp(self, s: str, x: torch.Tensor) -> torch.Tensor:
        mlp = getattr(self, f"{s}_mlp")
        hidden = mlp[0](_norm(x))
        if self.gated:
            gate, up = hidden.chunk(2, -1)
            return mlp[2](F.silu(gate) * up)
        return mlp[2](F.gelu(hidden, approximate="tanh"))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = torch.cat([getattr(self, f"{s}_attn").qkv(_norm(x)) for s, x in (("txt", txt), ("img", img))], 1)
        joint = _attend(*qkv.chunk(3, -1))
        out = []
        for s, x, attn in (("img", img, joint[:, txt.shape[1]:]), ("txt", txt, joint[:, :txt.shape[1]])):
            x = x + getattr(self, f"{s}_attn").proj(attn)
            out.append(x + self._mlp(s, x))
        return out[0], out[1]


class FluxSingleBlock(nn.Module):
    def __init__(self, width: int, mlp: int, gated: bool) -> None:
        super().__init__()
        self.width, self.mlp, self.gated = width, mlp, gated
        self.linear1 = _linear(3 * width + (2 if gated else 1) * mlp, width, not gated)
        self.linear2 = _linear(width, width + mlp, not gated)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        out = self.linear1(_norm(x))
        qkv, hidden = out[..., :3 * self.width], out[..., 3 * self.width:]
        if self.gated:
            gate, up = hidden.chunk(2, -1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        return x + self.linear2(torch.cat([_attend(*qkv.chunk(3, -1)), hidden], -1))


class WanBlock(nn.Module):
    def __init__(self, width: int, ffn: int) -> None:
        super().__init__()
        for attn in ("self_attn", "cross_attn"):
            for name in "qkvo":
                _sub(self, f"{attn}.{name}", _linear(width, width))
        self.ffn = nn.Sequential(_linear(ffn, width), nn.GELU(approximate="tanh"), _linear(width, ffn))

    def forward(self, x: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        s, c = self.self_attn, self.cross_attn
        a = _norm(x)
        x = x + s.o(_attend(s.q(a), s.k(a), s.v(a)))
        x = x + c.o(_attend(c.q(_norm(x)), c.k(txt), c.v(txt)))
        return x + self.ffn(_norm(x))


class KreaBlock(nn.Module):
    def __init__(self, width: int, kv: int, mlp: int) -> None:
        super().__init__()
        for name, out in (("wq", width), ("wk", kv), ("wv", kv), ("gate", width), ("wo", width)):
            _sub(self, f"attn.{name}", _linear(out, width, bias=False))
        for name, shape in (("gate", (mlp, width)), ("up", (mlp, width)), ("down", (width, mlp))):
            _sub(self, f"mlp.{name}", _linear(*shape, bias=False))

    def forward(self, x: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        a, attn, mlp = _norm(x), self.attn, self.mlp
        x = x + attn.wo(_attend(attn.wq(a), attn.wk(a), attn.wv(a)) * torch.sigmoid(attn.gate(a)))
        b = _norm(x)
        return x + mlp.down(F.silu(mlp.gate(b)) * mlp.up(b))


@dataclass(frozen=True)
class Family:
    """A family's transformer at a width: its block groups (name, count, block factory, what the blocks run on:
    "text" or "image" tokens, "dual" streams or the "joint" sequence of text then image tokens)."""

    groups: Callable[[int], list[tuple[str, int, Callable[[], nn.Module], str]]]
    heads_per_kv: int = 1                                # grouped-query attention
    parts: Callable[[str, nn.Linear], list[tuple[str, int, int]] | None] = lambda name, module: None


def _qkv_parts(name: str, module: nn.Linear) -> list[tuple[str, int, int]] | None:
    """q, k and v of a fused projection (k and v narrower with grouped-query attention)."""
    width = module.in_features
    kv = (module.out_features - width) // 2
    return [("q", 0, width), ("k", width, kv), ("v", width + kv, kv)]


def _nextdit_parts(name: str, module: nn.Linear) -> list[tuple[str, int, int]] | None:
    return _qkv_parts(name, module) if name.endswith("attention.qkv") else None


def _chroma_parts(name: str, module: nn.Linear) -> list[tuple[str, int, int]] | None:
    if name.endswith("attn.qkv"):
        return _qkv_parts(name, module)
    if name.endswith("linear1"):
        width = module.in_features
        return [("q", 0, width), ("k", width, width), ("v", 2 * width, width),
                ("mlp", 3 * width, module.out_features - 3 * width)]
    return None


def _flux2_parts(name: str, module: nn.Linear) -> list[tuple[str, int, int]] | None:
    return _qkv_parts(name, module) if name.endswith("attn.qkv") else None  # to_qkv_mlp_proj: all of linear1


# Each family's block counts: (refiners, layers) for NextDiT, (double, single) for the FLUX-style ones, else blocks.
DEPTHS = {"zimage": (2, 30), "lumina2": (2, 26), "qwen": (60,), "chroma": (19, 38), "flux2": (5, 20), "wan": (40,),
          "krea2": (28,)}


def _nextdit(family: str, kv_div: int, ffn: float) -> Callable[[int], list]:
    def groups(w: int) -> list:
        kv, hidden = w // kv_div, int(ffn * w)
        refiners, layers = DEPTHS[family]
        return [("context_refiner", refiners, lambda: NextDiTBlock(w, kv, hidden, False), "text"),
                ("noise_refiner", refiners, lambda: NextDiTBlock(w, kv, hidden, True), "image"),
                ("layers", layers, lambda: NextDiTBlock(w, kv, hidden, True), "joint")]
    return groups


def _flux(family: str, ratio: float, gated: bool) -> Callable[[int], list]:
    def groups(w: int) -> list:
        double, single = DEPTHS[family]
        return [("double_blocks", double, lambda: FluxDoubleBlock(w, int(ratio * w), gated), "dual"),
                ("single_blocks", single, lambda: FluxSingleBlock(w, int(ratio * w), gated), "joint")]
    return groups


def _blocks(family: str, name: str, block: Callable[[int], nn.Module], mode: str) -> Callable[[int], list]:
    return lambda w: [(name, DEPTHS[family][0], lambda: block(w), mode)]


FAMILIES = {
    "zimage": Family(_nextdit("zimage", 1, 8 / 3), parts=_nextdit_parts),
    "lumina2": Family(_nextdit("lumina2", 3, 4.0), heads_per_kv=3, parts=_nextdit_parts),
    "qwen": Family(_blocks("qwen", "transformer_blocks", QwenBlock, "dual")),
    "chroma": Family(_flux("chroma", 4.0, False), parts=_chroma_parts),
    "flux2": Family(_flux("flux2", 3.0, True), parts=_flux2_parts),
    "wan": Family(_blocks("wan", "blocks", lambda w: WanBlock(w, int(13824 / 5120 * w)), "image")),
    "krea2": Family(_blocks("krea2", "blocks", lambda w: KreaBlock(w, w // 4, 4 * w), "joint"), heads_per_kv=4),
}


class FamilyShaped(nn.Module):
    def __init__(self, family: str, width: int) -> None:
        super().__init__()
        spec = FAMILIES[family]
        if width % (HEAD * spec.heads_per_kv):
            raise ValueError(f"{family}: the width must be a multiple of {HEAD * spec.heads_per_kv} (whole attention "
                             "heads for queries, keys and values)")
        self.family = family
        self.img_in = nn.Linear(LATENT_CHANNELS, width)
        self.txt_in = nn.Linear(width, width)
        self.modes = []
        for name, count, block, mode in spec.groups(width):
            self.add_module(name, nn.ModuleList(block() for _ in range(count)))
            self.modes.append((name, mode))
        self.final = nn.Linear(width, LATENT_CHANNELS)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        img, txt = self.img_in(img), self.txt_in(txt)
        for name, mode in self.modes:
            for block in getattr(self, name):
                if mode == "text":
                    txt = block(txt, txt, vec)
                elif mode == "image":
                    img = block(img, txt, vec)
                elif mode == "dual":
                    img, txt = block(img, txt, vec)
                else:
                    joint = torch.cat([txt, img], 1)
                    joint = block(joint, vec) if isinstance(block, FluxSingleBlock) else block(joint, txt, vec)
                    txt, img = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
        return self.final(img)


def build(family: str, width: int, device: str, dtype: torch.dtype) -> FamilyShaped:
    torch.manual_seed(0)
    return FamilyShaped(family, width).to(device=device, dtype=dtype).eval().requires_grad_(False)



def lora_sites(model: FamilyShaped, which: str = "all") -> dict[str, tuple[nn.Module, tuple[int, int] | None]]:
    """What two LoRAs in the family's finest layout patch: ``all`` every Linear of the blocks, ``attention`` the
    attention projections (the parts of a fused one but its MLP input); fused layers part by part where that layout
    cuts them (name ``…qkv:q``, channels (start, length))."""
    parts_of = FAMILIES[model.family].parts
    sites = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in ("img_in", "txt_in", "final"):
            continue
        attention = "attn." in name or "attention." in name or name.endswith("linear1")
        if which == "attention" and not attention:
            continue
        parts = parts_of(name, module)
        if parts is None:
            sites[name] = (module, None)
            continue
        for part, start, length in parts:
            if which == "attention" and part == "mlp":
                continue
            sites[f"{name}:{part}"] = (module, (start, length))
    return sites
