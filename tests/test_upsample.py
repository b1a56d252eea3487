"""The lecture's upsampling facts, checked exactly (float64 where sums are compared)."""
import pytest
import torch
import torch.nn.functional as F

from detseg.errors import ConfigError
from detseg.ops.upsample import (
    TRANSPOSED_KERNELS, UPSAMPLE_KINDS, MaxUnpool, ResizeConvUpsample, TransposedConvUpsample, bed_of_nails,
    make_upsample, transposed_conv_padding,
)


def test_nearest_copies_each_value_into_its_cell():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32)
    assert torch.equal(make_upsample("nearest", 1)(x)[0, 0], expected)


def test_bed_of_nails_puts_value_top_left_and_zeros_elsewhere():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(bed_of_nails(x)[0, 0], expected)
    assert torch.equal(make_upsample("bed_of_nails", 1)(x)[0, 0], expected)


def test_max_unpool_puts_values_back_at_the_pooled_positions():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 8, generator=generator, dtype=torch.float64)
    pooled, indices = F.max_pool2d(x, 2, return_indices=True)
    restored = MaxUnpool()(pooled, indices)
    # Exactly one non-zero per 2x2 cell, at the cell's maximum, holding that maximum; zeros everywhere else.
    is_max = x == F.interpolate(pooled, scale_factor=2, mode="nearest")
    assert torch.equal(restored, torch.where(is_max, x, torch.zeros_like(x)))
    assert int(is_max.sum()) == pooled.numel()
    # A concrete cell: max at bottom-right.
    cell = torch.tensor([[[[1.0, 2.0], [3.0, 9.0]]]])
    p, i = F.max_pool2d(cell, 2, return_indices=True)
    assert torch.equal(MaxUnpool()(p, i)[0, 0], torch.tensor([[0.0, 0.0], [0.0, 9.0]]))


def test_max_unpool_refuses_missing_or_mismatched_indices():
    with pytest.raises(ValueError, match="indices"):
        MaxUnpool()(torch.ones(1, 1, 2, 2))
    _, indices = F.max_pool2d(torch.randn(1, 2, 4, 4), 2, return_indices=True)
    with pytest.raises(ValueError, match="pair"):
        MaxUnpool()(torch.ones(1, 1, 2, 2), indices)


def test_lecture_1d_transposed_convolution_example():
    # Input [a, b], filter [x, y, z], stride 2 -> [ax, ay, az + bx, by, bz]: copies of the filter scaled by each
    # input, placed 2 apart, summed where they overlap.
    a, b, x, y, z = 2.0, 3.0, 5.0, 7.0, 11.0
    out = F.conv_transpose1d(torch.tensor([[[a, b]]], dtype=torch.float64),
                             torch.tensor([[[x, y, z]]], dtype=torch.float64), stride=2)
    assert out.flatten().tolist() == [a * x, a * y, a * z + b * x, b * y, b * z]


@pytest.mark.parametrize("kernel", TRANSPOSED_KERNELS)
def test_transposed_convolution_is_the_gradient_of_strided_convolution(kernel):
    generator = torch.Generator().manual_seed(kernel)
    layer = TransposedConvUpsample(3, 5, kernel=kernel).double()   # weight (in=3, out=5, k, k)
    torch.nn.init.zeros_(layer.conv.bias)
    weight = layer.conv.weight.detach()
    padding, _ = transposed_conv_padding(kernel)

    # The matching strided convolution maps 5 channels at 2H x 2W down to 3 channels at H x W with the same weight.
    big = torch.randn(2, 5, 12, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    small = F.conv2d(big, weight, stride=2, padding=padding)
    assert small.shape == (2, 3, 6, 5)
    upstream = torch.randn(small.shape, generator=generator, dtype=torch.float64)
    (grad_of_input,) = torch.autograd.grad(small, big, grad_outputs=upstream)

    assert torch.allclose(layer(upstream), grad_of_input, rtol=0, atol=1e-12)


def test_transposed_kernel_overlap_pattern():
    # All-ones input and filter count how many filter taps land on each output pixel: kernel 2 tiles (all 1),
    # kernel 4 overlaps evenly (4 away from the border), kernel 3 unevenly (1, 2 and 4 mixed: checkerboard).
    ones = torch.ones(1, 1, 6, 6, dtype=torch.float64)

    def taps(kernel):
        padding, output_padding = transposed_conv_padding(kernel)
        return F.conv_transpose2d(ones, torch.ones(1, 1, kernel, kernel, dtype=torch.float64), stride=2,
                                  padding=padding, output_padding=output_padding)

    assert torch.all(taps(2) == 1)
    assert torch.all(taps(4)[..., 1:-1, 1:-1] == 4)
    assert set(taps(3)[..., 1:-1, 1:-1].unique().tolist()) == {1.0, 2.0, 4.0}


def test_resize_conv_is_nearest_then_convolution():
    layer = ResizeConvUpsample(2, 3).double()
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.conv(F.interpolate(x, scale_factor=2, mode="nearest")))


@pytest.mark.parametrize("kind, kernel", [(kind, 4) for kind in UPSAMPLE_KINDS if kind != "transposed"]
                         + [("transposed", kernel) for kernel in TRANSPOSED_KERNELS])
def test_every_upsampling_doubles_height_and_width(kind, kernel):
    before_pool = torch.randn(2, 4, 10, 14)
    x, indices = F.max_pool2d(before_pool, 2, return_indices=True)     # (2, 4, 5, 7)
    layer = make_upsample(kind, 4, kernel=kernel)
    assert layer(x, indices if layer.needs_indices else None).shape == (2, 4, 10, 14)


def test_make_upsample_errors_are_clear():
    with pytest.raises(ConfigError, match="nearest, bed_of_nails, max_unpool, transposed, resize_conv"):
        make_upsample("bilinear_magic", 4)
    with pytest.raises(ConfigError, match="kernel=5.*2, 3, 4"):
        make_upsample("transposed", 4, kernel=5)
