"""Segmentation models and the per-pixel loss: shapes, config errors, and each model overfitting a tiny batch."""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detseg.errors import ConfigError
from detseg.losses import pixel_cross_entropy
from detseg.models.segmentation import encoder_decoder, fcn_fullres, sliding_window
from detseg.models.segmentation.encoder_decoder import EncoderDecoder
from detseg.models.segmentation.fcn_fullres import FullResolutionFCN
from detseg.models.segmentation.sliding_window import SlidingWindowSegmenter, sample_crops
from detseg.ops.upsample import UPSAMPLE_KINDS


def shapes_batch(count=4, size=32, seed=0):
    """Noisy images with a square (class 1) and a disk (class 2) each; returns images (N,3,H,W), semantic (N,H,W)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, (count, 3, size, size)).astype(np.float32)
    semantic = np.zeros((count, size, size), dtype=np.int64)
    yy, xx = np.mgrid[:size, :size]
    for n in range(count):
        top, left = rng.integers(0, size // 2, 2)
        semantic[n, top:top + size // 3, left:left + size // 3] = 1
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        semantic[n][(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2] = 2
        images[n, 0][semantic[n] == 1] += 1.5
        images[n, 2][semantic[n] == 2] += 1.5
    return torch.from_numpy(images), torch.from_numpy(semantic)


def train_steps(make_model, loss_fn, steps, lr=1e-2, seed=0):
    """Build the model under a fixed seed and train it with plain Adam on one fixed batch.

    Returns the model, the first loss and the mean of the last five (one Adam spike should not decide a test).
    """
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses[0], sum(losses[-5:]) / 5


# --- per-pixel cross-entropy -------------------------------------------------------------------------------------

def test_pixel_cross_entropy_matches_torch_when_every_pixel_is_labeled():
    logits = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(4, (3, 5, 6))
    assert torch.allclose(pixel_cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_pixel_cross_entropy_averages_per_image_then_over_the_batch():
    # Image 0 has 1 labeled pixel, image 1 has 4: the global mean would weigh image 1 four times as much.
    logits = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    target = torch.tensor([[[0, 255], [255, 255]], [[1, 2, ], [0, 1]]])
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    expected = (per_pixel[0, 0, 0] + per_pixel[1].mean()) / 2
    assert torch.allclose(pixel_cross_entropy(logits, target), expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, target, ignore_index=255))


def test_pixel_cross_entropy_ignores_unlabeled_pixels():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(3, (2, 4, 4))
    target[:, :2] = 255
    pixel_cross_entropy(logits, target).backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and torch.any(logits.grad[:, :, 2:] != 0)
    # An image with no labeled pixel is left out; a batch with none gives 0 (and still back-propagates).
    target[0] = 255
    both = pixel_cross_entropy(logits, target)
    assert torch.allclose(both, pixel_cross_entropy(logits[1:], target[1:]))
    nothing = pixel_cross_entropy(logits, torch.full_like(target, 255))
    assert nothing.item() == 0.0 and nothing.requires_grad


# --- encoder-decoder ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("down, up", [("maxpool", up) for up in UPSAMPLE_KINDS] + [("strided", "transposed"),
                                                                                   ("strided", "bed_of_nails")])
def test_encoder_decoder_returns_scores_at_input_resolution(down, up):
    model = EncoderDecoder(num_classes=5, width=4, depth=3, down=down, up=up, skips=2)
    assert model(torch.randn(2, 3, 37, 45)).shape == (2, 5, 37, 45)   # not a multiple of 2**depth: padded + cropped


def test_encoder_decoder_at_half_resolution_still_scores_every_pixel():
    model = EncoderDecoder(num_classes=3, width=4, depth=2, stem_stride=2, up="max_unpool", skips=2)
    assert model.encoder_stem[0][0].stride == (2, 2)
    assert model(torch.randn(1, 3, 30, 21)).shape == (1, 3, 30, 21)


def test_encoder_decoder_skips_and_kernels_change_the_network():
    no_skip = EncoderDecoder(width=4, depth=3, skips=0)
    all_skips = EncoderDecoder(width=4, depth=3, skips=3)
    assert [level.skip for level in no_skip.decoder_levels] == [False, False, False]
    assert [level.skip for level in all_skips.decoder_levels] == [True, True, True]
    fcn16 = EncoderDecoder(width=4, depth=3, skips=1)                 # only the coarsest decoder step fuses
    assert [level.skip for level in fcn16.decoder_levels] == [False, False, True]
    for kernel in (2, 3, 4):
        layer = EncoderDecoder(width=4, depth=2, kernel=kernel).decoder_levels[0].up.conv
        assert layer.kernel_size == (kernel, kernel) and layer.stride == (2, 2)


def test_encoder_decoder_config_errors_are_clear():
    with pytest.raises(ConfigError, match="max_unpool needs down=maxpool"):
        EncoderDecoder(down="strided", up="max_unpool")
    with pytest.raises(ConfigError, match="up=bilinear: must be one of nearest, bed_of_nails, max_unpool"):
        EncoderDecoder(up="bilinear")
    with pytest.raises(ConfigError, match="down=avgpool: must be one of maxpool, strided"):
        EncoderDecoder(down="avgpool")
    with pytest.raises(ConfigError, match="kernel=5: must be one of 2, 3, 4"):
        EncoderDecoder(kernel=5)
    with pytest.raises(ConfigError, match="skips=4: at most depth=3"):
        EncoderDecoder(depth=3, skips=4)
    with pytest.raises(ConfigError, match="unknown config key 'widht'"):
        EncoderDecoder.build(8, widht=16)


@pytest.mark.parametrize("module, model_class", [(encoder_decoder, EncoderDecoder),
                                                 (fcn_fullres, FullResolutionFCN),
                                                 (sliding_window, SlidingWindowSegmenter)])
def test_constructor_defaults_are_the_declared_defaults(module, model_class):
    signature = inspect.signature(model_class.__init__).parameters
    assert {key: signature[key].default for key in module.DEFAULTS} == module.DEFAULTS
    assert all(option.help for option in module.OPTIONS.values())
    assert isinstance(model_class.build(8), model_class)


@pytest.mark.parametrize("down, up", [("maxpool", "max_unpool"), ("strided", "transposed")])
def test_encoder_decoder_overfits_a_tiny_batch(down, up):
    images, semantic = shapes_batch()
    _, first, last = train_steps(lambda: EncoderDecoder(num_classes=3, width=8, depth=2, down=down, up=up, skips=1),
                                 lambda model: pixel_cross_entropy(model(images), semantic), steps=60)
    assert last < first / 5                                          # falls by at least 5x


def test_full_resolution_fcn_overfits_and_reports_receptive_field():
    images, semantic = shapes_batch()
    model, first, last = train_steps(lambda: FullResolutionFCN(num_classes=3, width=12, depth=4),
                                     lambda model: pixel_cross_entropy(model(images), semantic), steps=60)
    assert model.receptive_field == 9 and model(images).shape == (4, 3, 32, 32)
    assert last < first / 5


# --- sliding window ----------------------------------------------------------------------------------------------

def test_sample_crops_are_centred_on_the_labeled_pixel():
    # Channel 0 holds each pixel's row, channel 1 its column, and the "class" of a pixel is its flat index.
    height, width, crop = 9, 11, 5
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    images = torch.stack([rows, columns, rows * 0]).float()[None].repeat(2, 1, 1, 1)
    semantic = (rows * width + columns)[None].repeat(2, 1, 1)
    crops, labels = sample_crops(images, semantic, 30, torch.Generator().manual_seed(0), crop_size=crop)
    assert crops.shape == (60, 3, crop, crop) and labels.shape == (60,)
    centre = crop // 2
    assert torch.equal(crops[:, 0, centre, centre].long(), labels // width)
    assert torch.equal(crops[:, 1, centre, centre].long(), labels % width)


def test_sample_crops_pads_borders_by_reflection_or_zeros():
    images = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    semantic = torch.zeros(1, 4, 4, dtype=torch.long)
    for padding, corner in (("reflect", 6.0), ("zeros", 0.0)):   # 6 is pixel (1, 1), the mirror of (-1, -1)
        crops, _ = sample_crops(images, semantic, 200, torch.Generator().manual_seed(1), crop_size=3,
                                padding=padding)
        at_origin = crops[crops[:, 0, 1, 1] == 1.0]               # crops centred on pixel (0, 0)
        assert len(at_origin) and torch.all(at_origin[:, 0, 0, 0] == corner)
    with pytest.raises(ConfigError, match="reflect padding"):
        sample_crops(images, semantic, 1, crop_size=9)


def test_sliding_window_segment_equals_one_forward_per_pixel():
    torch.manual_seed(0)
    model = SlidingWindowSegmenter(num_classes=3, crop=7, width=4, depth=2).eval()
    images = torch.randn(2, 3, 10, 12)
    dense = model.segment(images, batch_size=50)
    assert dense.shape == (2, 3, 10, 12)
    padded = F.pad(images, (3, 3, 3, 3), mode="reflect")
    for n, y, x in [(0, 0, 0), (1, 9, 11), (0, 4, 7)]:
        crop = padded[n:n + 1, :, y:y + 7, x:x + 7]
        assert torch.allclose(dense[n, :, y, x], model(crop)[0], atol=1e-5)
    assert model.crops_per_image(10, 12) == 120 and model.crops_per_image(10, 12, stride=4) == 2 * 3
    assert model.segment(images, stride=4).shape == (2, 3, 10, 12)


def test_sliding_window_overfits_a_tiny_batch_of_crops():
    images, semantic = shapes_batch()
    crops, labels = sample_crops(images, semantic, 32, torch.Generator().manual_seed(0), crop_size=16)
    model, first, last = train_steps(lambda: SlidingWindowSegmenter(num_classes=3, crop=16, width=8, depth=2),
                                     lambda model: F.cross_entropy(model(crops), labels), steps=60)
    assert last < first / 5
    model.eval()
    accuracy = (model.segment(images).argmax(1) == semantic).float().mean()
    assert accuracy > 0.6                                            # dense inference agrees with what was learned
