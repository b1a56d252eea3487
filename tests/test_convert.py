"""torchvision's detection checkpoints converted to detseg give torchvision's detections (tiny inputs, random
weights: nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchors
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from detseg import api
from detseg.bench.convert import compare, old_layout
from detseg.cli import main
from detseg.convert import build_converted, convert_state_dict
from detseg.models.base import ImageTransform
from detseg.ops.anchors import AnchorGenerator

SIZES = {"min_size": 96, "max_size": 160}


def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.rand(3, 70, 110, generator=generator), torch.rand(3, 120, 90, generator=generator)]


def reference(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, box_score_thresh=0.0,
                                        **SIZES).eval()


def converted(state: dict, **kwargs):
    model, payload = build_converted(kwargs.pop("name"), state, **kwargs)
    model.transform.min_size, model.transform.max_size = SIZES["min_size"], SIZES["max_size"]
    model.postprocess.score_thresh = 0.0
    return model, payload


def assert_identical(expected: list[dict], found: list[dict]) -> None:
    worst = compare(expected, found)
    assert worst["detections"] > 50          # random weights keep many detections at threshold 0
    assert worst["unmatched"] == 0, worst
    assert worst["box_px"] <= 0.01 and worst["score"] <= 1e-4, worst
    assert worst["mask_iou"] >= 0.99 and worst["joint_px"] <= 0.1, worst


def test_torchvision_grid_anchors_equal_torchvision_anchor_generator():
    sizes, ratios = ((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3
    theirs = TorchvisionAnchors(sizes, ratios)
    maps = [torch.zeros(1, 8, 25, 38), torch.zeros(1, 8, 13, 19), torch.zeros(1, 8, 7, 10)]
    expected = theirs(ImageList(torch.zeros(1, 3, 100, 152), [(100, 150)]), maps)[0]
    ours = torch.cat(AnchorGenerator(sizes, (0.5, 1.0, 2.0), grid="torchvision")(maps, (100, 152)))
    assert torch.equal(ours, expected)


def test_torchvision_resize_is_torchvision_transform_bit_for_bit():
    theirs = GeneralizedRCNNTransform(96, 160, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    ours = ImageTransform(800, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize="torchvision",
                          **SIZES)
    batch, _ = theirs(images())
    mine = ours.batch(images())
    assert mine.image_sizes == [tuple(size) for size in batch.image_sizes]
    assert torch.equal(mine.normalized, batch.tensors)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_converted_models_give_torchvisions_detections_in_both_layouts(name):
    model = reference(name)
    with torch.inference_mode():
        expected = model(images())
    for state in (model.state_dict(), old_layout(model.state_dict())):
        ours, payload = converted(state, name=name)
        with torch.inference_mode():
            assert_identical(expected, ours(images()))
    assert payload["config"]["backbone_norm"] == "batch"            # BatchNorm2d state dict: num_batches_tracked


def test_frozen_batch_norm_state_dicts_load_with_torchvisions_epsilon():
    """The published files hold FrozenBatchNorm2d statistics, which torchvision loads with eps 0."""
    torch.manual_seed(1)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, 91, box_score_thresh=0.0, **SIZES).eval()
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):          # statistics that are not the identity
            module.running_var.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.1, 0.1)
    overwrite_eps(model, 0.0)
    with torch.inference_mode():
        expected = model(images())
    ours, payload = converted(model.state_dict(), name="fasterrcnn_resnet50_fpn")
    assert payload["config"]["backbone_norm"] == "frozen" and payload["config"]["bn_eps"] == 0.0
    with torch.inference_mode():
        assert_identical(expected, ours(images()))


def test_cli_converts_and_the_checkpoint_predicts_like_any_other(tmp_path):
    model = reference("maskrcnn_resnet50_fpn")
    torch.save(old_layout(model.state_dict()), tmp_path / "maskrcnn.pth")
    result = CliRunner().invoke(main, ["convert", "torchvision", "maskrcnn_resnet50_fpn", str(tmp_path / "maskrcnn.pth"),
                                       "--out", str(tmp_path / "maskrcnn.pt")])
    assert result.exit_code == 0, result.output
    loaded, payload = api.load(tmp_path / "maskrcnn.pt", overrides={"score_thresh": 0.0, "min_size": 96,
                                                                   "max_size": 160})
    assert payload["info"]["class_names"][1] == "person" and payload["info"]["category_ids"][90] == 90
    with torch.inference_mode():
        assert_identical(model(images()), loaded(images()))


def test_cli_rejects_bad_state_dicts_with_one_line(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    runner = CliRunner()
    for name, path in (("fasterrcnn_resnet50_fpn", "other.pth"), ("fasterrcnn_resnet50_fpn", "broken.pth"),
                       ("fasterrcnn_resnet50_fpn", "missing.pth"), ("retinanet", "other.pth")):
        result = runner.invoke(main, ["convert", "torchvision", name, str(tmp_path / path), "--out",
                                      str(tmp_path / "out.pt")])
        assert result.exit_code == 2, (path, result.output)
    assert not (tmp_path / "out.pt").exists()


def test_a_state_dict_of_another_model_is_refused_by_name():
    state = reference("fasterrcnn_resnet50_fpn").state_dict()
    with pytest.raises(Exception, match="mask_head"):
        convert_state_dict("maskrcnn_resnet50_fpn", state)
