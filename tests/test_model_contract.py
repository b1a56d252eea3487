"""Every registered model obeys the model contract of ``detseg.models``, on two images of different sizes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detseg import registry
from detseg.config import resolve

SIZES = ((96, 128), (130, 100))    # (H, W): neither is the models' 128 x 128 input


def _targets(task: str, sizes) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    targets = []
    for index, (height, width) in enumerate(sizes):
        box = torch.tensor([[0.2 * width, 0.25 * height, 0.7 * width, 0.8 * height]])
        if task == "classification":
            targets.append({"labels": torch.tensor(1)})
        elif task == "segmentation":
            semantic = torch.zeros(height, width, dtype=torch.uint8)
            semantic[int(box[0, 1]):int(box[0, 3]), int(box[0, 0]):int(box[0, 2])] = 3
            targets.append({"semantic": semantic})
        elif task == "localization":
            targets.append({"labels": torch.tensor([2]), "boxes": box})
        elif task == "pose":
            joints = torch.rand(1, 14, 2, generator=generator) * torch.tensor([width, height])
            targets.append({"keypoints": torch.cat([joints, torch.full((1, 14, 1), 2.0)], dim=-1), "boxes": box})
        else:
            boxes = torch.cat([box, torch.tensor([[5.0, 5.0, 0.3 * width, 0.35 * height]])])
            targets.append({"boxes": boxes, "labels": torch.tensor([1, 4]), "iscrowd": torch.zeros(2, dtype=torch.long),
                            "image_id": index})
            if task == "instance":      # a mask per object; the second object is a person (label 7) with joints
                masks = torch.zeros(2, height, width, dtype=torch.uint8)
                for row, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                    masks[row, y1:y2, x1:x2] = 1
                joints = torch.zeros(2, 14, 3)
                joints[1, :, :2] = boxes[1, :2] + torch.rand(14, 2, generator=generator) * (boxes[1, 2:] - boxes[1, :2])
                joints[1, :, 2] = 2.0
                targets[-1].update(labels=torch.tensor([1, 7]), masks=masks, keypoints=joints)
    return targets


def _images(sizes) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


@pytest.mark.parametrize("name", registry.names())
def test_every_model_trains_and_predicts_on_images_of_any_size(name):
    entry = registry.get(name)
    config = resolve(entry.all_options(), {"proposal_cache": ""} if "proposal_cache" in entry.options else {})
    task = entry.make_task(config)
    info = task.placeholder_info(None)
    torch.manual_seed(0)
    model = entry.build(config, info)
    images, targets = _images(SIZES), _targets(task.name, SIZES)

    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses, name
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, key, value)
    sum(losses.values()).backward()
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, (name, parameter_name)
            assert torch.isfinite(parameter.grad).all(), (name, parameter_name)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == len(images)
    for output, (height, width) in zip(outputs, SIZES):
        assert isinstance(output, dict)
        if "boxes" in output:      # detectors and localization: XYXY inside this image's own pixels
            boxes = output["boxes"]
            assert boxes.shape[-1] == 4 and len(output["scores"]) == len(output["labels"]) == len(boxes)
            if len(boxes):
                assert float(boxes[:, 0::2].max()) <= width + 1e-3 and float(boxes[:, 1::2].max()) <= height + 1e-3
        if task.name == "segmentation":
            assert output["labels"].shape == (height, width)
            assert output["scores"].shape == (info["num_classes"], height, width)
        if task.name == "pose":
            assert output["keypoints"].shape == (1, 14, 3)
        if task.name == "classification":
            assert output["labels"].dim() == 0 and output["probabilities"].shape == (info["num_classes"],)


def test_training_mode_without_targets_is_an_error():
    entry = registry.get("seg/fcn_fullres")
    config = resolve(entry.all_options(), {})
    model = entry.build(config, entry.make_task(config).placeholder_info(None)).train()
    with pytest.raises(ValueError, match="targets"):
        model(_images(SIZES))


def test_models_never_import_tasks():
    """Importing every module under detseg.models in a fresh interpreter loads no detseg.tasks module."""
    root = Path(__file__).resolve().parents[1] / "detseg" / "models"
    modules = sorted("detseg." + ".".join(path.relative_to(root.parent).with_suffix("").parts).replace(".__init__", "")
                     for path in root.rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('detseg.tasks'))\n"
            f"assert not loaded, loaded\nprint(len({modules!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(modules) > 20


LECTURE_ORDER = ("sliding_window", "rcnn", "spp_net", "fast_rcnn", "faster_rcnn", "rfcn", "yolo", "ssd")


def test_no_detection_method_imports_a_later_one():
    folder = Path(__file__).resolve().parents[1] / "detseg" / "models" / "detection"
    for position, method in enumerate(LECTURE_ORDER):
        tree = ast.parse((folder / f"{method}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        later = set(LECTURE_ORDER[position + 1:]) & imported
        assert not later, f"{method} imports the later method(s) {sorted(later)}"


def test_a_model_module_that_fails_to_import_is_an_error_naming_it(monkeypatch, tmp_path):
    (tmp_path / "detseg_broken_models.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_MODEL_MODULES", registry._MODEL_MODULES + ("detseg_broken_models",))
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(ImportError, match="detseg_broken_models.*a_dependency_that_is_not_installed"):
        registry.names()
