"""Inference-only speed-ups: folded batch norms + channels-last copies, and RoIAlign spread over threads."""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from detseg import registry
from detseg.cli import main
from detseg.config import resolve
from detseg.models.inference import fold_norms, fuse_for_inference
from detseg.ops.pooling import ThreadedMultiScaleRoIAlign

from .test_export import tiny_checkpoint


def _random_statistics(model: nn.Module, seed: int = 0) -> None:
    """Batch norms as training leaves them: statistics and affine terms far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            count = module.weight.numel()
            with torch.no_grad():
                module.weight.copy_(torch.rand(count, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(count, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(count, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_fold_norms_keeps_the_function(norm):
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), norm(4)).eval()
    _random_statistics(block)
    images = torch.randn(2, 3, 16, 16)
    expected = block(images)
    assert fold_norms(block) == 2
    assert not any(isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)) for module in block.modules())
    torch.testing.assert_close(block(images), expected, rtol=1e-5, atol=1e-5)


def test_fold_norms_in_torchvision_resnet_blocks():
    from torchvision.models import resnet18
    resnet = resnet18(num_classes=5).eval()
    _random_statistics(resnet)
    images = torch.randn(1, 3, 64, 64)
    expected = resnet(images)
    assert fold_norms(resnet) == 20          # stem + 8 blocks x 2 + 3 downsample branches
    torch.testing.assert_close(resnet(images), expected, rtol=1e-4, atol=1e-4)


def test_fused_detector_predicts_like_the_original():
    entry = registry.get("inst/mask_rcnn")
    config = resolve(entry.all_options(), {"width": 8, "image_size": 64, "mask_channels": "8",
                                           "keypoint_channels": "8,8", "score_thresh": 0.0})
    torch.manual_seed(0)
    model = entry.build(config, entry.make_task(config).placeholder_info(None))
    for module in model.modules():                  # spread scores: no near-ties for rounding to break
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    _random_statistics(model)
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    with torch.no_grad():
        expected = model(images)
        fused = fuse_for_inference(model)
        got = fused(images)
    assert fused.folded_norms > 0 and fused is not model
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())   # the original is untouched
    for mine, theirs in zip(got, expected):
        assert len(theirs["boxes"]) > 0
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=0, atol=1e-5)
        assert torch.equal(mine["labels"], theirs["labels"])
        assert (mine["masks"] != theirs["masks"]).float().mean() < 1e-3


def _pyramid_and_boxes():
    generator = torch.Generator().manual_seed(0)
    features = {str(level): torch.randn(2, 4, 64 // 2 ** level, 96 // 2 ** level, generator=generator)
                for level in range(4)}
    boxes = []
    for count in (301, 5, 0):
        corner = torch.rand(count, 2, generator=generator) * 200
        boxes.append(torch.cat([corner, corner + 4 + torch.rand(count, 2, generator=generator) * 150], 1))
    return features, boxes[:2], [(256, 384)] * 2


def test_threaded_roi_align_is_bit_identical(monkeypatch):
    features, boxes, sizes = _pyramid_and_boxes()
    expected = MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, sizes)
    threaded = ThreadedMultiScaleRoIAlign(list(features), 7, 2)
    calls = []
    original = MultiScaleRoIAlign.forward
    monkeypatch.setattr(MultiScaleRoIAlign, "forward", lambda self, *args: calls.append(1) or original(self, *args))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    with torch.no_grad():
        got = threaded(features, boxes, sizes)
    assert len(calls) > 2                            # it did split: the scales, then one call per chunk
    assert torch.equal(got, expected)


def test_threaded_roi_align_trains_through_one_call():
    features, boxes, sizes = _pyramid_and_boxes()
    features = {name: value.requires_grad_() for name, value in features.items()}
    threaded = ThreadedMultiScaleRoIAlign(list(features), 7, 2)
    threaded(features, boxes, sizes).square().sum().backward()
    got = {name: value.grad.clone() for name, value in features.items()}
    for value in features.values():
        value.grad = None
    MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, sizes).square().sum().backward()
    for name, value in features.items():
        assert torch.equal(got[name], value.grad)


def test_predict_fuse_flag(tmp_path):
    from PIL import Image
    checkpoint = tiny_checkpoint(tmp_path / "model.pt", "det/faster_rcnn", width=8, image_size=64, spread=True)
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "a.png")
    results = {}
    for flag in ([], ["--fuse"]):
        out = tmp_path / ("fused" if flag else "plain")
        run = CliRunner().invoke(main, ["predict", str(checkpoint), str(tmp_path / "a.png"), "--out", str(out),
                                        "--quiet", "--no-draw", *flag])
        assert run.exit_code == 0, run.output
        results[bool(flag)] = json.loads((out / "predictions.json").read_text())
    plain, fused = results[False][0], results[True][0]
    assert len(plain["boxes"]) == len(fused["boxes"]) > 0
    torch.testing.assert_close(torch.tensor(fused["boxes"]), torch.tensor(plain["boxes"]), rtol=0, atol=1e-2)
