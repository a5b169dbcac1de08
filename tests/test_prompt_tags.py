from __future__ import annotations

import pytest

from lib_dynfuse.loras.prompt_tags import (
    FORGE_TAG_TYPES,
    LoraTag,
    RoleError,
    TagError,
    parse_lora_tags,
    resolve_roles,
)


def names(prompt: str) -> list[str]:
    return [tag.name for tag in parse_lora_tags(prompt)]


def test_positional_weights_follow_the_host():
    tags = parse_lora_tags("a dog <lora:dog:0.8> <lora:ink:0.6:0.4> <lora:plain> <lora:dyn:1:0.5:8>")
    assert tags == [
        LoraTag("dog", 0.8, 0.8, None, "<lora:dog:0.8>"),  # unet defaults to te
        LoraTag("ink", 0.6, 0.4, None, "<lora:ink:0.6:0.4>"),
        LoraTag("plain", 1.0, 1.0, None, "<lora:plain>"),
        LoraTag("dyn", 1.0, 0.5, None, "<lora:dyn:1:0.5:8>"),
    ]


def test_named_arguments_override_positional_ones():
    tags = parse_lora_tags("<lora:a:0.3:te=0.7> <lora:b:unet=0.2> <lora:c:0.9:0.1:unet=1.5:te=0.25:dyn=4>")
    assert [(t.te, t.unet) for t in tags] == [(0.7, 0.7), (1.0, 0.2), (0.25, 1.5)]


def test_role_argument_and_unknown_named_arguments():
    tags = parse_lora_tags(
        "<lora:dog:0.8:dynfuse=subject> <lora:ink:lbw=OUTD:dynfuse=style:0.5> <lora:x: dynfuse = Subject >"
    )
    assert [(t.name, t.role, t.unet) for t in tags] == [
        ("dog", "subject", 0.8),
        ("ink", "style", 0.5),
        ("x", "subject", 1.0),
    ]


def test_names_with_spaces_dots_dashes_and_lyco_alias():
    prompt = "<lora:my lora v1.5-final:0.7> <lyco:ink_style-v2.safetensors:1> <hypernet:h:1> <lora:a.b-c d>"
    assert names(prompt) == ["my lora v1.5-final", "ink_style-v2.safetensors", "a.b-c d"]


def test_forge_does_not_read_lyco_tags():
    prompt = "<lora:a:1> <lyco:b:1> <lora:c:0.5>"
    assert [t.name for t in parse_lora_tags(prompt, FORGE_TAG_TYPES)] == ["a", "c"]


def test_real_prompt_shapes():
    prompt = (
        "((masterpiece)), (a dog:1.2) sitting, [[blurry]:0.3] <lora:dog:0.9:dynfuse=subject>\n"
        "BREAK in (the style of (ink wash:1.1)), <lora:ink wash:0.6> AND a cat <lora:dog:0.9> , "
        "<lora:extra:-0.5>"
    )
    tags = parse_lora_tags(prompt)
    assert [(t.name, t.unet, t.role) for t in tags] == [
        ("dog", 0.9, "subject"),
        ("ink wash", 0.6, None),
        ("dog", 0.9, None),
        ("extra", -0.5, None),
    ]
    subject, style = resolve_roles(tags, "Auto", "Auto")
    assert (subject.name, style.name) == ("dog", "ink wash")


def test_no_tags_and_tags_without_a_name():
    assert parse_lora_tags("a photo of a dog, <lora:>, <lora:te=0.5>, lora:dog:1") == []


def test_bad_weight_and_bad_role_are_reported():
    with pytest.raises(TagError, match=r"^DynFuse: weight 'heavy' in <lora:dog:heavy> is not a number$"):
        parse_lora_tags("<lora:dog:heavy>")
    with pytest.raises(
        TagError,
        match=r"^DynFuse: dynfuse=both in <lora:dog:dynfuse=both> is unknown; "
        r"use dynfuse=subject or dynfuse=style$",
    ):
        parse_lora_tags("<lora:dog:dynfuse=both>")


def roles(prompt: str, subject: str = "Auto", style: str = "Auto") -> tuple[str, str]:
    subject_tag, style_tag = resolve_roles(parse_lora_tags(prompt), subject, style)
    return subject_tag.name, style_tag.name


def test_auto_takes_prompt_order():
    assert roles("<lora:a:1> <lora:b:1> <lora:c:1>") == ("a", "b")


def test_explicit_roles_come_first_and_auto_fills_the_rest():
    assert roles("<lora:a:1> <lora:b:1:dynfuse=subject> <lora:c:1>") == ("b", "a")
    assert roles("<lora:a:1:dynfuse=style> <lora:b:1> <lora:c:1>") == ("b", "a")
    assert roles("<lora:a:1:dynfuse=style> <lora:b:1:dynfuse=subject>") == ("b", "a")


def test_ui_choice_and_prompt_marks():
    assert roles("<lora:a:1> <lora:b:1> <lora:c:1>", subject="c") == ("c", "a")
    assert roles("<lora:a:1> <lora:b:1> <lora:c:1>", style="a") == ("b", "a")
    assert roles("<lora:a:1> <lora:b:1> <lora:c:1>", subject="c", style="b") == ("c", "b")
    # the prompt's own mark wins over the UI choice
    assert roles("<lora:a:1> <lora:b:1:dynfuse=subject>", subject="a") == ("b", "a")


def test_first_tag_of_a_repeated_lora_is_used():
    subject, style = resolve_roles(
        parse_lora_tags("<lora:a:0.5> AND <lora:a:0.9> <lora:b:0.7>"), "Auto", "Auto"
    )
    assert (subject.name, subject.unet, style.name) == ("a", 0.5, "b")


@pytest.mark.parametrize(
    ("prompt", "subject", "style", "message"),
    [
        (
            "<lora:a:1> <lora:b:1>",
            "x",
            "Auto",
            "DynFuse: subject LoRA 'x' is not in the prompt (tags found: a, b)",
        ),
        (
            "<lora:a:1> <lora:b:1>",
            "Auto",
            "y",
            "DynFuse: style LoRA 'y' is not in the prompt (tags found: a, b)",
        ),
        ("a dog", "x", "Auto", "DynFuse: subject LoRA 'x' is not in the prompt (tags found: none)"),
        (
            "<lora:a:1> <lora:b:1>",
            "a",
            "a",
            "DynFuse: 'a' is chosen as both subject and style; choose two different LoRAs",
        ),
        (
            "<lora:a:1:dynfuse=subject> <lora:b:1>",
            "Auto",
            "a",
            "DynFuse: 'a' is chosen as both subject and style; choose two different LoRAs",
        ),
        (
            "<lora:a:1>",
            "Auto",
            "Auto",
            "DynFuse: the prompt needs two LoRA tags, a subject and a style (tags found: a)",
        ),
        (
            "<lora:a:1> AND <lora:a:0.5>",
            "Auto",
            "Auto",
            "DynFuse: the prompt needs two LoRA tags, a subject and a style (tags found: a)",
        ),
        (
            "a dog",
            "Auto",
            "Auto",
            "DynFuse: the prompt needs two LoRA tags, a subject and a style (tags found: none)",
        ),
        (
            "<lora:a:1:dynfuse=style> <lora:b:1:dynfuse=style>",
            "Auto",
            "Auto",
            "DynFuse: 2 LoRAs are marked dynfuse=style (a, b); mark only one",
        ),
    ],
)
def test_role_errors(prompt, subject, style, message):
    with pytest.raises(RoleError) as error:
        resolve_roles(parse_lora_tags(prompt), subject, style)
    assert str(error.value) == message
