"""ONNX export: round trips on tiny checkpoints of every exportable family, the refusals, --dynamic, the check."""
import json
import sys

import numpy as np
import pytest
import torch

from detseg import api, registry
from detseg.config import resolve
from detseg.engine.checkpoint import save_checkpoint
from detseg.errors import ConfigError
from detseg.export import _compare_detections, check_onnx, onnx_session, plan_export

onnx = pytest.importorskip("onnx")


def tiny_checkpoint(path, name: str, spread: bool = False, **overrides):
    """A checkpoint of ``name`` with random weights, built from the registry with its placeholder data info.

    ``spread=True`` resets every convolution and linear layer to PyTorch's default initialisation: the detectors'
    own small initial weights give near-equal scores to many boxes, and NMS among scores 1e-8 apart may keep a
    different box in onnxruntime than in PyTorch - a tie, not an export error, which a trained model does not have.
    """
    entry = registry.get(name)
    config = resolve(entry.all_options(), overrides)
    info = entry.make_task(config).placeholder_info(None)
    torch.manual_seed(0)
    model = entry.build(config, info)
    if spread:
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.reset_parameters()
    save_checkpoint(path, {"model_name": name, "config": config, "info": info, "model": model.state_dict()})
    return path


ROUND_TRIPS = {
    "cls/convnet": dict(width=8, image_size=32),
    "cls/mlp": dict(width=16, dataset="spirals"),
    "seg/encoder_decoder": dict(width=4, depth=2, image_size=64),
    "seg/fcn_fullres": dict(width=4, depth=2, image_size=32),
    "loc/classify_localize": dict(width=8, image_size=64, grid=2, box_head="per_class"),
    "pose/regress": dict(width=8, image_size=128),
    "det/faster_rcnn": dict(width=8, image_size=64, spread=True),
    "det/yolo": dict(width=8, image_size=64, spread=True),
    "det/ssd": dict(width=8, image_size=64, spread=True),
    "inst/mask_rcnn": dict(width=8, image_size=64, spread=True, mask_channels="8", keypoint_channels="8,8"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_matches_pytorch(name, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "model.pt", name, **ROUND_TRIPS[name])
    report = api.export(checkpoint, dynamic=not name.startswith(("det/", "inst/")))
    assert report["file"] == str(tmp_path / "model.onnx")
    assert report["within_tolerance"], report
    assert report["mismatches"] == 0
    assert all(value <= (1e-3 if key in ("boxes", "keypoints") else 1e-4) for key, value in report["max_diff"].items())
    graph = onnx.load(report["file"])
    onnx.checker.check_model(graph)
    props = {prop.key: prop.value for prop in graph.metadata_props}
    assert props["detseg_model"] == name and json.loads(props["detseg_outputs"]) == report["outputs"]
    if name.startswith("det/"):
        assert report["outputs"] == ["boxes", "scores", "labels"]
    if name == "inst/mask_rcnn":      # the heads' outputs at the detections, checked like the boxes
        assert report["outputs"] == ["boxes", "scores", "labels", "mask_probabilities", "keypoint_heatmaps"]
        assert {"mask_probabilities", "keypoint_heatmaps"} <= set(report["max_diff"])


def test_dynamic_batch_and_size(tmp_path):
    """A batch of 3 and a larger image, neither of them seen by the export or its check, match PyTorch."""
    checkpoint = tiny_checkpoint(tmp_path / "seg.pt", "seg/encoder_decoder", width=4, depth=2, image_size=64)
    report = api.export(checkpoint, out=tmp_path / "seg.onnx", dynamic=True)
    assert report["input"]["shape"] == ["batch", 3, "height", "width"]
    session = onnx_session(tmp_path / "seg.onnx")
    model, _ = api.load(checkpoint)
    batch = torch.rand(3, 3, 64, 64)
    scores, labels = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = torch.stack([output["scores"] for output in model(batch)]).numpy()
    assert scores.shape == (3, 8, 64, 64) and labels.shape == (3, 64, 64)
    assert np.abs(scores - expected).max() < 1e-4
    larger = torch.rand(1, 3, 96, 128)
    with model.transform.resized_to((96, 128)), torch.no_grad():
        expected = model(larger)[0]["scores"].numpy()
    assert np.abs(session.run(None, {"images": larger.numpy()})[0][0] - expected).max() < 1e-4


def test_static_export_has_a_fixed_batch(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "cls.pt", "cls/convnet", width=8, image_size=32)
    report = api.export(checkpoint, out=tmp_path / "cls.onnx")
    assert report["input"]["shape"] == [1, 3, 32, 32]
    with pytest.raises(Exception):
        onnx_session(tmp_path / "cls.onnx").run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})


def test_detector_at_another_size_boxes_in_input_pixels(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "det.pt", "det/faster_rcnn", spread=True, width=8, image_size=64)
    report = api.export(checkpoint, size="96x128")
    assert report["input"]["shape"] == [1, 3, 96, 128] and report["within_tolerance"], report
    image = torch.rand(1, 3, 96, 128)
    boxes, scores, labels = onnx_session(report["file"]).run(None, {"images": image.numpy()})
    assert len(boxes) > 0 and boxes[:, 2].max() <= 128 and boxes[:, 3].max() <= 96
    assert (np.diff(scores) <= 0).all() and labels.min() >= 1


def test_aspect_preserving_detector_exports_a_square_at_min_size(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "det.pt", "det/yolo", spread=True, width=8, image_size=64, min_size=80,
                                 max_size=120)
    report = api.export(checkpoint)
    assert report["input"]["shape"] == [1, 3, 96, 96] and report["within_tolerance"], report   # 80 -> multiple of 32


def test_check_fails_on_a_file_of_other_weights(tmp_path):
    """The built-in check is no rubber stamp: a file of another model's weights is out of tolerance."""
    checkpoint = tiny_checkpoint(tmp_path / "cls.pt", "cls/convnet", width=8, image_size=32)
    api.export(checkpoint, out=tmp_path / "cls.onnx")
    model, payload = api.load(checkpoint)
    with torch.no_grad():
        model.network.classifier.bias.add_(0.01)
    report = check_onnx(plan_export(model, payload["model_name"]), tmp_path / "cls.onnx")
    assert not report["within_tolerance"] and report["max_diff"]["logits"] > 5e-3


def test_detections_compare_as_a_set():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32)
    expected = {"boxes": boxes, "scores": np.array([0.9, 0.9], np.float32), "labels": np.array([1, 2])}
    swapped = {key: value[::-1] for key, value in expected.items()}
    assert _compare_detections(expected, swapped) == ({"boxes": 0.0, "scores": 0.0}, 0)
    moved = {**expected, "boxes": boxes + np.float32(0.01)}
    assert _compare_detections(expected, moved)[0]["boxes"] == pytest.approx(0.01, abs=1e-5)
    relabelled = {**expected, "labels": np.array([1, 3])}
    assert _compare_detections(expected, relabelled)[1] == 1
    assert _compare_detections(expected, {key: value[:1] for key, value in expected.items()})[1] == 1


def test_max_unpool_is_refused_with_one_line(cli, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "unpool.pt", "seg/encoder_decoder", width=4, depth=2, image_size=32,
                                 up="max_unpool")
    result = cli("export", checkpoint, "--format", "onnx")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "up=max_unpool" in lines[0] and "max unpooling" in lines[0]
    assert not (tmp_path / "unpool.onnx").exists()


@pytest.mark.parametrize("name, overrides, fragment", [
    ("det/fast_rcnn", {"width": 8, "image_size": 64}, "Selective Search"),
    ("det/rfcn", {"width": 8, "image_size": 64}, "ps_roi_align"),
    ("det/sliding_window", {"image_size": 64}, "brute-force"),
    ("seg/sliding_window", {"width": 4, "depth": 2, "crop": 9, "image_size": 32}, "unfold"),
    ("det/torchvision_ssd", {"image_size": 64}, "torchvision references"),
    ("det/yolo", {"width": 8, "image_size": 64, "dynamic": True}, "--dynamic does not apply"),
    ("pose/regress", {"width": 8, "image_size": 64}, "adaptive_avg_pool2d"),   # a 2x2 map pooled to a 4x4 grid
])
def test_unexportable_models_are_config_errors(tmp_path, name, overrides, fragment):
    dynamic = overrides.pop("dynamic", False)
    checkpoint = tiny_checkpoint(tmp_path / "model.pt", name, **overrides)
    with pytest.raises(ConfigError, match=fragment.replace("-", r"\-")):
        api.export(checkpoint, dynamic=dynamic)


def test_cli_prints_the_report(cli, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "mlp.pt", "cls/mlp", width=16, dataset="spirals")
    result = cli("export", checkpoint, "--dynamic", "--out", tmp_path / "out" / "mlp.onnx")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["input"] == {"name": "inputs", "shape": ["batch", 2], "dtype": "float32"}
    assert (tmp_path / "out" / "mlp.onnx").is_file() and "max |difference|" in result.stderr
    bad = cli("export", checkpoint, "--size", "big")
    assert bad.returncode == 2 and "--size big" in bad.stderr


def test_missing_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "mlp.pt", "cls/mlp", width=16, dataset="spirals")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"detseg\[export\]"):
        api.export(checkpoint)
