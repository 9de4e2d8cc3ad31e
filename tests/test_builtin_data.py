"""The built-in shapes dataset: determinism, captions, and the attribute decoder used by `lowvram eval`."""

import pytest
import torch

from lowvram.data import builtin as B
from lowvram.errors import DataError


def test_same_seed_same_images_and_different_seed_differs():
    a, b, c = B.ShapesDataset(8, seed=3), B.ShapesDataset(8, seed=3), B.ShapesDataset(8, seed=4)
    for i in range(8):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
        assert a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["pixel_values"], c[i]["pixel_values"]) for i in range(8))


def test_item_format_and_range():
    item = B.ShapesDataset(2, resolution=32)[1]
    x = item["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(item["key"], str) and item["key"] != B.ShapesDataset(2)[0]["key"]
    with pytest.raises(IndexError):
        B.ShapesDataset(2)[2]


def test_holdout_is_disjoint_from_training_split():
    train, val = B.ShapesDataset(16, seed=0), B.holdout(16, seed=0)
    train_keys = {train[i]["key"] for i in range(16)}
    assert not train_keys & {val[i]["key"] for i in range(16)}
    assert all(not torch.equal(train[i]["pixel_values"], val[i]["pixel_values"]) for i in range(16))


def test_captions_follow_the_template_and_the_attributes():
    ds = B.ShapesDataset(60)
    seen = set()
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        assert B.attributes_of_caption(ds[i]["caption"]) == attrs
        assert ds[i]["caption"] == B.CAPTION_TEMPLATE.format(**attrs)
        seen.update((k, v) for k, v in attrs.items())
    # 60 draws cover every value of every attribute
    assert seen == {(k, v) for k, vals in B.ATTRIBUTES.items() for v in vals}


def test_eval_prompts_are_valid_distinct_and_cover_every_value():
    prompts = B.eval_prompts()
    assert len(set(prompts)) == len(prompts) >= 8
    parsed = [B.attributes_of_caption(p) for p in prompts]
    for key, values in B.ATTRIBUTES.items():
        assert {a[key] for a in parsed} == set(values)


def test_bad_prompts_raise_a_data_error_with_a_fix():
    with pytest.raises(DataError, match="template|form"):
        B.attributes_of_caption("a photo of a cat")
    with pytest.raises(DataError) as e:
        B.attributes_of_caption("a purple circle on a white background")
    assert "colour" in str(e.value) and e.value.fix


def _decode_accuracy(n, sigma):
    ds = B.ShapesDataset(n, seed=11)
    g = torch.Generator().manual_seed(0)
    ok = 0
    for i in range(n):
        x = ds[i]["pixel_values"]
        if sigma:
            x = x + sigma * torch.randn(x.shape, generator=g)
        ok += B.decode_attributes(x) == ds.attributes(i)
    return ok / n


def test_decoder_reads_clean_images_exactly():
    assert _decode_accuracy(200, 0.0) == 1.0


def test_decoder_is_robust_to_sample_noise():
    assert _decode_accuracy(200, 0.1) >= 0.98


def test_matches_rejects_wrong_captions():
    image = B.image_for_prompt("a red circle on a white background", seed=5)
    assert B.matches("a red circle on a white background", image)
    assert not B.matches("a blue square on a white background", image)
    assert not B.matches("a red square on a white background", image)
    assert not B.matches("a red triangle on a white background", image)
    assert not B.matches("a blue circle on a white background", image)
    assert not B.matches("a red circle on a black background", image)


def test_decoder_finds_nothing_in_noise_or_blank_images():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((3, 32, 32), generator=g) * 2 - 1
    assert B.decode_attributes(noise)["shape"] is None or B.decode_attributes(noise)["colour"] is None
    blank = torch.full((3, 32, 32), -1.0)  # black, no shape
    got = B.decode_attributes(blank)
    assert got["background"] == "black" and got["shape"] is None and got["colour"] is None


def test_all_captions_lists_every_combination():
    caps = B.all_captions()
    assert len(caps) == len(set(caps)) == 3 * 4 * 3
    assert set(B.eval_prompts()) <= set(caps)


def test_decoder_survives_blur_like_a_model_sample():
    # Samples of a small model are soft-edged: a [1,2,1]^2 blur plus noise must not turn squares into circles.
    ds = B.ShapesDataset(100, seed=5)
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    g = torch.Generator().manual_seed(1)
    ok = 0
    for i in range(len(ds)):
        x = torch.nn.functional.pad(ds[i]["pixel_values"][None], (1, 1, 1, 1), mode="replicate")
        y = torch.nn.functional.conv2d(x, kernel, groups=3)[0] + 0.1 * torch.randn((3, 32, 32), generator=g)
        ok += B.decode_attributes(y) == ds.attributes(i)
    assert ok / len(ds) >= 0.97
