"""InstanceDataset, transforms, collate and ground truth over a small in-memory source."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from detseg.data.dataset import InstanceDataset, coco_ground_truth, detection_collate, keypoint_flip_index, label_names
from detseg.data.transforms import RandomHorizontalFlipWithJoints
from detseg.data.records import LSP_FLIP, LSP_JOINTS, Sample
from detseg.errors import DataError


class MemorySource:
    """The Source protocol in a few lines: samples held in memory."""

    def __init__(self, categories: list[dict], samples: list[Sample]):
        self.categories, self._samples = categories, samples
        self.images = [{"id": s.image_id, "file_name": s.file_name, "width": s.image.shape[1],
                        "height": s.image.shape[0]} for s in samples]

    def __len__(self):
        return len(self._samples)

    def sample(self, index):
        return self._samples[index]


CATEGORIES = [{"id": 1, "name": "square"},
              {"id": 2, "name": "person", "keypoints": list(LSP_JOINTS)},
              {"id": 5, "name": "blob"}]  # non-contiguous id: label 3


def blob_mask() -> np.ndarray:
    mask = np.zeros((12, 16), np.uint8)
    mask[3:9, 5:11] = 1
    return mask


def person_keypoints() -> list[float]:
    joints = np.zeros((14, 3))
    joints[LSP_JOINTS.index("r_ankle")] = (11, 10, 2)
    joints[LSP_JOINTS.index("l_ankle")] = (13, 10, 2)
    joints[LSP_JOINTS.index("neck")] = (8, 5, 2)
    joints[LSP_JOINTS.index("head_top")] = (12, 6, 1)
    return joints.ravel().tolist()


def make_source() -> MemorySource:
    blob_rle = mask_utils.encode(np.asfortranarray(blob_mask()))
    annotated = Sample(image=np.full((12, 16, 3), 40, np.uint8), image_id=7, file_name="a.png", annotations=[
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [2, 1, 5, 4], "area": 20.0, "iscrowd": 0,
         "segmentation": [[2, 1, 7, 1, 7, 5, 2, 5]]},
        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [5, 3, 6, 6], "area": 36.0, "iscrowd": 0,
         "segmentation": {"size": [12, 16], "counts": blob_rle["counts"].decode()}},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [10, 6, 4, 5], "area": 20.0, "iscrowd": 0,
         "keypoints": person_keypoints(), "num_keypoints": 4, "caption": "a person"},
    ])
    empty = Sample(image=np.zeros((8, 10, 3), np.uint8), image_id=8, annotations=[], file_name="b.png")
    own_masks = np.zeros((2, 10, 10), np.uint8)
    own_masks[0, 1:4, 1:4] = 1
    own_masks[1, 5:9, 2:9] = 1
    semantic = np.zeros((10, 10), np.uint8)
    semantic[1:4, 1:4] = 5
    with_masks = Sample(image=np.zeros((10, 10, 3), np.uint8), image_id=9, file_name="c.png", masks=own_masks,
                        semantic=semantic, annotations=[
                            {"id": 4, "image_id": 9, "category_id": 5, "bbox": [1, 1, 3, 3], "area": 9.0},
                            {"id": 5, "image_id": 9, "category_id": 1, "bbox": [2, 5, 7, 4], "area": 28.0,
                             "iscrowd": 1}])
    return MemorySource(CATEGORIES, [annotated, empty, with_masks])


def test_item_types_shapes_and_dtypes():
    dataset = InstanceDataset(make_source())
    assert len(dataset) == 3 and dataset.num_classes == 4 and dataset.num_keypoints == 14
    image, target = dataset[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 12, 16)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.dtype == torch.float32 and tuple(boxes.canvas_size) == (12, 16)
    assert boxes.tolist() == [[2, 1, 7, 5], [5, 3, 11, 9], [10, 6, 14, 11]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1, 3, 2]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (3, 12, 16)
    keypoints = target["keypoints"]
    assert keypoints.dtype == torch.float32 and keypoints.shape == (3, 14, 3)
    assert keypoints[:2].abs().sum() == 0  # no keypoints for square and blob
    assert keypoints[2, LSP_JOINTS.index("head_top")].tolist() == [12, 6, 1]
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0, 0, 0]
    assert target["area"].dtype == torch.float32 and target["area"].tolist() == [20, 36, 20]
    assert target["image_id"] == 7 and isinstance(target["image_id"], int)
    semantic = target["semantic"]
    assert isinstance(semantic, tv_tensors.Mask) and semantic.dtype == torch.int64 and semantic.shape == (12, 16)
    assert target["captions"] == ["", "", "a person"]


def test_masks_decode_to_expected_pixels_and_semantic_paints_in_order():
    _, target = InstanceDataset(make_source())[0]
    masks = target["masks"].numpy()
    expected_square = np.zeros((12, 16), np.uint8)
    expected_square[1:5, 2:7] = 1                      # polygon (2,1)-(7,5): pixels x 2..6, y 1..4
    expected_box = np.zeros((12, 16), np.uint8)
    expected_box[6:11, 10:14] = 1                      # no segmentation: the filled box
    np.testing.assert_array_equal(masks[0], expected_square)
    np.testing.assert_array_equal(masks[1], blob_mask())  # compressed RLE round trip
    np.testing.assert_array_equal(masks[2], expected_box)
    semantic = target["semantic"].numpy()
    assert semantic[1, 2] == 1 and semantic[8, 5] == 3 and semantic[10, 13] == 2 and semantic[0, 0] == 0
    assert semantic[4, 6] == 3  # square and blob overlap: the later annotation (blob) is on top
    assert semantic[8, 10] == 2  # blob and person overlap: person is later


def test_empty_image_and_source_given_masks_and_semantic():
    dataset = InstanceDataset(make_source())
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 10)
    assert empty["keypoints"].shape == (0, 14, 3) and empty["labels"].shape == (0,)
    assert empty["semantic"].shape == (8, 10) and empty["semantic"].sum() == 0
    _, given = dataset[2]
    assert given["masks"][1].sum() == 28 and given["iscrowd"].tolist() == [0, 1]
    # The source's semantic map holds category id 5; the dataset speaks label 3.
    assert given["semantic"][2, 2] == 3 and set(given["semantic"].unique().tolist()) == {0, 3}


def test_semantic_with_unknown_category_id_is_a_data_error():
    source = make_source()
    source._samples[2].semantic[0, 0] = 4
    with pytest.raises(DataError, match=r"c.png: image id 9: field 'semantic'.*no category \(got \[4\]\)"):
        InstanceDataset(source)[2]


def test_corrupt_compressed_rle_is_a_data_error():
    source = make_source()
    whole = mask_utils.encode(np.asfortranarray(np.ones((100, 100), np.uint8)))["counts"].decode()
    source._samples[0].annotations[1]["segmentation"]["counts"] = whole  # sums to 100*100, not 12*16
    with pytest.raises(DataError, match=r"a.png: image id 7: annotation id 2: field 'segmentation'"):
        InstanceDataset(source)[0]


def test_horizontal_flip_moves_boxes_masks_semantic_and_keypoints_together():
    plain = InstanceDataset(make_source())
    flipped = InstanceDataset(make_source(), transforms=v2.RandomHorizontalFlip(p=1.0))
    (image, before), (flipped_image, after) = plain[0], flipped[0]
    assert isinstance(after["boxes"], tv_tensors.BoundingBoxes) and isinstance(after["masks"], tv_tensors.Mask)
    # Boxes and masks agree before and after (masks_to_boxes gives the last pixel index, boxes the edge).
    for target in (before, after):
        from_masks = masks_to_boxes(target["masks"].as_subclass(torch.Tensor)) + torch.tensor([0, 0, 1, 1])
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), from_masks)
    assert after["boxes"][0].tolist() == [16 - 7, 1, 16 - 2, 5]
    torch.testing.assert_close(after["semantic"], before["semantic"].flip(-1))
    torch.testing.assert_close(flipped_image, image.flip(-1))
    # Plain flip moves joints (x -> W - 1 - x) without renaming them.
    r_ankle = LSP_JOINTS.index("r_ankle")
    assert after["keypoints"][2, r_ankle].tolist() == [15 - 11, 10, 2]
    assert after["keypoints"].shape == (3, 14, 3) and after["keypoints"].dtype == torch.float32
    assert after["keypoints"][:2].abs().sum() == 0 and after["labels"].tolist() == [1, 3, 2]


def test_flip_with_joints_swaps_left_and_right():
    dataset = InstanceDataset(make_source(), transforms=RandomHorizontalFlipWithJoints(LSP_FLIP, p=1.0))
    _, target = dataset[0]
    r_ankle, l_ankle = LSP_JOINTS.index("r_ankle"), LSP_JOINTS.index("l_ankle")
    assert target["keypoints"][2, r_ankle].tolist() == [15 - 13, 10, 2]  # the old left ankle, mirrored
    assert target["keypoints"][2, l_ankle].tolist() == [15 - 11, 10, 2]
    assert target["boxes"][2].tolist() == [16 - 14, 6, 16 - 10, 11]
    _, untouched = InstanceDataset(make_source(), transforms=RandomHorizontalFlipWithJoints(LSP_FLIP, p=0.0))[0]
    assert untouched["keypoints"][2, r_ankle].tolist() == [11, 10, 2]


def test_crop_hides_joints_that_leave_the_image():
    _, target = InstanceDataset(make_source(), transforms=v2.CenterCrop((6, 6)))[0]  # rows 3..8, cols 5..10
    joints = target["keypoints"][2]
    assert joints[LSP_JOINTS.index("neck")].tolist() == [8 - 5, 5 - 3, 2]
    assert joints[LSP_JOINTS.index("r_ankle")].tolist() == [0, 0, 0]  # was at x=11: now outside
    assert target["masks"].shape == (3, 6, 6) and target["semantic"].shape == (6, 6)


def test_collate_keeps_images_of_different_sizes_as_lists():
    loader = torch.utils.data.DataLoader(InstanceDataset(make_source()), batch_size=3,
                                         collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 12, 16), (3, 8, 10), (3, 10, 10)]
    assert [t["image_id"] for t in targets] == [7, 8, 9]


def test_ground_truth_of_any_source_loads_in_pycocotools():
    source = make_source()
    ground_truth = json.loads(json.dumps(coco_ground_truth(source)))  # json-serializable
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    assert sorted(coco.getImgIds()) == [7, 8, 9] and len(coco.getAnnIds()) == 5
    assert coco.anns[5]["iscrowd"] == 1
    # Masks the source gave without segmentation come back as RLE with the same pixels.
    np.testing.assert_array_equal(coco.annToMask(coco.anns[5]), source.sample(2).masks[1])
    np.testing.assert_array_equal(coco.annToMask(coco.anns[2]), blob_mask())
    # Perfect segmentations of the non-crowd shapes (the person has no outline) score AP 1.
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                "segmentation": coco.annToRLE(a)} for a in coco.dataset["annotations"]
               if a["category_id"] != 2 and not a["iscrowd"]]
    evaluator = COCOeval(coco, coco.loadRes(results), "segm")
    evaluator.params.imgIds = [7, 9]
    evaluator.params.catIds = [1, 5]
    evaluator.evaluate(), evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_label_names_and_flip_index():
    assert label_names(make_source()) == ["background", "square", "person", "blob"]
    assert keypoint_flip_index(LSP_JOINTS) == list(LSP_FLIP)
    assert keypoint_flip_index(["nose", "left_eye", "right_eye"]) == [0, 2, 1]
