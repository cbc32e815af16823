"""Conditioning as the original: buckets, cover-resize + crop, prompt shapes and masks, image encodes."""

import numpy as np
import pytest
import torch

from diffusers_helper.pipeline.conditioning import BUCKETS_640, buckets_for, find_nearest_bucket, resize_and_center_crop
from diffusers_helper.pipeline.conditioning import (crop_or_pad_with_mask, encode_prompt, image_to_tensor, siglip_embed,
                                           template_crop_start, vae_encode)
from diffusers_helper.models.specs import PROMPT_TEMPLATE


@pytest.mark.parametrize("hw, bucket", [
    ((1080, 1920), (480, 832)),  # 16:9 landscape -> 832x480 (ratio 1.73)
    ((1920, 1080), (832, 480)),
    ((400, 1000), (416, 960)),  # very wide -> the widest bucket
    ((640, 640), (640, 608)),  # square: 608x640 and 640x608 tie, the later one wins
    ((512, 512), (640, 608)),
    ((600, 800), (544, 704)),  # 4:3
])
def test_nearest_bucket_640(hw, bucket):
    assert find_nearest_bucket(*hw, resolution=640) == bucket


def test_square_tie_goes_to_the_later_bucket():
    metrics = [abs(640 * bw - 640 * bh) for bh, bw in BUCKETS_640]
    best = min(metrics)
    assert [b for b, m in zip(BUCKETS_640, metrics) if m == best] == [(608, 640), (640, 608)]


def test_other_resolutions_keep_aspect_and_multiples_of_16():
    for res in (64, 128, 480, 960):
        buckets = buckets_for(res)
        assert len(buckets) == len(BUCKETS_640)
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    with pytest.raises(ValueError):
        buckets_for(8)


def test_resize_and_center_crop_covers_then_crops():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 140:160] = 255  # a bright vertical band in the middle
    out = resize_and_center_crop(img, target_width=64, target_height=48)
    assert out.shape == (48, 64, 3)
    # cover-resize scales by 0.48 (height); the band stays centered
    assert out[:, 32].mean() > 200 and out[:, 2].mean() < 10
    same = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert resize_and_center_crop(same, 64, 48) is same


def test_crop_or_pad_with_mask():
    x = torch.randn(1, 5, 3)
    padded, mask = crop_or_pad_with_mask(x, 8)
    assert padded.shape == (1, 8, 3) and mask.tolist() == [[True] * 5 + [False] * 3]
    assert torch.equal(padded[:, :5], x) and torch.all(padded[:, 5:] == 0)
    cropped, mask = crop_or_pad_with_mask(torch.randn(1, 10, 3), 8)
    assert cropped.shape == (1, 8, 3) and mask.all()


def test_prompt_encoding_shapes_and_mask(tiny_bundles):
    b = tiny_bundles["tiny"]
    crop = template_crop_start(b.tokenizer)
    # the prompt starts exactly at crop_start in the templated token ids
    ids = b.tokenizer(PROMPT_TEMPLATE.format("hello world"))["input_ids"]
    bare = b.tokenizer(PROMPT_TEMPLATE.format(""))["input_ids"]
    assert ids[:crop] == bare[:crop] and ids[crop:] != bare[crop:]
    with torch.inference_mode():
        short = encode_prompt("a cat", b.text_encoder, b.text_encoder_2, b.tokenizer, b.tokenizer_2, None)
        long = encode_prompt("a cat " * 50, b.text_encoder, b.text_encoder_2, b.tokenizer, b.tokenizer_2, None)
    assert short.llama.shape == (1, 512, 32) and short.pooled.shape == (1, 16)
    n = int(short.llama_mask.sum())
    assert 0 < n < int(long.llama_mask.sum()) <= 256  # at most 256 prompt tokens are kept
    assert short.llama_mask[0, :n].all() and not short.llama_mask[0, n:].any()
    assert torch.all(short.llama[:, n:] == 0)
    neg = short.zeros_like()
    assert torch.all(neg.llama == 0) and torch.all(neg.pooled == 0) and torch.equal(neg.llama_mask, short.llama_mask)


def test_image_encodes(tiny_bundles, test_image):
    b = tiny_bundles["tiny"]
    img = resize_and_center_crop(test_image, 64, 48)
    pixels = image_to_tensor(img)
    assert pixels.shape == (1, 3, 1, 48, 64) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.inference_mode():
        latent = vae_encode(pixels, b.vae)
        again = vae_encode(pixels, b.vae)
        embeds = siglip_embed(img, b.feature_extractor, b.image_encoder)
    assert latent.shape == (1, 16, 1, 6, 8)
    assert torch.equal(latent, again)  # posterior mean: deterministic
    assert embeds.shape == (1, 9, 24)
