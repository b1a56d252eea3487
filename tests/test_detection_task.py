"""The detection task through the engine and the CLI: files, COCO-exact metrics, COCO input, predictions."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detseg import api, registry
from detseg.config import resolve
from detseg.engine.trainer import Trainer

TINY = ["train_size=12", "val_size=6", "image_size=64", "batch_size=4", "width=8", "rois_per_image=16"]


def _pycocotools_ap(ground_truth_json, predictions):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ground_truth_json))
        evaluator = COCOeval(gt, gt.loadRes(predictions), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_faster_rcnn_run_from_coco_files_reports_exactly_pycocotools_ap(tmp_path, cli, scenes_files):
    run = tmp_path / "run"
    result = cli("train", "det/faster_rcnn", "--data", scenes_files / "train.json", "--val",
                 scenes_files / "val.json", "--epochs", "2", "--out", run, *TINY[2:])
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "last.pt", "best.pt", "history.csv", "curves.png", "val_predictions.png",
                 "metrics.json", "predictions.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = json.loads((run / "predictions.json").read_text())
    assert predictions, "an untrained detector still proposes boxes above the 0.05 score threshold"
    assert {"image_id", "category_id", "bbox", "score"} <= set(predictions[0])
    stats = _pycocotools_ap(scenes_files / "val.json", str(run / "predictions.json"))
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    assert [metrics[key] for key in keys] == pytest.approx(list(stats[:6]), abs=1e-12)
    assert metrics["detections_per_image"] <= 100
    # `detseg eval` without --data scores the checkpoint on the files it was trained on, not on generated scenes.
    again = json.loads(cli("eval", run / "best.pt").stdout)
    assert [again[key] for key in keys] == pytest.approx([metrics[key] for key in keys], abs=1e-12)


def test_predict_draws_boxes_on_grayscale_and_odd_sized_images(tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", "det/faster_rcnn", "--epochs", "1", "--out", run, *TINY).returncode == 0
    image = tmp_path / "grey.png"
    Image.fromarray((np.random.default_rng(0).random((45, 90)) * 255).astype(np.uint8)).save(image)
    result = cli("predict", run / "best.pt", image, "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout.strip().splitlines()[0])
    boxes = np.array(prediction["boxes"]).reshape(-1, 4)
    assert len(boxes) == len(prediction["scores"]) == len(prediction["labels"])
    assert (boxes[:, [0, 2]] <= 90 + 1e-3).all() and (boxes[:, [1, 3]] <= 45 + 1e-3).all()   # original pixels
    assert (tmp_path / "pred" / "grey_pred.png").is_file()


def test_eval_changes_test_time_knobs_only(tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", "det/faster_rcnn", "--epochs", "1", "--out", run, *TINY).returncode == 0
    result = cli("eval", run / "best.pt", "rpn_post_nms_test=5", "score_thresh=0.2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["detections_per_image"] <= 100
    model, payload = api.load(run / "best.pt", overrides={"rpn_post_nms_test": 5})
    assert model.proposer.post_nms_test == 5 and payload["config"]["rpn_post_nms_test"] == 5
    result = cli("eval", run / "best.pt", "head_hidden=32")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "head_hidden=32 changes the model's weights" in result.stderr.strip().splitlines()[-1]


def test_crowd_regions_take_no_part_in_training():
    entry = registry.get("det/faster_rcnn")
    config = resolve(entry.all_options(), {"width": 8, "image_size": 64})
    model = entry.build(config, {"num_classes": 8, "image_size": 64})
    images = torch.zeros(1, 3, 64, 64)
    crowd = {"boxes": torch.tensor([[0.0, 0.0, 64.0, 64.0]]), "labels": torch.tensor([3]),
             "iscrowd": torch.tensor([1])}
    losses = model(images, [crowd])
    # A crowd box is never a positive: no box regression is trained, and no RoI is labelled background on it.
    assert float(losses["rpn_box"]) == 0.0 and float(losses["roi_box"]) == 0.0
    rois, labels, _ = model.sample_rois([torch.tensor([[4.0, 4.0, 40.0, 40.0]])], [crowd])
    assert len(labels) == 0


def test_bad_detection_input_is_one_clear_line(tmp_path, cli, scenes_files):
    result = cli("train", "det/faster_rcnn", "--data", scenes_files / "train.json", "--out", tmp_path / "r")
    assert result.returncode == 2 and "--val" in result.stderr
    result = cli("train", "det/faster_rcnn", "anchor_scales=8,x", "--out", tmp_path / "r")
    assert result.returncode == 2 and "anchor_scales" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def wide_scenes_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    from detseg.data.export import write_scenes
    write_scenes(out, train=4, val=6, size=(96, 64), seed=0, progress=False)
    return out


@pytest.mark.parametrize("files, knobs, shape", [
    ("scenes_files", {"loading": "memory"}, (48, 48)),
    ("scenes_files", {"loading": "stream"}, (48, 48)),
    ("wide_scenes_files", {"loading": "stream"}, (48, 48)),                           # squashed to a square
    ("wide_scenes_files", {"loading": "stream", "min_size": 40, "max_size": 56}, (37, 56)),   # aspect kept
    ("wide_scenes_files", {"loading": "memory", "min_size": 40}, (40, 60))])
def test_metrics_map_model_input_boxes_back_to_the_original_pixels(tmp_path, request, files, knobs, shape):
    """An oracle that returns the true boxes in model-input pixels (48 px squares, or aspect-preserving sizes) of
    64 x 64 or 96 x 64 px validation images scores AP 1, in memory or streamed: the scorer's mapping to the original
    pixels is exact, and metrics.json's AP is pycocotools' own."""
    from detseg.models.base import DetsegModel

    scenes_files = request.getfixturevalue(files)
    entry = registry.get("det/faster_rcnn")
    config = resolve(entry.all_options(), {"image_size": 48, "width": 8, "batch_size": 4, **knobs})
    task = entry.make_task(config)
    bundle = task.make_data(str(scenes_files / "train.json"), str(scenes_files / "val.json"))
    items = [bundle.val[index] for index in range(len(bundle.val))]
    assert all(tuple(image.shape[-2:]) == shape for image, _ in items)
    truth = {bytes(image.numpy()): target for image, target in items}

    class Oracle(DetsegModel):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))      # the trainer wants something to optimise

        def training_losses(self, images, targets):
            return {}

        def inference(self, images):
            outputs = []
            for image in images:
                target = truth[bytes(image.cpu().numpy())]
                keep = target["iscrowd"] == 0
                outputs.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep],
                                "scores": torch.ones(int(keep.sum()))})
            return outputs

    trainer = Trainer(Oracle(), task, bundle, config, progress=False)
    scorer = task.scorer(bundle)
    metrics = trainer.evaluate(scorer=scorer)
    assert metrics["ap"] >= 0.99 and metrics["ap50"] >= 0.99
    task.write_outputs(scorer, tmp_path)
    stats = _pycocotools_ap(scenes_files / "val.json", str(tmp_path / "predictions.json"))
    assert [metrics[key] for key in ("ap", "ap50", "ap75")] == pytest.approx(list(stats[:3]), abs=1e-12)
