"""The toy world: deterministic renders, captions the text encoder reads, the subject's identifying hole."""

from __future__ import annotations

import pytest
import torch

from lib_dynfuse.quality import world
from lib_dynfuse.quality.diffusion import to_model_space, to_pixels
from lib_dynfuse.quality.text import MAX_TOKENS, VOCABULARY, tokenize


def test_an_image_is_a_pure_function_of_its_scene():
    scenes = [world.Scene(obj, style, "big", 7) for obj in world.OBJECTS for style in world.STYLES]
    batch = world.render(scenes)
    again = world.render(scenes)
    alone = torch.cat([world.render([scene]) for scene in scenes[::5]])
    assert batch.shape == (len(scenes), 3, 32, 32)
    assert torch.equal(batch, again)
    assert torch.equal(batch[::5], alone)
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0


def test_seeds_objects_and_styles_change_the_image():
    base = world.render([world.Scene("circle", "plain", "big", 1)])
    for other in (world.Scene("circle", "plain", "big", 2), world.Scene("square", "plain", "big", 1),
                  world.Scene("circle", "zwx", "big", 1)):
        assert not torch.equal(base, world.render([other]))


def test_the_subject_has_a_hole_in_its_left_lobe_that_shows_the_background():
    scene = world.Scene(world.SUBJECT, "plain", "big", 0)
    image = world.render([scene])[0]
    d = scene.draws()

    def pixel(u: float, v: float) -> torch.Tensor:  # a point in units of the radius from the centre
        column, row = ((c + 1) / 2 * world.SIZE - 0.5 for c in (d.cx + u * d.radius, d.cy + v * d.radius))
        return image[:, round(row), round(column)]

    background = image[:, 0, 0]  # a corner: the plain style's solid background
    assert torch.allclose(pixel(*world.SUBJECT_HOLE), background, atol=0.05)
    assert (pixel(0.3, 0.1) - background).abs().max() > 0.4  # the body, in the plain style's dark blue
    assert (pixel(-world.SUBJECT_HOLE[0], world.SUBJECT_HOLE[1]) - background).abs().max() > 0.4  # no hole on the right


def test_captions_name_object_size_and_style_and_tokenize():
    assert world.caption("sks", "zwx", "big") == "a big sks, zwx style"
    assert world.caption("ring", "plain") == "a ring, plain style"
    tokens = tokenize(["a big sks, zwx style", ""])
    assert tokens.shape == (2, MAX_TOKENS)
    assert [VOCABULARY[i] for i in tokens[0, :6].tolist()] == ["a", "big", "sks", ",", "zwx", "style"]
    assert tokens[1].tolist() == [0] * MAX_TOKENS


def test_an_unknown_word_is_named():
    with pytest.raises(ValueError, match="does not know 'dog'"):
        tokenize(["a dog, zwx style"])


def test_model_space_folds_pixels_losslessly():
    images = world.render(world.random_scenes(3, 0))
    z = to_model_space(images)
    assert z.shape == (3, 12, 16, 16)
    assert torch.allclose(to_pixels(z), images, atol=1e-6)
