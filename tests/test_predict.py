"""`detseg predict` as a tool: directories, globs and videos in; predictions.json, drawings, videos, JSON lines and
COCO results out; batching that changes nothing but speed; --conf / --max-det; bad paths are one line, exit 2."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from detseg import api, registry
from detseg.data.export import write_scenes
from detseg.engine.checkpoint import save_checkpoint

from .test_cli import _one_line_error

TINY = ["train_size=8", "val_size=4", "image_size=64", "batch_size=4", "width=8", "rois_per_image=16"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A faster_rcnn checkpoint after one tiny epoch: scores barely above chance, which is enough here."""
    run = tmp_path_factory.mktemp("run") / "faster_rcnn"
    api.train("det/faster_rcnn", epochs=1, out=run, overrides=TINY, progress=False, verbose=False)
    return run / "best.pt"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Ten 64 px scenes as COCO files: ``val/000001.png`` ... with image ids 1..10, and ``val.json``."""
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, train=0, val=10, size=64, seed=3, progress=False)
    return root


def _read(path):
    return json.loads(path.read_text())


def test_directory_batched_equals_one_at_a_time(cli, detector, scenes, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted((scenes / "val").glob("*.png"))[:6]:
        (folder / source.name).write_bytes(source.read_bytes())
    # Another size and a grayscale file in the same forward: the models take a list of images of any size.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 90), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "notes.txt").write_text("not an image, and not picked up: no image suffix")
    outputs = {}
    for batch in (1, 8):
        out = tmp_path / f"batch{batch}"
        # --max-det 10: an untrained detector's scores tie to ~1e-8, below which batched and single forwards differ
        result = cli("predict", detector, folder, "--out", out, "--batch-size", batch, "--max-det", 10)
        assert result.returncode == 0, result.stderr
        outputs[batch] = _read(out / "predictions.json")
    assert outputs[1] == outputs[8]
    names = [entry["image"] for entry in outputs[8]]
    assert names == sorted(str(path) for path in folder.glob("*.png"))            # sorted, only the images
    assert all((tmp_path / "batch8" / f"{(folder / name).stem}_pred.png").is_file()
               for name in ("000001.png", "wide.png"))
    wide = next(entry for entry in outputs[8] if entry["image"].endswith("wide.png"))
    boxes = np.array(wide["boxes"]).reshape(-1, 4)
    assert len(boxes) and (boxes[:, [0, 2]] <= 90 + 1e-3).all() and (boxes[:, [1, 3]] <= 45 + 1e-3).all()


def test_coco_results_ids_from_the_listed_order_or_the_coco_json(cli, detector, scenes, tmp_path):
    pattern = str(scenes / "val" / "00000[3-5].png")        # quoted glob: expanded by detseg, not the shell
    plain, matched = tmp_path / "plain", tmp_path / "matched"
    assert cli("predict", detector, pattern, "--out", plain, "--no-draw").returncode == 0
    assert cli("predict", detector, pattern, "--out", matched, "--coco", scenes / "val.json").returncode == 0
    assert not list(plain.glob("*.png")) and list(matched.glob("*_pred.png"))
    predictions = _read(plain / "predictions.json")
    assert [entry["image"].rsplit("/", 1)[1] for entry in predictions] == ["000003.png", "000004.png", "000005.png"]
    for out, ids in ((plain, [1, 2, 3]), (matched, [3, 4, 5])):
        results = _read(out / "coco_results.json")
        assert sorted({result["image_id"] for result in results}) == ids
        assert len(results) == sum(len(entry["boxes"]) for entry in predictions)
        categories = {category["id"] for category in _read(scenes / "val.json")["categories"]}
        assert {result["category_id"] for result in results} <= categories
        first = next(entry for entry in predictions if entry["boxes"])
        x1, y1, x2, y2 = first["boxes"][0]
        top = [result for result in results if result["image_id"] == ids[predictions.index(first)]][0]
        assert top["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)       # xywh, original pixels


def test_a_video_gives_a_drawn_video_and_json_lines(cli, detector, tmp_path):
    clip, frames = tmp_path / "clip.mp4", 5
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 60))
    for k in range(frames):
        writer.write(np.random.default_rng(k).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    result = cli("predict", detector, clip, "--out", out, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (out / "clip_pred.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == [f"{clip}#frame={k}" for k in range(frames)]
    assert [line["time_s"] for line in lines] == pytest.approx([k / 10 for k in range(frames)])
    assert _read(out / "predictions.json") == lines
    drawn = cv2.VideoCapture(str(out / "clip_pred.mp4"))
    size = (drawn.get(cv2.CAP_PROP_FRAME_WIDTH), drawn.get(cv2.CAP_PROP_FRAME_HEIGHT))
    count = 0
    while drawn.read()[0]:
        count += 1
    assert count == frames and size == (80, 60)
    assert not list(out.glob(".*partial*"))
    assert {result["image_id"] for result in _read(out / "coco_results.json")} <= set(range(1, frames + 1))


def test_conf_and_max_det_set_the_detector_knobs(detector, scenes):
    images = [scenes / "val" / "000001.png", scenes / "val" / "000002.png"]
    default = api.predict(detector, images)
    assert max(len(entry["scores"]) for entry in default) > 3
    assert all(len(entry["scores"]) <= 3 for entry in api.predict(detector, images, max_det=3))
    scores = sorted(score for entry in default for score in entry["scores"])
    conf = scores[len(scores) // 2]
    strict = api.predict(detector, images, conf=conf)
    kept = [score for entry in strict for score in entry["scores"]]
    assert 0 < len(kept) < len(scores) and min(kept) >= conf - 1e-4           # scores are rounded to 4 digits


def test_every_detector_family_has_the_knobs():
    families = [name for name in registry.names() if name.startswith("det/")]
    for name in families:
        options = registry.get(name).all_options()
        assert {"score_thresh", "detections_per_image"} <= set(options), name
    from .detection_support import tiny_detector
    assert tiny_detector("det/rfcn", detections_per_image=7).postprocess.detections_per_image == 7


@pytest.mark.parametrize("model_name, fragments", [
    ("cls/convnet", ["--conf", "cls/convnet is a classification model"]),
    ("seg/fcn_fullres", ["--conf", "seg/fcn_fullres is a segmentation model"]),
])
def test_conf_on_a_model_without_the_knob_is_one_line(cli, tmp_path, scenes, model_name, fragments):
    checkpoint = tmp_path / "model.pt"           # only the model's name is read before the flags are refused
    save_checkpoint(checkpoint, {"model_name": model_name, "config": {}, "info": {}, "model": {}})
    _one_line_error(cli("predict", checkpoint, scenes / "val" / "000001.png", "--conf", 0.5), *fragments)


def test_bad_paths_stop_and_bad_files_in_a_directory_are_skipped(cli, detector, scenes, tmp_path):
    _one_line_error(cli("predict", detector, tmp_path / "absent.png"), "absent.png", "not found")
    _one_line_error(cli("predict", detector, str(tmp_path / "*.jpg")), "*.jpg", "no image or video files")
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    _one_line_error(cli("predict", detector, broken), "broken.mp4", "cannot open video")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "000001.png").write_bytes((scenes / "val" / "000001.png").read_bytes())
    (folder / "corrupt.png").write_bytes((scenes / "val" / "000002.png").read_bytes()[:200])   # truncated
    broken.rename(folder / "broken.mp4")
    result = cli("predict", detector, folder, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert [entry["image"] for entry in _read(tmp_path / "out" / "predictions.json")] == [str(folder / "000001.png")]
    assert "skipped 2 of 3 files" in result.stderr and "corrupt.png" in result.stderr
    _one_line_error(cli("predict", detector, folder / "corrupt.png"), "corrupt.png")


def test_draw_score_draws_the_regions_above_it_and_is_refused_where_nothing_is_scored(cli, detector, scenes,
                                                                                          tmp_path):
    image = scenes / "val" / "000001.png"
    drawings = {}
    for score in (0.0, 1.0):
        out = tmp_path / f"at{score}"
        result = cli("predict", detector, image, "--out", out, "--quiet", "--conf", 0.0, "--draw-score", score)
        assert result.returncode == 0, result.stderr
        drawings[score] = np.asarray(Image.open(out / "000001_pred.png")).astype(int)
        found = _read(out / "predictions.json")[0]
    assert found["scores"], "the tiny detector keeps its detections at --conf 0"
    # at 1.0 no detection is drawn; at 0.0 every one of them is: the drawings differ
    assert np.abs(drawings[0.0] - drawings[1.0]).sum() > 0
    _one_line_error(cli("predict", detector, image, "--draw-score", 1.5), "--draw-score 1.5", "0..1")
    checkpoint = tmp_path / "seg.pt"
    save_checkpoint(checkpoint, {"model_name": "seg/fcn_fullres", "config": {}, "info": {}, "model": {}})
    _one_line_error(cli("predict", checkpoint, image, "--draw-score", 0.3), "--draw-score", "seg/fcn_fullres")
