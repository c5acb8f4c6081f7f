"""Find the user's detection data and register it with detectron2's DatasetCatalog.

Planning (this module's top half) only reads files, so bad input fails before detectron2 is imported;
``DatasetPlan.register()`` runs in every training process (detectron2's launch spawns fresh ones).
Missing splits are made deterministically (sorted ids, seeded shuffle) and written under the run
directory, never into the user's data folder.
"""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from hnmix.errors import HnmixError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")
_SPLIT_PAIRS = (("trainval", "test"), ("train", "val"), ("train", "test"))


@dataclass
class RegisteredSet:
    name: str
    kind: str  # "voc" (detectron2's VOC loader), "voc-layout" (ours), "coco"
    args: dict


@dataclass
class DatasetPlan:
    task: str
    train: list[str]
    test: list[str]
    classes: list[str]
    evaluator: str  # "voc" | "coco"
    masks: bool = False
    sets: list[RegisteredSet] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""

    def register(self) -> None:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for s in self.sets:
            if s.name in DatasetCatalog.list():  # several trials in one process
                DatasetCatalog.remove(s.name)
                MetadataCatalog.remove(s.name)
            if s.kind == "voc":
                from detectron2.data.datasets.pascal_voc import register_pascal_voc

                register_pascal_voc(s.name, s.args["dirname"], s.args["split"], s.args["year"], VOC_CLASSES)
                MetadataCatalog.get(s.name).evaluator_type = "pascal_voc"  # as detectron2's builtin sets do
            elif s.kind == "voc-layout":
                records, classes = s.args["records"], s.args["classes"]
                DatasetCatalog.register(s.name, lambda r=records, c=classes: load_voc_layout(r, c))
                MetadataCatalog.get(s.name).set(thing_classes=list(classes), dirname=s.args["eval_dir"],
                                                split="test", year=2012, evaluator_type="pascal_voc")
            else:
                from detectron2.data.datasets import register_coco_instances

                register_coco_instances(s.name, {}, s.args["json_file"], s.args["image_root"])


# ----------------------------------------------------------------------------------------------- VOC


def _voc_root(root: Path) -> Path | None:
    for cand in (root, root / "VOCdevkit"):
        if (cand / "VOC2007" / "Annotations").is_dir():
            return cand
    return None


def _standard_voc(base: Path) -> DatasetPlan:
    """VOC07(+12) trainval -> VOC07 test, as the MoCo/MoCHi papers: detectron2's own loader and metric."""
    v07 = base / "VOC2007"
    if not (v07 / "ImageSets" / "Main" / "test.txt").is_file():
        raise HnmixError(f"{v07}/ImageSets/Main/test.txt is missing: VOC2007 test is the evaluation set")
    sets = [RegisteredSet("hnmix_voc_2007_trainval", "voc", {"dirname": str(v07), "split": "trainval", "year": 2007}),
            RegisteredSet("hnmix_voc_2007_test", "voc", {"dirname": str(v07), "split": "test", "year": 2007})]
    notes = []
    if (base / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").is_file():
        sets.insert(1, RegisteredSet("hnmix_voc_2012_trainval", "voc",
                                     {"dirname": str(base / "VOC2012"), "split": "trainval", "year": 2012}))
    else:
        notes.append(f"{base}/VOC2012 not found: training on VOC2007 trainval only (papers use 07+12)")
    train = [s.name for s in sets if s.args["split"] == "trainval"]
    return DatasetPlan("voc", train, ["hnmix_voc_2007_test"], list(VOC_CLASSES), "voc", sets=sets, notes=notes,
                       summary=f"PASCAL VOC: {' + '.join(n[10:] for n in train)} -> 2007_test (11-point VOC07 AP)")


def _find_image(xml_root: ET.Element, stem: str, image_dirs: list[Path]) -> Path | None:
    named = (xml_root.findtext("filename") or "").strip()
    for d in image_dirs:
        if named and (d / Path(named).name).is_file():
            return d / Path(named).name
        for ext in IMAGE_EXTS:
            if (d / (stem + ext)).is_file():
                return d / (stem + ext)
    return None


def _parse_objects(xml_root: ET.Element) -> tuple[list[dict], int]:
    """(objects with name/box/difficult, number of degenerate boxes dropped)."""
    objects, dropped = [], 0
    for obj in xml_root.findall("object"):
        name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        try:
            xyxy = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            xyxy = None
        if not name or xyxy is None or xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
            dropped += 1
            continue
        difficult = (obj.findtext("difficult") or "0").strip()
        objects.append({"name": name, "bbox": xyxy, "difficult": int(difficult in ("1", "true", "True"))})
    return objects, dropped


def _read_split(path: Path, known: set[str]) -> list[str]:
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise HnmixError(f"{path} lists {len(unknown)} ids without an xml + image (e.g. {unknown[0]})")
    return ids


def make_split(ids: list, fraction: float, seed: int, labels: dict | None = None) -> tuple[list, list]:
    """Deterministic held-out split: the same ids, fraction and seed always give the same split.

    With ``labels`` (id -> class names), every class with two or more images ends up on both sides:
    VOC AP is undefined (NaN) for a class without test instances, and detectron2 averages it in.
    """
    if len(ids) < 2:
        raise HnmixError(f"{len(ids)} annotated image(s): need at least 2 to hold one out for testing")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(fraction * len(order))))
    train, test = order[n_test:], order[:n_test]
    for cls in sorted({c for i in ids for c in (labels or {}).get(i, ())}):
        for src, dst in ((train, test), (test, train)):
            if not any(cls in labels.get(i, ()) for i in dst):
                _move_one(cls, src, dst, labels)
    return sorted(train), sorted(test)


def _move_one(cls: str, src: list, dst: list, labels: dict) -> None:
    """Move the first image of ``cls`` from src to dst if src keeps an image of every class it loses."""
    for i in src:
        rest = [j for j in src if j != i]
        if cls in labels.get(i, ()) and rest and all(any(c in labels.get(j, ()) for j in rest) for c in labels[i]):
            src.remove(i)
            dst.append(i)
            return


def _write_eval_annotation(path: Path, objects: list[dict]) -> None:
    """The xml fields PascalVOCDetectionEvaluator reads, normalised (it needs integer boxes, 'difficult', ...)."""
    root = ET.Element("annotation")
    for o in objects:
        obj = ET.SubElement(root, "object")
        for tag, text in (("name", o["name"]), ("pose", "Unspecified"), ("truncated", "0"),
                          ("difficult", str(o["difficult"]))):
            ET.SubElement(obj, tag).text = text
        box = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox"], strict=True):
            ET.SubElement(box, tag).text = str(int(round(v)))
    ET.ElementTree(root).write(path)


def _voc_layout(root: Path, output: Path, fraction: float, seed: int) -> DatasetPlan:
    """Any folder of PASCAL VOC xml files with its own classes (read from the xml files)."""
    ann_dir = next((d for d in (root / "Annotations", root / "annotations", root)
                    if d.is_dir() and any(d.glob("*.xml"))), None)
    if ann_dir is None:
        raise HnmixError(f"no PASCAL VOC xml files in {root}/Annotations, {root}/annotations or {root} "
                         "(and no VOC2007 folder)")
    image_dirs = [d for d in (root / "JPEGImages", root / "images", root / "Images", ann_dir, root) if d.is_dir()]
    records, parsed, no_image, dropped = {}, {}, [], 0
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            xml_root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise HnmixError(f"{xml} is not valid xml ({e})") from None
        image = _find_image(xml_root, xml.stem, image_dirs)
        if image is None:
            no_image.append(xml.name)
            continue
        objects, bad = _parse_objects(xml_root)
        dropped += bad
        size = [xml_root.findtext(f"size/{k}") for k in ("width", "height")]
        records[xml.stem] = {"xml": str(xml), "image": str(image),
                             "size": [int(float(s)) if s else 0 for s in size], "objects": objects}
        parsed[xml.stem] = objects
    classes = sorted({o["name"] for objs in parsed.values() for o in objs})
    if not classes:
        raise HnmixError(f"no labelled objects in the xml files of {ann_dir} that have an image")
    notes = [f"{len(no_image)} xml files without an image skipped (e.g. {no_image[0]})"] if no_image else []
    if dropped:
        notes.append(f"{dropped} objects with a missing/empty box or no name dropped")

    main = root / "ImageSets" / "Main"
    pair = next((p for p in _SPLIT_PAIRS if all((main / f"{s}.txt").is_file() for s in p)), None)
    if pair:
        train_ids, test_ids = (_read_split(main / f"{s}.txt", set(records)) for s in pair)
        split_note = f"split from {main}/{pair[0]}.txt + {pair[1]}.txt"
    else:
        labels = {i: {o["name"] for o in objs} for i, objs in parsed.items()}
        train_ids, test_ids = make_split(list(records), fraction, seed, labels)
        split_dir = output / "splits"
        split_dir.mkdir(parents=True, exist_ok=True)
        (split_dir / "train.txt").write_text("\n".join(train_ids) + "\n")
        (split_dir / "test.txt").write_text("\n".join(test_ids) + "\n")
        split_note = (f"no ImageSets/Main split: made one ({len(train_ids)} train / {len(test_ids)} test, "
                      f"sorted ids, seed {seed}, ~{fraction:.0%} held out, classes on both sides), written to {split_dir}")
    notes.insert(0, split_note)
    untested = [c for c in classes if not any(o["name"] == c for i in test_ids for o in parsed[i])]
    if untested:
        notes.append(f"classes without test instances ({', '.join(untested[:5])}): their AP is undefined, so the "
                     "VOC mean AP is too (shown as -)")

    eval_dir = output / "voc_eval"
    (eval_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    (eval_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for i in test_ids:
        _write_eval_annotation(eval_dir / "Annotations" / f"{i}.xml", parsed[i])
    (eval_dir / "ImageSets" / "Main" / "test.txt").write_text("\n".join(test_ids) + "\n")

    sets = [RegisteredSet("hnmix_voc_train", "voc-layout", {"records": [records[i] | {"id": i} for i in train_ids],
                                                             "classes": classes, "eval_dir": str(eval_dir)}),
            RegisteredSet("hnmix_voc_test", "voc-layout", {"records": [records[i] | {"id": i} for i in test_ids],
                                                            "classes": classes, "eval_dir": str(eval_dir)})]
    return DatasetPlan("voc", ["hnmix_voc_train"], ["hnmix_voc_test"], classes, "voc", sets=sets, notes=notes,
                       summary=f"VOC layout {root}: {len(classes)} classes, {len(train_ids)} train / "
                               f"{len(test_ids)} test images (area VOC AP)")


def load_voc_layout(records: list[dict], classes: list[str]) -> list[dict]:
    """detectron2 dataset dicts, with detectron2's VOC box convention (1-based pixel corners -> 0-based)."""
    from detectron2.structures import BoxMode

    dicts = []
    for r in records:
        width, height = r["size"]
        if not width or not height:
            from PIL import Image

            with Image.open(r["image"]) as im:
                width, height = im.size
        annotations = [{"category_id": classes.index(o["name"]), "bbox_mode": BoxMode.XYXY_ABS,
                        "bbox": [o["bbox"][0] - 1.0, o["bbox"][1] - 1.0, o["bbox"][2], o["bbox"][3]]}
                       for o in r["objects"]]
        dicts.append({"file_name": r["image"], "image_id": r["id"], "width": width, "height": height,
                      "annotations": annotations})
    return dicts


def plan_voc(data: str, output: Path, fraction: float = 0.2, seed: int = 0) -> DatasetPlan:
    root = Path(data)
    base = _voc_root(root)
    return _standard_voc(base) if base else _voc_layout(root, output, fraction, seed)


# ---------------------------------------------------------------------------------------------- COCO


def _read_coco(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HnmixError(f"{path} is not a readable json file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list) for k in ("images", "annotations", "categories")):
        raise HnmixError(f"{path} is not a COCO instances json (needs images, annotations and categories lists)")
    if not obj["categories"]:
        raise HnmixError(f"{path} has no categories")
    return obj


def _has_masks(coco: dict) -> bool:
    return any(a.get("segmentation") for a in coco["annotations"])


def _coco_pairs(root: Path) -> tuple[tuple[Path, Path], tuple[Path, Path] | None]:
    """(train json, images), (val json, images) | None from a root holding annotations/instances_<split>.json."""
    base = root / "coco" if (root / "coco" / "annotations").is_dir() else root
    found = {j.stem[len("instances_"):]: j for j in sorted((base / "annotations").glob("instances_*.json"))}
    if not found:
        raise HnmixError(f"no annotations/instances_*.json under {root}; for other layouts pass "
                         "--images DIR --annotations FILE")
    train = next((s for s in found if "train" in s), None) or (next(iter(found)) if len(found) == 1 else None)
    val = next((s for s in found if "val" in s and s != train), None)
    if train is None:
        raise HnmixError(f"{base}/annotations has {', '.join(found)} but no instances_*train*.json")
    pairs = []
    for split in (train, val):
        if split is not None:
            if not (base / split).is_dir():
                raise HnmixError(f"{found[split]} has no image folder {base / split}")
            pairs.append((found[split], base / split))
    return pairs[0], (pairs[1] if len(pairs) > 1 else None)


def _subset(coco: dict, image_ids: set) -> dict:
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in coco["images"] if im["id"] in image_ids]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in image_ids]
    return out


def plan_coco(output: Path, data: str | None = None, images: str | None = None, annotations: str | None = None,
              val_images: str | None = None, val_annotations: str | None = None, masks: bool | None = None,
              fraction: float = 0.2, seed: int = 0) -> DatasetPlan:
    if data is not None:
        (train_json, train_dir), val = _coco_pairs(Path(data))
    else:
        train_json, train_dir = Path(annotations), Path(images)
        val = (Path(val_annotations), Path(val_images)) if val_annotations else None
    train = _read_coco(train_json)
    source, n_train, notes = train_json, len(train["images"]), []
    if val is not None:
        val_json, val_dir = val
        val_coco = _read_coco(val_json)
        if {c["id"] for c in val_coco["categories"]} != {c["id"] for c in train["categories"]}:
            raise HnmixError(f"{val_json} and {train_json} have different category ids")
    else:
        ids = [im["id"] for im in train["images"]]
        train_ids, test_ids = make_split(ids, fraction, seed)
        split_dir = output / "splits"
        split_dir.mkdir(parents=True, exist_ok=True)
        val_coco = _subset(train, set(test_ids))
        (split_dir / "train.json").write_text(json.dumps(_subset(train, set(train_ids))))
        (split_dir / "val.json").write_text(json.dumps(val_coco))
        train_json, val_json, val_dir = split_dir / "train.json", split_dir / "val.json", train_dir
        n_train = len(train_ids)
        notes.append(f"no validation json: held out {len(test_ids)} of {len(ids)} images (sorted ids, seed {seed}), "
                     f"written to {split_dir}/{{train,val}}.json")
    has_masks = _has_masks(train) and _has_masks(val_coco)
    if masks and not has_masks:
        raise HnmixError(f"--masks needs polygon/RLE 'segmentation' in {train_json} and its validation json; "
                         "pass --no-masks for boxes only")
    use_masks = has_masks if masks is None else masks
    if masks is None and not has_masks:
        notes.append("no segmentation masks in the json: Faster R-CNN, bbox AP only")
    classes = [c["name"] for c in sorted(train["categories"], key=lambda c: c["id"])]
    sets = [RegisteredSet("hnmix_coco_train", "coco", {"json_file": str(train_json), "image_root": str(train_dir)}),
            RegisteredSet("hnmix_coco_val", "coco", {"json_file": str(val_json), "image_root": str(val_dir)})]
    return DatasetPlan("coco", ["hnmix_coco_train"], ["hnmix_coco_val"], classes, "coco", use_masks, sets, notes,
                       summary=f"COCO json {source}: {len(classes)} categories, {n_train} train / "
                               f"{len(val_coco['images'])} evaluation images{' (masks)' if use_masks else ''}")
