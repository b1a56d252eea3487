"""Pascal VOC xml annotations, validated and converted to the COCO records every other part of detseg speaks.

Layout. The VOCdevkit layout ``root/Annotations/*.xml``, ``root/JPEGImages/``, ``root/ImageSets/Main/<split>.txt``
is read as is. Without ``ImageSets/Main`` every ``*.xml`` in ``root/Annotations`` (or in ``root`` itself when there
is no ``Annotations`` folder) is used, sorted by name, and ``split`` is ignored; ``split=None`` does that even when
split files exist. Images are looked up in ``image_dir`` (default ``root/JPEGImages`` if it exists, else the xml
folder) by the xml's ``<filename>``, then as ``<id>.jpg`` / ``.jpeg`` / ``.png``.

Conventions:

- Boxes. VOC stores 1-based, inclusive pixel indices: a box covering the whole W-pixel-wide image is
  ``xmin=1, xmax=W``. COCO boxes are continuous ``[x, y, w, h]`` with pixel ``i`` spanning ``[i, i + 1)``, so
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``. 0-based exporters (xmin=0) still pass: that box
  sticks out by one pixel, within :data:`detseg.data.coco.BOX_TOLERANCE_PX`, and is clipped.
- ``difficult`` objects. COCO has no such flag, and pycocotools ignores a ground-truth box only when it is a crowd
  region (its ``ignore`` field is overwritten from ``iscrowd``). VOC's rule — a difficult object is neither
  required nor penalised — is exactly what crowd regions get, so by default (``difficult="ignore"``) they become
  ``iscrowd: 1``. ``"keep"`` treats them as ordinary objects, ``"drop"`` leaves them out. Every annotation also
  keeps ``difficult: 0/1``.
- Classes. ``classes=None`` uses the 20 VOC classes (labels stable across splits) when every name found is one of
  them, otherwise the sorted names found (custom data sets in VOC format). With ``classes`` given, any other name
  is an error.
- Image ids are 1..N in file order (VOC ids like ``2008_000123`` are kept as ``voc_id``); annotation ids 1..M.
- An xml without objects is a valid background-only image. Masks are not part of VOC detection: the Dataset fills
  each box.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from detseg.data.coco import checked_box
from detseg.data.images import first_file
from detseg.data.records import RecordSource
from detseg.errors import ConfigError, DataError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DIFFICULT_RULES = ("ignore", "keep", "drop")
_BOX_SIDES = ("xmin", "ymin", "xmax", "ymax")


class VocSource(RecordSource):
    """A Pascal VOC (or VOC-format) detection data set as a :class:`detseg.data.records.Source`."""

    def __init__(self, root: str | Path, split: str | None = "train", classes: list[str] | None = None,
                 image_dir: str | Path | None = None, difficult: str = "ignore"):
        if difficult not in _DIFFICULT_RULES:
            raise ConfigError(f"difficult must be one of {', '.join(_DIFFICULT_RULES)} (got {difficult!r})")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "VOC root directory not found")
        annotation_dir = self.root / "Annotations" if (self.root / "Annotations").is_dir() else self.root
        if image_dir is not None:
            self.image_dir = Path(image_dir)
        else:
            self.image_dir = self.root / "JPEGImages" if (self.root / "JPEGImages").is_dir() else annotation_dir

        parsed = [_parse_xml(xml_path, voc_id) for voc_id, xml_path in self._listed_files(annotation_dir, split)]
        names = self._class_names(parsed, classes)
        categories = [{"id": label, "name": name, "supercategory": "object"}
                      for label, name in enumerate(names, start=1)]
        images, annotations, paths = self._records(parsed, {name: cid for cid, name in enumerate(names, 1)},
                                                   difficult)
        super().__init__(self.root, categories, images, annotations, paths)

    def _listed_files(self, annotation_dir: Path, split: str | None) -> list[tuple[str, Path]]:
        """(voc id, xml path) for every image of the split."""
        split_dir = self.root / "ImageSets" / "Main"
        if split is not None and split_dir.is_dir():
            split_file = split_dir / f"{split}.txt"
            if not split_file.is_file():
                available = sorted(p.stem for p in split_dir.glob("*.txt") if "_" not in p.stem)
                raise DataError(split_file, f"split file not found (available: {', '.join(available) or 'none'})",
                                field="split", value=split)
            try:
                text = split_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise DataError(split_file, f"cannot read split file: {error}", field="split", value=split) from None
            ids = [line.split()[0] for line in text.splitlines() if line.strip()]
            listed = [(voc_id, annotation_dir / f"{voc_id}.xml") for voc_id in ids]
            for voc_id, xml_path in listed:
                if not xml_path.is_file():
                    raise DataError(split_file, f"lists an image whose annotation file {xml_path} is missing",
                                    image_id=voc_id)
            return listed
        listed = [(path.stem, path) for path in sorted(annotation_dir.glob("*.xml"))]
        if not listed:
            raise DataError(annotation_dir, "no .xml annotation files found")
        return listed

    @staticmethod
    def _class_names(parsed: list[dict], classes: list[str] | None) -> list[str]:
        if classes is not None:
            names = list(classes)
            for record in parsed:
                for obj in record["objects"]:
                    if obj["name"] not in names:
                        raise DataError(record["xml"], f"class not in the given classes ({', '.join(names)})",
                                        image_id=record["voc_id"], field=f"{obj['field']}.name", value=obj["name"])
            return names
        found = {obj["name"] for record in parsed for obj in record["objects"]}
        return list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)

    def _records(self, parsed: list[dict], category_id: dict[str, int], difficult: str):
        images, annotations, paths = [], [], []
        for image_id, record in enumerate(parsed, start=1):
            path = self._find_image(record)
            width, height = record["width"], record["height"]
            images.append({"id": image_id, "file_name": str(path.relative_to(self.image_dir)),
                           "width": width, "height": height, "voc_id": record["voc_id"]})
            paths.append(path)
            for obj in record["objects"]:
                if obj["difficult"] and difficult == "drop":
                    continue
                xmin, ymin, xmax, ymax = obj["corners"]
                box = checked_box(record["xml"], [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                                  width, height, field=f"{obj['field']}.bndbox", image_id=record["voc_id"],
                                  shown=dict(zip(_BOX_SIDES, (f"{v:g}" for v in obj["corners"]))))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[obj["name"]],
                    "bbox": box, "area": box[2] * box[3],
                    "iscrowd": int(obj["difficult"] and difficult == "ignore"), "difficult": obj["difficult"],
                })
        return images, annotations, paths

    def _find_image(self, record: dict) -> Path:
        candidates = [self.image_dir / record["filename"]] if record["filename"] else []
        candidates += [self.image_dir / f"{record['voc_id']}{suffix}" for suffix in _IMAGE_SUFFIXES]
        found = first_file(candidates)
        if found is not None:
            return found
        raise DataError(record["xml"], f"image file not found (looked for {', '.join(map(str, candidates))})",
                        image_id=record["voc_id"], field="filename", value=record["filename"] or None)


def _parse_xml(xml_path: Path, voc_id: str) -> dict:
    """One VOC xml -> {xml, voc_id, filename, width, height, objects: [{name, difficult, corners, field}]}."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        raise DataError(xml_path, f"malformed XML: {error}", image_id=voc_id) from None
    except OSError as error:
        raise DataError(xml_path, f"cannot read annotation file: {error}", image_id=voc_id) from None
    except LookupError as error:     # the xml declaration names an encoding Python does not know
        raise DataError(xml_path, f"malformed XML: {error}", image_id=voc_id) from None
    fields = _FieldReader(xml_path, voc_id)
    record = {"xml": xml_path, "voc_id": voc_id, "filename": (root.findtext("filename") or "").strip(),
              "width": fields.positive_int(root, "size/width"), "height": fields.positive_int(root, "size/height"),
              "objects": []}
    for k, element in enumerate(root.findall("object")):
        field = f"object[{k}]"
        name = fields.text(element, "name", field)
        difficult = (element.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DataError(xml_path, "difficult must be 0 or 1", image_id=voc_id, field=f"{field}.difficult",
                            value=difficult)
        box = {side: fields.number(element, f"bndbox/{side}", field) for side in _BOX_SIDES}
        for low, high in (("xmin", "xmax"), ("ymin", "ymax")):
            if box[high] < box[low]:
                raise DataError(xml_path, f"{high} is smaller than {low} ({box[low]:g})", image_id=voc_id,
                                field=f"{field}.bndbox.{high}", value=box[high])
        corners = [box[side] for side in _BOX_SIDES]
        record["objects"].append({"name": name, "difficult": int(difficult), "corners": corners, "field": field})
    return record


class _FieldReader:
    """Reads required xml fields, raising DataError that names the xml file, the image and the field path."""

    def __init__(self, xml_path: Path, voc_id: str):
        self.xml_path, self.voc_id = xml_path, voc_id

    def text(self, element: ET.Element, path: str, prefix: str = "") -> str:
        value = element.findtext(path)
        if value is None or not value.strip():
            raise DataError(self.xml_path, "required field is missing or empty", image_id=self.voc_id,
                            field=_field_name(prefix, path))
        return value.strip()

    def number(self, element: ET.Element, path: str, prefix: str = "") -> float:
        raw = self.text(element, path, prefix)
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(self.xml_path, "must be a number", image_id=self.voc_id, field=_field_name(prefix, path),
                            value=raw)
        return value

    def positive_int(self, element: ET.Element, path: str) -> int:
        value = self.number(element, path)
        if value <= 0 or not value.is_integer():
            raise DataError(self.xml_path, "must be a positive integer", image_id=self.voc_id,
                            field=_field_name("", path), value=element.findtext(path).strip())
        return int(value)


def _field_name(prefix: str, path: str) -> str:
    """``("object[2]", "bndbox/xmin")`` -> ``"object[2].bndbox.xmin"``."""
    dotted = path.replace("/", ".")
    return f"{prefix}.{dotted}" if prefix else dotted
