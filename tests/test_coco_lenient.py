"""COCO files with degenerate polygons (< 3 points, as real COCO train2017 has): strict by default, lenient on
request (``strict=false``): boxes kept, degenerate polygons dropped, a count printed."""
import json

import numpy as np
import pytest

from detseg import registry
from detseg.config import resolve
from detseg.data.coco import CocoSource
from detseg.data.dataset import InstanceDataset
from detseg.data.sources import open_source
from detseg.errors import DataError

from .test_coco_voc import valid_coco, write_coco


def degenerate_coco() -> dict:
    """The valid fixture with annotation 10's only polygon cut to 2 points, and a new annotation 13 whose second
    polygon is a single point beside a good triangle."""
    data = valid_coco()
    data["annotations"][0]["segmentation"] = [[2, 1, 7, 1]]
    data["annotations"].append({"id": 13, "image_id": 1, "category_id": 3, "bbox": [20, 10, 6, 6],
                                "segmentation": [[20, 10, 26, 10, 20, 16], [25, 15]]})
    return data


def test_strict_is_the_default_and_its_error_points_to_strict_false(tmp_path):
    path = write_coco(tmp_path, degenerate_coco())
    with pytest.raises(DataError) as caught:
        CocoSource(path)
    message = str(caught.value)
    assert "annotation id 10" in message and "'segmentation[0]'" in message and "has 4" in message
    assert "strict=false" in message and "\n" not in message
    with pytest.raises(DataError, match="strict=false"):
        open_source(path)


def test_lenient_keeps_boxes_drops_degenerate_polygons_and_says_how_many(tmp_path, capsys):
    source = open_source(write_coco(tmp_path, degenerate_coco()), strict=False)
    assert "2 degenerate polygons (< 3 points) dropped, boxes kept" in capsys.readouterr().err
    assert source.degenerate_polygons == 2 and len(source.annotations) == 4
    by_id = {annotation["id"]: annotation for annotation in source.annotations}
    assert "segmentation" not in by_id[10] and by_id[10]["bbox"] == [2.0, 1.0, 5.0, 4.0]
    assert by_id[10]["area"] == 20.0                                   # no mask left: the box's area
    assert by_id[13]["segmentation"] == [[20, 10, 26, 10, 20, 16]]     # the good triangle stays
    assert by_id[13]["area"] == pytest.approx(18.0, abs=3)             # from the triangle, not its box (36)
    # The Dataset gives the box-only annotation its filled box as the mask, as for any box-only annotation.
    image, target = InstanceDataset(source)[0]
    masks = target["masks"].numpy()
    assert masks.shape[0] == 3 and masks[0].sum() == 20 and masks[0][1:5, 2:7].all()


def test_odd_polygons_stay_an_error_in_lenient_mode(tmp_path):
    data = valid_coco()
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 1, 5, 5, 3]]
    with pytest.raises(DataError, match="has 7"):
        CocoSource(write_coco(tmp_path, data), strict=False)


def test_the_strict_knob_of_a_detection_run_and_data_check_lenient(tmp_path, cli):
    path = write_coco(tmp_path, degenerate_coco())
    entry = registry.get("det/faster_rcnn")
    assert entry.all_options()["strict"].default is True
    for strict, fails in ((True, True), (False, False)):
        task = entry.make_task(resolve(entry.all_options(), {"strict": strict, "image_size": 32}))
        if fails:
            with pytest.raises(DataError, match="strict=false"):
                task.make_data(str(path), str(path))
        else:
            bundle = task.make_data(str(path), str(path))
            assert len(bundle.train) == 2 and len(bundle.val) == 2
    result = cli("data", "check", path)
    assert result.returncode == 2 and "strict=false" in result.stderr
    result = cli("data", "check", path, "--lenient")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["degenerate_polygons_dropped"] == 2 and summary["annotations"] == 4
    assert "dropped, boxes kept" in result.stderr
    assert np.isclose(summary["per_category"]["circle"], 3)
