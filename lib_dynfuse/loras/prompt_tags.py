"""`<lora:...>` tags in a prompt, read the way the WebUI reads them, and the subject/style roles.

The host (A1111 `modules/extra_networks.py`, Forge likewise) finds tags with `<(\\w+):([^>]+)>`, splits the
argument text on ':' and splits each item on '=': exactly two parts make a named argument, anything else is
positional. The built-in Lora extension reads `positional[0]` as the name, then te (`positional[1]` or `te=`,
default 1.0), unet (`positional[2]` or `unet=`, default te) and dyn (`positional[3]` or `dyn=`). It reads only
those named keys and ignores every other one, so `dynfuse=subject|style` is invisible to the host and needs
no stripping. A1111's Lora extension (v1.10.1) registers itself as `lora` and under the alias `lyco`; Forge's
registers `lora` only and skips `<lyco:...>` as an unknown network, so its adapter passes
`tag_types=FORGE_TAG_TYPES`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The host's own pattern: names cannot contain ':' or '>'.
_TAG = re.compile(r"<(\w+):([^>]+)>")
A1111_TAG_TYPES = ("lora", "lyco")
FORGE_TAG_TYPES = ("lora",)
ROLES = ("subject", "style")
ROLE_ARG = "dynfuse"


class TagError(ValueError):
    """A LoRA tag the user must fix; the message is one line meant for the console and the UI."""


class RoleError(TagError):
    """Subject and style cannot be told apart from the prompt and the UI choices."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float
    role: str | None  # "subject" | "style" | None (from `dynfuse=`)
    text: str  # the whole tag as written, for messages


def _number(value: str, what: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise TagError(f"DynFuse: {what} '{value}' in {text} is not a number") from None


def _parse_tag(args: str, text: str) -> LoraTag | None:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional:
        return None  # the host fails on such a tag too; there is no LoRA to fuse
    te = _number(positional[1], "weight", text) if len(positional) > 1 else 1.0
    te = _number(named["te"], "te", text) if "te" in named else te
    unet = _number(positional[2], "unet weight", text) if len(positional) > 2 else te
    unet = _number(named["unet"], "unet", text) if "unet" in named else unet

    # Our own argument is matched leniently (spaces, case): it is ours alone, and a user writing
    # "<lora:x:0.8: dynfuse=Subject>" means the obvious thing.
    role = None
    for key, value in named.items():
        if key.strip().lower() == ROLE_ARG:
            role = value.strip().lower()
            if role not in ROLES:
                raise TagError(
                    f"DynFuse: {ROLE_ARG}={value} in {text} is unknown; "
                    f"use {ROLE_ARG}=subject or {ROLE_ARG}=style"
                )
    return LoraTag(name=positional[0], te=te, unet=unet, role=role, text=text)


def parse_lora_tags(prompt: str, tag_types: tuple[str, ...] = A1111_TAG_TYPES) -> list[LoraTag]:
    """Every LoRA tag (`<lora:...>`, and `<lyco:...>` where the host reads it) in prompt order.

    Duplicates are kept (a LoRA may be written in several AND parts).
    """
    tags = []
    for match in _TAG.finditer(prompt):
        if match.group(1) in tag_types:
            tag = _parse_tag(match.group(2), match.group(0))
            if tag is not None:
                tags.append(tag)
    return tags


def _found(names: list[str]) -> str:
    return f"(tags found: {', '.join(names) if names else 'none'})"


def resolve_roles(tags: list[LoraTag], subject: str, style: str) -> tuple[LoraTag, LoraTag]:
    """Pick the subject and the style tag.

    Order of precedence for each role: a `dynfuse=` argument in the prompt, then the name chosen in the UI,
    then "Auto": the first remaining LoRA of the prompt is the subject, the next one the style. A LoRA
    written several times counts once, by its first tag.
    """
    first: dict[str, LoraTag] = {}
    for tag in tags:
        first.setdefault(tag.name, tag)
    names = list(first)

    chosen: dict[str, str | None] = {}
    for role, ui_choice in zip(ROLES, (subject, style)):
        marked = list(dict.fromkeys(t.name for t in tags if t.role == role))
        if len(marked) > 1:
            raise RoleError(
                f"DynFuse: {len(marked)} LoRAs are marked {ROLE_ARG}={role} ({', '.join(marked)}); "
                "mark only one"
            )
        if marked:
            chosen[role] = marked[0]
        elif ui_choice != "Auto":
            if ui_choice not in first:
                raise RoleError(f"DynFuse: {role} LoRA '{ui_choice}' is not in the prompt {_found(names)}")
            chosen[role] = ui_choice
        else:
            chosen[role] = None

    if chosen["subject"] is not None and chosen["subject"] == chosen["style"]:
        raise RoleError(
            f"DynFuse: '{chosen['subject']}' is chosen as both subject and style; choose two different LoRAs"
        )
    free = iter(n for n in names if n not in chosen.values())
    for role in ROLES:
        if chosen[role] is None:
            chosen[role] = next(free, None)
    if chosen["subject"] is None or chosen["style"] is None:
        raise RoleError(f"DynFuse: the prompt needs two LoRA tags, a subject and a style {_found(names)}")
    return first[chosen["subject"]], first[chosen["style"]]
