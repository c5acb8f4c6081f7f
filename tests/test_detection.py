"""transfer-detect: dataset planning (no detectron2 needed), recipes and tiny CPU runs (detectron2 needed)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from hnmix.cli import app
from hnmix.detection.datasets import make_split, plan_coco, plan_voc
from hnmix.detection.train import aggregate
from hnmix.errors import HnmixError

runner = CliRunner()
# CPU-sized runs: the R50-C4 cost is the res5 head on every RoI, so few RoIs and proposals
TINY = ["--smoke", "--iters", "2", "--input-size", "64", "--workers", "0",
        "--d2", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=8", "--d2", "MODEL.RPN.POST_NMS_TOPK_TEST=10"]


def _image(path: Path, box: tuple[int, int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (96, 128, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 220
    Image.fromarray(pixels).save(path)


def make_voc(root: Path, n: int = 5, ann: str = "annotations", img: str = "images") -> Path:
    """A VOC-layout folder with its own classes, no ImageSets, some xml without <difficult>/<size>."""
    (root / ann).mkdir(parents=True)
    (root / img).mkdir()
    for i in range(n):
        box = (10 + 5 * i, 12, 70 + 5 * i, 80)
        _image(root / img / f"pic{i}.jpg", box, i)
        objs = "".join(f"<object><name>{name}</name>{'<difficult>0</difficult>' if i % 2 else ''}<bndbox>"
                       f"<xmin>{box[0] + d}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
                       "</bndbox></object>" for d, name in ((0, "zebra"), (3, "ant" if i % 2 else "zebra")))
        size = "<size><width>128</width><height>96</height></size>" if i % 3 else ""
        (root / ann / f"pic{i}.xml").write_text(f"<annotation><filename>pic{i}.jpg</filename>{size}{objs}</annotation>")
    return root


def make_coco(root: Path, n: int = 5, masks: bool = True) -> tuple[Path, Path]:
    (root / "imgs").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        box = (10 + 4 * i, 10, 60 + 4 * i, 70)
        _image(root / "imgs" / f"{i}.jpg", box, i)
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 128, "height": 96})
        x0, y0, x1, y1 = box
        ann = {"id": i + 1, "image_id": 100 + i, "category_id": 3 + i % 2, "bbox": [x0, y0, x1 - x0, y1 - y0],
               "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0}
        if masks:
            ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        anns.append(ann)
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 3, "name": "car"}, {"id": 4, "name": "bus"}]}
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "imgs", root / "ann.json"


# ------------------------------------------------------------------------------- planning (no detectron2)


def test_make_split_is_deterministic_disjoint_and_complete():
    ids = [f"im{i}" for i in range(50)]
    a = make_split(ids, 0.2, 0)
    assert a == make_split(list(reversed(ids)), 0.2, 0)  # input order does not matter
    assert a != make_split(ids, 0.2, 1)
    train, test = a
    assert len(test) == 10 and sorted(train + test) == sorted(ids) and not set(train) & set(test)
    with pytest.raises(HnmixError, match="at least 2"):
        make_split(["one"], 0.2, 0)


def test_make_split_puts_every_class_on_the_test_side_when_it_can():
    labels = {f"im{i}": {"common"} for i in range(20)} | {"rare0": {"rare"}, "rare1": {"rare", "common"},
                                                          "solo": {"solo"}}
    train, test = make_split(list(labels), 0.1, 0, labels)
    assert any("rare" in labels[i] for i in test) and any("rare" in labels[i] for i in train)
    assert "solo" in train  # its only image stays for training
    assert (train, test) == make_split(list(labels), 0.1, 0, labels)


def test_voc_layout_classes_split_and_eval_annotations(tmp_path):
    data = make_voc(tmp_path / "voc")
    plan = plan_voc(str(data), tmp_path / "run", 0.4, 0)
    assert plan.classes == ["ant", "zebra"]  # read from the xml files, sorted
    train = (tmp_path / "run/splits/train.txt").read_text().split()
    test = (tmp_path / "run/splits/test.txt").read_text().split()
    assert len(test) == 2 and sorted(train + test) == [f"pic{i}" for i in range(5)]
    assert "made one" in plan.notes[0]
    # the evaluator's copy: integer boxes and the fields detectron2's VOC metric insists on
    xml = ET.parse(tmp_path / "run/voc_eval/Annotations" / f"{test[0]}.xml").getroot()
    obj = xml.find("object")
    assert obj.findtext("difficult") == "0" and obj.findtext("truncated") == "0"
    assert int(obj.findtext("bndbox/xmin")) >= 10
    assert (tmp_path / "run/voc_eval/ImageSets/Main/test.txt").read_text().split() == test


def test_voc_layout_uses_existing_split_files(tmp_path):
    data = make_voc(tmp_path / "voc", ann="Annotations", img="JPEGImages")
    (data / "ImageSets/Main").mkdir(parents=True)
    (data / "ImageSets/Main/trainval.txt").write_text("pic0\npic1\npic2\n")
    (data / "ImageSets/Main/test.txt").write_text("pic3\npic4\n")
    plan = plan_voc(str(data), tmp_path / "run")
    assert [r["id"] for r in plan.sets[1].args["records"]] == ["pic3", "pic4"]
    assert not (tmp_path / "run/splits").exists()
    (data / "ImageSets/Main/test.txt").write_text("pic3\nnope\n")
    with pytest.raises(HnmixError, match="nope"):
        plan_voc(str(data), tmp_path / "run2")


def test_standard_voc_root(tmp_path):
    v07 = make_voc(tmp_path / "datasets/VOC2007", ann="Annotations", img="JPEGImages")
    (v07 / "ImageSets/Main").mkdir(parents=True)
    (v07 / "ImageSets/Main/trainval.txt").write_text("pic0\npic1\npic2\n")
    with pytest.raises(HnmixError, match="test.txt is missing"):
        plan_voc(str(tmp_path / "datasets"), tmp_path / "run")
    (v07 / "ImageSets/Main/test.txt").write_text("pic3\npic4\n")
    plan = plan_voc(str(tmp_path / "datasets"), tmp_path / "run")
    assert plan.train == ["hnmix_voc_2007_trainval"] and plan.test == ["hnmix_voc_2007_test"]
    assert len(plan.classes) == 20 and "VOC2012 not found" in plan.notes[0]
    assert plan.sets[1].args == {"dirname": str(v07), "split": "test", "year": 2007}  # VOC07 11-point metric


def test_voc_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HnmixError, match="no PASCAL VOC xml files"):
        plan_voc(str(tmp_path / "empty"), tmp_path / "run")


def test_coco_split_and_masks(tmp_path):
    images, ann = make_coco(tmp_path / "c", n=10)
    plan = plan_coco(tmp_path / "run", images=str(images), annotations=str(ann), fraction=0.3)
    assert plan.masks and plan.classes == ["car", "bus"]
    train = json.loads((tmp_path / "run/splits/train.json").read_text())
    val = json.loads((tmp_path / "run/splits/val.json").read_text())
    assert len(val["images"]) == 3 and len(train["images"]) == 7
    val_ids = {im["id"] for im in val["images"]}
    assert {a["image_id"] for a in val["annotations"]} == val_ids
    assert not val_ids & {im["id"] for im in train["images"]}


def test_coco_without_masks(tmp_path):
    images, ann = make_coco(tmp_path / "c", masks=False)
    assert not plan_coco(tmp_path / "run", images=str(images), annotations=str(ann)).masks
    with pytest.raises(HnmixError, match="--no-masks"):
        plan_coco(tmp_path / "run", images=str(images), annotations=str(ann), masks=True)


def test_coco_root_layout(tmp_path):
    root = tmp_path / "datasets"
    images, ann = make_coco(tmp_path / "c")
    (root / "coco/annotations").mkdir(parents=True)
    images.rename(root / "coco/val2017")
    (root / "coco/annotations/instances_val2017.json").write_text(ann.read_text())
    single = plan_coco(tmp_path / "run1", data=str(root))  # one json of any split: the dataset, split it
    assert "held out" in single.notes[0]
    (root / "coco/annotations/instances_test2017.json").write_text(ann.read_text())
    with pytest.raises(HnmixError, match="no instances_\\*train\\*.json"):
        plan_coco(tmp_path / "run", data=str(root))
    (root / "coco/annotations/instances_test2017.json").unlink()
    (root / "coco/annotations/instances_train2017.json").write_text(ann.read_text())
    with pytest.raises(HnmixError, match="no image folder"):
        plan_coco(tmp_path / "run", data=str(root))
    (root / "coco/train2017").symlink_to(root / "coco/val2017")
    plan = plan_coco(tmp_path / "run", data=str(root))
    assert [s.args["json_file"].split("/")[-1] for s in plan.sets] == ["instances_train2017.json",
                                                                       "instances_val2017.json"]
    assert not plan.notes  # a real validation set: nothing held out


def test_aggregate_mean_and_sample_std():
    trials = [{"bbox": {"AP": 1.0, "AP50": 2.0, "AP75": None}}, {"bbox": {"AP": 3.0, "AP50": 4.0, "AP75": None}}]
    mean, std = aggregate(trials)
    assert mean["bbox"] == {"AP": 2.0, "AP50": 3.0, "AP75": None}
    assert std["bbox"]["AP"] == pytest.approx(2 ** 0.5, abs=1e-4)


def test_bad_options_are_one_line(tmp_path):
    res = runner.invoke(app, ["transfer-detect", "voc", "--weights", "none"])
    assert res.exit_code == 2 and "voc needs --data" in res.output
    res = runner.invoke(app, ["transfer-detect", "coco", "--data", str(tmp_path), "--weights", "none",
                              "--recipe", "c4"])
    assert res.exit_code == 2 and "recipe 'c4' is not one of" in res.output


def test_without_detectron2_says_how_to_install(tmp_path, monkeypatch):
    make_voc(tmp_path / "voc")
    monkeypatch.setitem(sys.modules, "detectron2", None)  # import detectron2 -> ModuleNotFoundError
    res = runner.invoke(app, ["transfer-detect", "voc", "--data", str(tmp_path / "voc"), "--weights", "none",
                              "--output", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'" in res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------ with detectron2


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("detectron2")
    import timm

    from hnmix.models.export import convert

    d = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    sd = timm.create_model("resnet50", num_classes=0).state_dict()
    torch.save(sd, d / "backbone.pt")
    res = convert(d / "backbone.pt", "detectron2", d / "r50.pkl")
    return sd, d, res


def _recipe_cfg(weights_settings, world_size=1, **kw):
    from hnmix.detection.recipes import build_detectron2_config

    args = dict(num_classes=3, train=["t"], test=["v"], masks=False, weights_path="", output_dir="/tmp/x", seed=0,
                device="cpu", world_size=world_size, batch_size=None, lr=None, iters=None, input_size=None,
                workers=0, overrides=[])
    return build_detectron2_config("voc", "c4", weights_settings=weights_settings, **(args | kw))


def test_moco_voc_recipe_and_syncbn_fallback(converted):
    from hnmix.detection.weights import resolve_weights

    _, d, _ = converted
    w = resolve_weights(str(d / "r50.pkl"), d)
    cfg, notes = _recipe_cfg(w.settings)
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.RESNETS.NORM == "BN" and any("SyncBN -> BN" in n for n in notes)
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32)) and cfg.INPUT.MIN_SIZE_TEST == 800
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (
        24000, (18000, 22000), 16, 0.02)
    assert cfg.TEST.PRECISE_BN.ENABLED and cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    multi, _ = _recipe_cfg(w.settings, world_size=8)
    assert multi.MODEL.RESNETS.NORM == "SyncBN"
    short, _ = _recipe_cfg(w.settings, iters=240, batch_size=4)
    assert tuple(short.SOLVER.STEPS) == (180, 220) and short.SOLVER.BASE_LR == pytest.approx(0.005)
    with pytest.raises(HnmixError, match="did you mean MODEL.RPN.POST_NMS_TOPK_TEST"):
        _recipe_cfg(w.settings, overrides=[("MODEL.RPN.POST_NMS_TOPK_TST", "10")])


def test_fpn_recipe_builds_with_norms_everywhere(converted):
    from detectron2.modeling import build_model

    from hnmix.detection.recipes import build_detectron2_config

    cfg, _ = build_detectron2_config(
        "coco", "fpn-2x", num_classes=2, train=["t"], test=["v"], masks=True, weights_path="", weights_settings={},
        output_dir="/tmp/x", seed=0, device="cpu", world_size=1, batch_size=None, lr=None, iters=None,
        input_size=None, workers=0, overrides=[])
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (180000, (120000, 160000))
    model = build_model(cfg)
    assert type(model.backbone.fpn_lateral2.norm).__name__ == "BatchNorm2d"
    assert type(model.roi_heads.box_head.conv4.norm).__name__ == "BatchNorm2d"
    assert type(model.roi_heads.mask_head.mask_fcn1.norm).__name__ == "BatchNorm2d"


def test_converted_weights_load_into_r50_c4(converted):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from hnmix.detection.weights import resolve_weights

    sd, d, _ = converted
    w = resolve_weights(str(d / "r50.pkl"), d)
    cfg, _ = _recipe_cfg(w.settings, weights_path=w.path)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    state = model.state_dict()
    # our own expectation of where each torchvision tensor lands in detectron2's R50-C4
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        for i in (1, 2, 3):
            name = name.replace(f"bn{i}.", f"conv{i}.norm.")
        if key.startswith("layer4."):
            name = "roi_heads.res5." + name[len("layer4."):]
        elif key.startswith("layer"):
            name = f"backbone.res{int(key[5]) + 1}." + name[len("layerN."):]
        else:
            name = "backbone.stem." + name
        assert name in state, f"{key} -> {name} missing from the model"
        torch.testing.assert_close(state[name], value, msg=f"{name} not loaded from {key}")
    assert type(model.roi_heads.res5.norm).__name__ == "BatchNorm2d"  # the extra norm, plain BN on 1 process


def _results(out: Path) -> dict:
    assert (out / "results.json").is_file()
    return json.loads((out / "results.json").read_text())


def test_voc_tiny_run_with_trials(converted, tmp_path):
    data = make_voc(tmp_path / "voc")
    out = tmp_path / "run"
    res = runner.invoke(app, ["transfer-detect", "voc", "--data", str(data), "--weights", "none", "--trials", "2",
                              "--output", str(out), *TINY])
    assert res.exit_code == 0, res.output
    results = _results(out)
    assert [t["seed"] for t in results["trials"]] == [0, 1]
    for t in results["trials"]:
        assert all(isinstance(t["bbox"][m], float) for m in ("AP", "AP50", "AP75"))
    assert set(results["mean"]["bbox"]) == {"AP", "AP50", "AP75"} and results["classes"] == 2
    cfg = yaml.safe_load((out / "trial0/config.yaml").read_text())
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 2 and cfg["MODEL"]["RESNETS"]["NORM"] == "BN"
    assert cfg["SOLVER"]["MAX_ITER"] == 2 and cfg["MODEL"]["DEVICE"] == "cpu"
    assert (out / "trial1/metrics.json").is_file() and (out / "splits/test.txt").is_file()
    assert "mean ± std" in res.output


def test_coco_tiny_run_with_masks_converts_on_the_fly(converted, tmp_path):
    _, d, _ = converted
    images, ann = make_coco(tmp_path / "c", n=6)
    out = tmp_path / "run"
    res = runner.invoke(app, ["transfer-detect", "coco", "--images", str(images), "--annotations", str(ann),
                              "--weights", str(d / "backbone.pt"), "--output", str(out), *TINY])
    assert res.exit_code == 0, res.output
    results = _results(out)
    assert set(results["trials"][0]) >= {"bbox", "segm"}
    assert all(isinstance(results["mean"][t]["AP"], float) for t in ("bbox", "segm"))
    assert (out / "pretrained_backbone.pkl").is_file() and "converted on the fly" in results["weights"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["MODEL"]["MASK_ON"] is True and cfg["INPUT"]["FORMAT"] == "RGB"


@pytest.mark.slow
def test_sigterm_saves_the_iteration_and_resume_finishes(tmp_path):
    # off a terminal the progress comes as plain lines; the first signal finishes the iteration, saves it and
    # stops with a line saying how to continue (as pretrain does)
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("detectron2")
    data = make_voc(tmp_path / "voc")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hnmix", "transfer-detect", "voc", "--data", str(data), "--weights", "none",
           "--output", str(out), *TINY, "--iters", "400"]
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while "iteration 20/400" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, log.read_text() + err
    assert "fine-tuning from iteration 0 to 400" in log.read_text()
    message = " ".join(err.split())
    assert "stopped: terminated during trial 1 after iteration" in message and "continue with --resume" in message
    saved = sorted(out.glob("model_*.pth"))
    assert saved and (out / "last_checkpoint").read_text().strip() == saved[-1].name
    again = subprocess.run([*cmd, "--resume", "--iters", "30"], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout + again.stderr
