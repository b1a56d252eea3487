"""cap/densecap: vocabulary, LSTM captioner, the DenseCap metric on hand-made cases, METEOR, training end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detseg import registry
from detseg.captioning_metrics import (densecap_scores, interpolated_ap, merge_regions, meteor_scorer,
                                       meteor_unavailable_reason)
from detseg.config import resolve
from detseg.data.dataset import InstanceDataset
from detseg.data.scenes import ScenesSource
from detseg.models.captioning.captioner import LSTMCaptioner, Vocabulary, tokenize
from detseg.tasks.captioning import caption_target
from tests.conftest import invoke_cli
from tests.detection_support import fit
from torchvision.ops import box_iou

JAVA = meteor_unavailable_reason() is None
needs_java = pytest.mark.skipif(not JAVA, reason=str(meteor_unavailable_reason()))

CAPTIONS = ["small red star left of a large blue circle", "large blue circle right of a small red star",
            "medium green person in the center"]


def test_tokenizer_and_vocabulary_round_trip():
    assert tokenize("A small, red star.") == ["a", "small", "red", "star"]
    vocabulary = Vocabulary.build(CAPTIONS, min_count=1, max_length=16)
    for caption in CAPTIONS:
        assert vocabulary.decode(vocabulary.encode(caption)) == caption
    assert vocabulary.decode(vocabulary.encode("small purple star")) == "small <unk> star"
    rows = vocabulary.targets(CAPTIONS[:2])
    assert rows.shape == (2, 17) and int(rows[0, 9]) == Vocabulary.end and int(rows[0, 10]) == Vocabulary.pad
    rebuilt = Vocabulary.from_info(json.loads(json.dumps(vocabulary.to_info())))
    assert rebuilt.words == vocabulary.words
    # min_count drops words seen once; max_length cuts
    rare = Vocabulary.build(CAPTIONS, min_count=2, max_length=3)
    assert "person" not in rare.words and len(rare.encode(CAPTIONS[0])) == 3


@pytest.mark.parametrize("condition", ["first", "every"])
def test_captioner_overfits_and_greedy_and_beam_reproduce_the_captions(condition):
    torch.manual_seed(0)
    vocabulary = Vocabulary.build(CAPTIONS, max_length=12)
    captioner = LSTMCaptioner(16, len(vocabulary), embed=32, hidden=64, condition=condition)
    codes = torch.randn(3, 16)
    words = vocabulary.targets(CAPTIONS)
    optimizer = torch.optim.Adam(captioner.parameters(), lr=1e-2)
    first = float(captioner.loss(codes, words).detach())
    for _ in range(150):
        loss = captioner.loss(codes, words)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05 * first
    for beam in (1, 3):
        ids = captioner.generate(codes, vocabulary.max_length, beam=beam)
        assert [vocabulary.decode(row) for row in ids.tolist()] == CAPTIONS, beam


def test_beam_search_finds_a_likelier_caption_than_greedy_when_they_differ():
    torch.manual_seed(3)
    captioner = LSTMCaptioner(8, 12, embed=8, hidden=16)
    codes = torch.randn(64, 8)

    def log_likelihood(ids):
        captions = torch.where(ids == 0, 0, ids)
        logits = captioner(codes, captions)
        mask = captions != 0
        values = logits.log_softmax(-1).gather(2, captions[..., None])[..., 0]
        return (values * mask).sum(1)

    with torch.no_grad():
        greedy = log_likelihood(captioner.generate(codes, 6, beam=1))
        beam = log_likelihood(captioner.generate(codes, 6, beam=5))
    assert bool((beam >= greedy - 1e-4).all()) and bool((beam > greedy + 1e-4).any())


def test_merging_of_overlapping_ground_truths():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60.]])
    merged, references = merge_regions(boxes, ["a", "b", "c"])
    assert len(merged) == 2 and sorted(map(sorted, references)) == [["a", "b"], ["c"]]
    assert torch.allclose(merged[0], torch.tensor([0, 0, 10, 10.5]))


def test_interpolated_ap():
    assert interpolated_ap(np.array([True, True]), 2) == 1.0
    assert interpolated_ap(np.array([False, False]), 2) == 0.0
    # one hit at rank 2 of 2 regions: precision 0.5 up to recall 0.5, nothing beyond
    assert interpolated_ap(np.array([False, True]), 2) == pytest.approx(0.5 * 51 / 101)


class ExactMeteor:
    """A stand-in scorer for the metric's bookkeeping (1 when the caption is a reference, else 0): not METEOR."""

    def __call__(self, pairs):
        return [1.0 if candidate in references else 0.0 for candidate, references in pairs]


def _case():
    truth = [{"boxes": torch.tensor([[0, 0, 20, 20], [40, 40, 70, 70.]]), "captions": CAPTIONS[:2]}]
    return truth


def test_metric_perfect_boxes_and_captions_give_one():
    truth = _case()
    perfect = [{"boxes": truth[0]["boxes"], "scores": torch.tensor([0.9, 0.8]), "captions": CAPTIONS[:2]}]
    metrics = densecap_scores(perfect, truth, ExactMeteor())
    assert metrics["det_map"] == 1.0 and metrics["densecap_map"] == 1.0


def test_metric_right_boxes_empty_captions_score_only_the_meteor_zero_column():
    truth = _case()
    empty = [{"boxes": truth[0]["boxes"], "scores": torch.tensor([0.9, 0.8]), "captions": ["", ""]}]
    metrics = densecap_scores(empty, truth, ExactMeteor())
    grid = metrics["densecap_ap_grid"]
    assert all(value == 1.0 for key, value in grid.items() if key.endswith("meteor0"))
    assert all(value == 0.0 for key, value in grid.items() if not key.endswith("meteor0"))
    assert metrics["densecap_map"] == pytest.approx(1 / 6)
    # a duplicate detection of a claimed region is a false positive, and the unclaimed region caps recall at 0.5:
    # precision 1 up to recall 0.5 -> 51 of the 101 recall points
    duplicate = [{"boxes": truth[0]["boxes"][[0, 0]], "scores": torch.tensor([0.9, 0.8]),
                  "captions": CAPTIONS[:1] * 2}]
    assert densecap_scores(duplicate, truth, ExactMeteor())["det_map"] == pytest.approx(51 / 101)


def test_metric_without_meteor_reports_it_unavailable_and_no_densecap_map():
    truth = _case()
    metrics = densecap_scores([{"boxes": truth[0]["boxes"], "scores": torch.tensor([0.9, 0.8]),
                                "captions": CAPTIONS[:2]}], truth, None)
    assert "densecap_map" not in metrics and metrics["meteor"] == "unavailable" and metrics["det_map"] == 1.0


@needs_java
def test_meteor_of_known_pairs():
    with meteor_scorer() as meteor:
        same, different, partial = meteor([(CAPTIONS[0], [CAPTIONS[0]]), ("green triangle", [CAPTIONS[0]]),
                                           ("small red star", [CAPTIONS[0]])])
    assert same == pytest.approx(1.0, abs=0.01) and different < 0.05 and 0.15 < partial < same


def tiny_densecap(**overrides):
    entry = registry.get("cap/densecap")
    config = resolve(entry.all_options(), {"width": 8, "image_size": 80, **overrides})
    torch.manual_seed(0)
    dataset = InstanceDataset(ScenesSource(4, size=80, seed=5), fields=("captions",))
    pairs = [dataset[index] for index in range(4)]
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
    targets = [caption_target(target) for _, target in pairs]
    vocabulary = Vocabulary.build([c for t in targets for c in t["captions"]], max_length=16)
    model = entry.build(config, {"num_classes": 2, "image_size": 80, "vocabulary": vocabulary.to_info()})
    return model, images, targets


def test_densecap_overfits_a_few_scenes_and_captions_them():
    model, images, targets = tiny_densecap()
    before = {k: float(v) for k, v in model(images, targets).items()}
    assert set(before) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box", "caption"}
    fit(model, images, targets, steps=150, lr=3e-3)
    after = {k: float(v) for k, v in model(images, targets).items()}
    assert after["caption"] < 0.25 * before["caption"], (before, after)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    right = total = 0
    for output, target in zip(outputs, targets):
        assert len(output["captions"]) == len(output["boxes"]) and bool((output["labels"] == 1).all())
        overlaps = box_iou(target["boxes"], output["boxes"]) if len(output["boxes"]) else None
        for g, caption in enumerate(target["captions"]):
            total += 1
            if overlaps is None:
                continue
            best = int(overlaps[g].argmax())
            right += int(float(overlaps[g, best]) > 0.5 and output["captions"][best] == caption)
    assert right >= 0.5 * total, (right, total)


def test_an_image_without_objects_gives_a_finite_loss():
    model, images, targets = tiny_densecap()
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.long), "image_id": 0, "captions": []}
    losses = model(images[:2], [targets[0], empty])
    assert all(torch.isfinite(v) for v in losses.values())
    alone = model(images[:1], [empty])
    total = sum(alone.values())
    assert torch.isfinite(total)
    total.backward()


def test_training_run_writes_densecap_metrics_and_captioned_predictions(tmp_path, scenes_files):
    run = tmp_path / "run"
    result = invoke_cli("train", "cap/densecap", "--epochs", "1", "--out", run, "train_size=8", "val_size=4",
                        "image_size=64", "width=8", "batch_size=4")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("det_map", "bleu4", "cider", "meteor"):
        assert key in metrics, key
    assert ("densecap_map" in metrics) == JAVA
    predictions = json.loads((run / "predictions.json").read_text())
    assert predictions and all(set(p) == {"image_id", "bbox", "score", "caption"} for p in predictions)
    assert (run / "val_predictions.png").stat().st_size > 0
    out = tmp_path / "predicted"
    image = sorted((scenes_files / "val").glob("*.png"))[0]
    predicted = invoke_cli("predict", run / "best.pt", image, "--out", out)
    assert predicted.returncode == 0, predicted.stderr
    described = json.loads((out / "predictions.json").read_text())
    assert described and "captions" in described[0]


def _visual_genome(tmp_path, regions):
    images = tmp_path / "VG_100K"
    images.mkdir()
    from PIL import Image
    for image_id in (1, 2):
        Image.new("RGB", (40, 30), (image_id * 50, 0, 0)).save(images / f"{image_id}.jpg")
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(regions))
    return path, images


def test_convert_visual_genome_regions_to_captioned_coco(tmp_path):
    regions = [{"id": 1, "regions": [{"region_id": 11, "image_id": 1, "x": 2, "y": 3, "width": 10, "height": 8,
                                      "phrase": "a red  square "},
                                     {"region_id": 12, "image_id": 1, "x": 30, "y": 20, "width": 50, "height": 50,
                                      "phrase": "clipped at the corner"},
                                     {"region_id": 13, "image_id": 1, "x": 45, "y": 0, "width": 5, "height": 5,
                                      "phrase": "outside the image"}]},
               {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "x": 0, "y": 0, "width": 40, "height": 30,
                                      "phrase": "the whole picture"}]},
               {"id": 3, "regions": [{"region_id": 31, "image_id": 3, "x": 0, "y": 0, "width": 4, "height": 4,
                                      "phrase": "no file"}]}]
    path, images = _visual_genome(tmp_path, regions)
    out = tmp_path / "vg"
    result = invoke_cli("data", "convert-vg", path, images, "--out", out, "--val-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["missing_images"] == 1 and summary["empty_regions_dropped"] == 1
    train = json.loads((out / "train.json").read_text())
    assert [a["caption"] for a in train["annotations"]] == ["a red square", "clipped at the corner"]
    assert train["annotations"][1]["bbox"] == [30.0, 20.0, 10.0, 10.0]
    assert invoke_cli("data", "check", out / "train.json").returncode == 0
    assert json.loads((out / "val.json").read_text())["annotations"][0]["caption"] == "the whole picture"


def test_convert_visual_genome_bad_field_is_one_clear_line(tmp_path):
    regions = [{"id": 1, "regions": [{"region_id": 11, "image_id": 1, "x": "two", "y": 3, "width": 10,
                                      "height": 8, "phrase": "a square"}]}]
    path, images = _visual_genome(tmp_path, regions)
    result = invoke_cli("data", "convert-vg", path, images, "--out", tmp_path / "vg")
    assert result.returncode == 2
    assert "region_descriptions.json" in result.stderr and "'x'" in result.stderr and "Traceback" not in result.stderr


def test_export_refuses_densecap_with_one_line(tmp_path):
    model, _, _ = tiny_densecap()
    from detseg.export import plan_export
    from detseg.errors import ConfigError
    with pytest.raises(ConfigError, match="cap/densecap: no ONNX export"):
        plan_export(model.eval(), "cap/densecap")


@pytest.mark.parametrize("source", ["image", "stem"])
def test_colour_skip_appends_cell_means_of_a_shallow_map_and_trains(source):
    model, images, targets = tiny_densecap(colour_skip=source, condition="every")
    normalized = model.transform.batch(images).normalized
    features = model.backbone(normalized)
    shallow = normalized if source == "image" else model.backbone.body.forward_stages(normalized)[0]
    assert features.shape[1] == model.backbone.body.out_channels + shallow.shape[1]
    cell = shallow.shape[-1] // features.shape[-1]
    assert torch.allclose(features[0, -shallow.shape[1]:, 0, 0], shallow[0, :, :cell, :cell].mean(dim=(1, 2)),
                          atol=1e-5)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_pixel_code_puts_the_regions_own_pixels_beside_its_code():
    model, images, targets = tiny_densecap(pixel_code=3)
    head_hidden = resolve(registry.get("cap/densecap").all_options())["head_hidden"]
    assert model.captioner.project.in_features == head_hidden + 3 * 3 * 3
    batch = model.transform.batch(images[:1])
    features = model.roi_head.per_image(model.backbone(batch.normalized))
    # A box of 3 x 3 pixel centres on a one-colour patch samples that colour: the last 27 numbers are the patch's.
    batch.normalized[0, :, 10:30, 10:30] = torch.tensor([0.5, -1.0, 2.0])[:, None, None]
    codes = model.caption_codes(features, batch, [torch.tensor([[12.0, 12.0, 24.0, 24.0]])])
    pixels = codes[0, -27:].view(3, 3, 3)
    assert torch.allclose(pixels, torch.tensor([0.5, -1.0, 2.0])[:, None, None].expand(3, 3, 3), atol=1e-6)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_a_checkpoint_saved_before_pixel_code_rebuilds_without_it():
    options = registry.get("cap/densecap").all_options()
    assert resolve(options)["pixel_code"] == 7                                   # a new run: the default
    assert resolve(options, base={"beam": 1})["pixel_code"] == 0                 # a config that predates the knob
    assert resolve(options, base={"pixel_code": 5})["pixel_code"] == 5
