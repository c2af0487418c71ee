"""Your own data: an ImageFolder tree (--data folder) and CIFAR-100-LT (--data cifar100_lt --imbalance k), read
from tiny files written here, run through every stage end to end, and bad trees stopped with one line.

    python -m pytest -q test_own_data.py        # CPU, no download, under a minute

The trees are written under tmp_path: a folder tree of 4 long-tailed classes (120, 30, 5 and 1 training images:
one many-shot, one medium-shot, two few-shot classes), and CIFAR-100 files in torchvision's python format with
20 training and 2 test images per class (100 classes; 10 for the end-to-end run). The stages run in-process
with the tiny random CLIP of conftest (`tiny_clip`, shapes-tiny at 32 px), two steps each.
"""
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import anss
import cvlp
import data
import evaluate
import lgr
import predict
from util import own_data
from util.errors import DataError
from tests.test_data import write
from tests.test_faults import errors_and_warnings, snapshot

# ----------------------------------------------------------------------------------------------
# An ImageFolder tree

TRAIN_COUNTS = {"house_sparrow": 120, "robin": 30, "snowy_owl": 5, "Kiwi": 1}   # folder -> training images
DESCRIPTIONS = {   # descriptions/<folder>.txt: 2, 1, 2 and 2 sentences by the wiki files' rules
    "house_sparrow": "The house sparrow lives near people. It eats seeds.\n",
    "Kiwi": "Kiwi\nThe kiwi is a flightless bird of New Zealand.\n",
    "robin": "Robin\nThe robin is a small bird. It sings at dawn, e.g. in gardens.\n"
             "== References ==\nA book lists robins.\n",
    "snowy_owl": "The snowy owl is white. It hunts lemmings on the tundra.\n",
}


def save_image(path, colour, format="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, format=format)


def make_folder_tree(root, test=True, descriptions=True, counts=TRAIN_COUNTS):
    """`counts` training images per class folder, 2 val and (test=True) 2 test images each, as 16 x 16 PNG files
    named 0.png, 1.png, ...; descriptions/<folder>.txt for every class when descriptions=True."""
    splits = {"train": counts, "val": dict.fromkeys(counts, 2)}
    if test:
        splits["test"] = dict.fromkeys(counts, 2)
    for split, per_class in splits.items():
        for c, (folder, n) in enumerate(per_class.items()):
            for i in range(n):
                save_image(root / split / folder / f"{i}.png", (60 * c, 20 * i % 256, 200 - 60 * c))
    if descriptions:
        for folder, text in DESCRIPTIONS.items():
            write(root / "descriptions" / f"{folder}.txt", text)
    return root


def test_folder_tree_is_read_in_sorted_folder_order_with_names_from_the_folders(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "birds", test=False)
    write(root / "train/robin/.DS_Store", b"\x00\x01")                      # hidden: ignored
    save_image(root / "train/robin/.thumbs/x.png", (0, 0, 0))               # hidden folder: ignored
    save_image(root / "train/robin/2023/field.JPG", (9, 9, 9), "JPEG")      # sub-folder, upper-case extension
    for folder in ("Kiwi", "house_sparrow"):
        os.remove(root / "descriptions" / f"{folder}.txt")
    d = data.load_data("folder", str(root))
    # sorted() puts upper case first: Kiwi, house_sparrow, robin, snowy_owl (torchvision's ImageFolder order)
    assert d.name == "folder" and d.classnames == ["Kiwi", "house sparrow", "robin", "snowy owl"]
    assert list(d.counts) == [1, 120, 31, 5] and d.train.labels.dtype == np.int64
    robin = [os.path.relpath(p, root) for p, y in zip(d.train.images, d.train.labels) if y == 2]
    assert robin[:4] == ["train/robin/0.png", "train/robin/1.png", "train/robin/10.png", "train/robin/11.png"]
    assert robin[-2:] == ["train/robin/9.png", "train/robin/2023/field.JPG"]   # the folder's files, then sub-folders
    assert list(d.val.labels) == [0, 0, 1, 1, 2, 2, 3, 3] and d.test is d.val
    s = d.corpus.sentences
    assert s[1][0] == "a bad photo of a house sparrow." and len(s[1]) == 80
    assert s[2][80:] == ["The robin is a small bird.", "It sings at dawn, e.g. in gardens."]   # wiki rules: References go
    assert s[3][80:] == ["The snowy owl is white.", "It hunts lemmings on the tundra."]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: no test/ folder under {root}: val/ is the test split as well",
        f"warning: 2 of 4 classes have no {root}/descriptions/<class>.txt: they use the prompt templates only"]


def test_classnames_txt_names_the_classes_in_folder_order_and_a_test_folder_is_the_test_split(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "birds", descriptions=False)
    write(root / "classnames.txt", "kiwi\nhouse sparrow\nEuropean robin\nsnowy owl\n\n")
    d = data.load_data("folder", str(root))
    assert d.classnames == ["kiwi", "house sparrow", "European robin", "snowy owl"]
    assert d.corpus.sentences[2][0] == "a bad photo of a European robin."
    assert d.test is not d.val and list(d.test.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert d.test.images[0] == os.path.join(str(root), "test", "Kiwi", "0.png")
    assert capsys.readouterr().err == (f"warning: no {root}/descriptions folder: using the 80 prompt templates only "
                                       "(add descriptions/<class>.txt files for class descriptions)\n")
    data.load_data("folder", str(root), text="prompt")                      # templates only on purpose: no warning
    assert capsys.readouterr().err == ""


def test_description_file_that_names_no_class_is_one_warning(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "birds")
    write(root / "descriptions/Robin.txt", "The robin is red.\n")           # file names match folders exactly
    data.load_data("folder", str(root))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: 1 files in {root}/descriptions name no class (first: Robin.txt); they are not read")


def test_folder_defaults_are_imagenet_lts_and_the_run_folder_is_named_after_the_tree(tmp_path):
    for stage in (cvlp, lgr):
        a = stage.get_args(["--data", "imagenet_lt"])
        b = stage.get_args(["--data", "folder", "--data-root", str(tmp_path / "birds")])
        for key in ("backbone", "image_size", "epochs", "lr", "batch"):
            assert getattr(a, key) == getattr(b, key), key
    assert b.out == os.path.join("runs", "folder_birds", "RN50") and b.imbalance is None
    assert data.DATASETS["folder"]["crop_scale"] == data.DATASETS["imagenet_lt"]["crop_scale"] == (0.08, 1.0)


def test_summary_counts_the_tree_and_says_val_is_the_test_split(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "birds", test=False)
    data.main(["--data", "folder", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    out = capsys.readouterr().out
    assert "dataset      folder: 4 classes\n" in out
    assert "images       train 156, val 8, test 8 (val is the test split)\n" in out
    assert "train/class  max 120, min 1, imbalance factor 120\n" in out
    assert "  many          1 classes,     120 train images (>= 100 a class)\n" in out
    assert "  medium        1 classes,      30 train images (21-99 a class)\n" in out
    assert "  few           2 classes,       6 train images (<= 20 a class)\n" in out
    # the names as read from the folders (underscores as spaces), head to tail, with their training images
    assert "classes      head: house sparrow (120), robin (30), snowy owl (5)\n" in out
    assert "             tail: Kiwi (1), snowy owl (5), robin (30)\n" in out
    assert "corpus       327 sentences (320 template, 7 description)" in out   # 4 x 80 prompts + 2 + 1 + 2 + 2
    assert Image.open(tmp_path / "sheet.png").size == (20 * 48, 60)            # one row of 4 classes


# Bad trees: `python data.py` stops with one line naming the problem (exit 2) and writes nothing.

BAD_TREES = {   # what breaks the tree -> what the one error line must say
    "no train folder": (lambda r: os.rename(r / "train", r / "training"),
                        r"\S+/birds has no train/ folder; expected train/<class>/\*, val/<class>/\*"),
    "no val folder": (lambda r: os.rename(r / "val", r / "valid"), r"\S+/birds has no val/ folder"),
    "empty class folder": (lambda r: [os.remove(r / "train/Kiwi/0.png")],
                           r"class folder \S+/birds/train/Kiwi holds no images; add some or remove the folder"),
    "class missing from val": (lambda r: shutil.rmtree(r / "val/robin"),
                               r"\S+/birds/val has no folder for class 'robin' \(train/robin\); every class needs val images"),
    "class only in test": (lambda r: save_image(r / "test/emu/0.png", (1, 2, 3)),
                           r"\S+/birds/test/emu is a class without training images \(no train/emu\)"),
    "not an image by extension": (lambda r: write(r / "train/robin/notes.txt", "seen at dawn"),
                                  r"\S+/birds/train/robin/notes\.txt is not an image file by its extension "
                                  r"\(expected one of \.jpg \.jpeg .*\); convert it or move it out of the tree"),
    "image beside the class folders": (lambda r: save_image(r / "train/stray.png", (1, 2, 3)),
                                       r"\S+/birds/train/stray\.png is a file; images go in \S+/train/<class>/"),
    "names file of the wrong length": (lambda r: write(r / "classnames.txt", "kiwi\nsparrow\nrobin\n"),
                                       r"\S+/classnames\.txt names 3 classes but train/ has 4 class folders; write one "
                                       r"name a line, in the folders' sorted order \(Kiwi, house_sparrow, robin, \.\.\.\)"),
    "unreadable image": (lambda r: write(r / "train/Kiwi/0.png", np.random.default_rng(0).bytes(500)),   # the sheet's
                         r"cannot read image \S+/train/Kiwi/0\.png: cannot identify image file .*; replace it or remove it"),
}


@pytest.mark.parametrize("fault", list(BAD_TREES))
def test_bad_tree_stops_data_py_with_one_line_naming_the_problem(tmp_path, capsys, fault):
    break_tree, says = BAD_TREES[fault]
    root = make_folder_tree(tmp_path / "birds")
    break_tree(root)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        data.main(["--data", "folder", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    assert e.value.code == 2
    lines = errors_and_warnings(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(says, lines[0]), lines[0]
    assert snapshot(tmp_path) == before                                     # no contact sheet, nothing touched


def test_folder_without_data_root_says_so():
    with pytest.raises(DataError, match=r"--data folder needs --data-root PATH, a folder holding train/<class>/\*"):
        data.load_data("folder")


# ----------------------------------------------------------------------------------------------
# CIFAR-100-LT


def test_cifar100_lt_counts_are_the_literatures():
    # n_i = int(500 * (1 / 100) ** (i / 99)): class 0 keeps 500, class 99 keeps 500 / 100 = 5; class 50:
    # 500 * 10 ** (-2 * 50 / 99) = 500 * 0.09767 = 48.8 -> 48. The totals are the published sizes of CIFAR-100-LT.
    counts = own_data.long_tailed_counts(500, 100, 100)
    assert counts[:3] == [500, 477, 455] and counts[50] == 48 and counts[-1] == 5
    assert sum(counts) == 10847
    assert sum(own_data.long_tailed_counts(500, 100, 50)) == 12608 and own_data.long_tailed_counts(500, 100, 50)[-1] == 10
    assert sum(own_data.long_tailed_counts(500, 100, 10)) == 19573 and own_data.long_tailed_counts(500, 100, 10)[-1] == 50


def test_long_tailed_subset_is_ldam_drws_draw_image_for_image():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 0])     # 7, 5, 4 images of classes 0, 1, 2
    counts = [5, 3, 1]
    # The literature's subset (Cao et al.'s LDAM-DRW, as LIFT takes it): numpy's global generator seeded 0, the
    # classes in order, each class's indices shuffled and its first n_c kept:
    state = np.random.get_state()
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected += idx[:n].tolist()
    np.random.set_state(state)
    split = data.Split(np.arange(16)[:, None], labels)                     # image k is the number k
    subset = own_data.long_tailed_subset(split, counts)
    assert subset.images[:, 0].tolist() == expected and list(np.bincount(subset.labels)) == [5, 3, 1]
    assert subset.images[:5, 0].tolist() != [0, 3, 6, 9, 12]                # not simply the first five in file order


CIFAR_NAMES = ["apple", "aquarium_fish", "baby"] + [f"thing_{i:02d}" for i in range(97)]


def cifar_image_rows(n, seed):
    """(n, 3072) uint8 rows as CIFAR stores images: the red plane (32 x 32, row by row), then green, then blue."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def make_cifar_files(root, per_class=20, test_per_class=2, keys=str, num_classes=100):
    """<root>/cifar-100-python/{train,test,meta} in torchvision's format: pickled dicts "data" (N, 3072) uint8,
    "fine_labels" [N], "coarse_labels", "filenames", "batch_label"; meta "fine_label_names" [C]. Labels cycle
    0..C-1 through the file (C = num_classes: 100, or fewer where encoding C x 80 prompts would be the test's
    cost). keys=bytes writes the keys and class names as bytes, as a copy re-saved after loading with
    encoding="bytes" has them."""
    folder = root / "cifar-100-python"
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", per_class, 0), ("test", test_per_class, 1)):
        labels = [i % num_classes for i in range(num_classes * n)]
        d = {"data": cifar_image_rows(len(labels), seed), "fine_labels": labels, "coarse_labels": [y // 5 for y in labels],
             "filenames": [f"{split}_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch 1 of 1"}
        with open(folder / split, "wb") as f:
            pickle.dump({keys(k, "latin1") if keys is bytes else k: v for k, v in d.items()}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        names = [n.encode() for n in CIFAR_NAMES[:num_classes]] if keys is bytes else CIFAR_NAMES[:num_classes]
        meta = {"fine_label_names": names, "coarse_label_names": [f"group_{i}" for i in range(20)]}
        pickle.dump({keys(k, "latin1") if keys is bytes else k: v for k, v in meta.items()}, f, protocol=2)
    return root


def test_cifar100_lt_reads_torchvisions_files_as_in_memory_arrays(tmp_path, capsys):
    root = make_cifar_files(tmp_path / "cifar100")
    d = data.load_data("cifar100_lt_ir10", str(root), text="prompt")
    assert d.name == "cifar100_lt_ir10" and d.num_classes == 100
    assert d.classnames[:3] == ["apple", "aquarium fish", "baby"] and d.classnames[3] == "thing 00"
    # n_max is the file's 20 a class: int(20 * 0.1 ** (i / 99)), 20 for class 0 down to 2 for class 99
    assert list(d.counts) == own_data.long_tailed_counts(20, 100, 10) and d.counts[0] == 20 and d.counts[-1] == 2
    assert isinstance(d.train.images, np.ndarray) and d.train.images.shape == (len(d.train.labels), 32, 32, 3)
    assert d.train.images.dtype == np.uint8 and d.train.lines is None
    # pixel (y, x) of image k is (R, G, B) = row k at y * 32 + x, 1024 + that, 2048 + that
    rows = cifar_image_rows(200, 1)                                      # the test file's images, in order
    k, y, x = 7, 3, 30
    assert d.test.images[k, y, x].tolist() == [rows[k, y * 32 + x], rows[k, 1024 + y * 32 + x], rows[k, 2048 + y * 32 + x]]
    assert list(np.bincount(d.test.labels)) == [2] * 100 and d.val is d.test  # balanced; val is the test split
    assert d.corpus.sentences[1][0] == "a bad photo of a aquarium fish." and capsys.readouterr().err == ""


def test_cifar_files_with_bytes_keys_and_a_descriptions_folder(tmp_path, capsys):
    root = make_cifar_files(tmp_path / "cifar100", keys=bytes)
    write(root / "descriptions/aquarium_fish.txt", "Aquarium fish live in tanks. They come in many colours.\n")
    a = data.load_data("cifar100_lt", str(root))                          # cifar100_lt alone: imbalance 100
    assert a.name == "cifar100_lt_ir100" and a.classnames[1] == "aquarium fish"
    assert a.corpus.sentences[1][80:] == ["Aquarium fish live in tanks.", "They come in many colours."]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: 99 of 100 classes have no {root}/descriptions/<class>.txt: they use the prompt templates only",
        # int(20 * 0.01 ** (i / 99)) < 1 from class 65 on (20 * 0.01 ** (65 / 99) = 0.97): a tiny file runs dry
        "warning: 35 of 100 classes have no training images in cifar100_lt_ir100"]


def test_imbalance_names_the_run_and_reaches_every_stage(tmp_path):
    for stage in (cvlp, anss, lgr, evaluate):
        args = stage.get_args(["--data", "cifar100_lt", "--imbalance", "10"])
        assert args.data == "cifar100_lt_ir10" and args.imbalance == 10
        assert args.out == os.path.join("runs", "cifar100_lt_ir10", "RN50") and args.data_root == "data/cifar100"
    assert cvlp.get_args(["--data", "cifar100_lt"]).data == "cifar100_lt_ir100"            # default 100
    assert cvlp.get_args(["--data", "cifar100_lt_ir50"]).imbalance == 50
    a, b = lgr.get_args(["--data", "imagenet_lt"]), lgr.get_args(["--data", "cifar100_lt"])
    for key in ("backbone", "image_size", "epochs", "lr", "batch"):
        assert getattr(a, key) == getattr(b, key), key
    assert data.DATASETS["cifar100_lt_ir10"]["image_size"] == 224       # 32 px upsampled, as LIFT and BALLAD


@pytest.mark.parametrize("argv, says", [
    (["--data", "imagenet_lt", "--imbalance", "10"], "error: --imbalance 10 does not fit --data imagenet_lt; it sets "
                                                     "CIFAR-100-LT's training counts (--data cifar100_lt)"),
    (["--data", "cifar100_lt_ir10", "--imbalance", "50"], "error: --imbalance 50 does not fit --data cifar100_lt_ir10 "
                                                          "(imbalance 10); give --data cifar100_lt --imbalance 50")])
def test_imbalance_that_does_not_fit_the_dataset_is_one_line(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        cvlp.get_args(argv)
    assert e.value.code == 2 and capsys.readouterr().err == says + "\n"


def pickle_that_makes_a_folder(path):
    """A pickle whose loading would call os.makedirs(path): what a hostile "CIFAR file" could do."""
    class Payload:
        def __reduce__(self):
            return os.makedirs, (path,)
    return pickle.dumps({"data": Payload()}, protocol=2)


BAD_CIFAR = {   # what breaks the files -> what the one error line must say
    "no files": (lambda f: [os.remove(f / n) for n in ("train", "test", "meta")],
                 r"\S+/cifar-100-python/meta not found; put CIFAR-100's python version there"),
    "not a pickle": (lambda f: write(f / "train", b"<html>404 Not Found</html>"),
                     r"\S+/cifar-100-python/train is not a CIFAR-100 python file \(UnpicklingError: .*\); re-download it"),
    "CIFAR-10's labels": (lambda f: write(f / "test", pickle.dumps({"data": cifar_image_rows(2, 0), "labels": [0, 1]},
                                                                  protocol=2)),
                          r"\S+/test has no 'fine_labels' entry; expected CIFAR-100's python version"),
    "a pickle that runs code": (lambda f: write(f / "meta", pickle_that_makes_a_folder(str(f / "made_by_pickle"))),
                                r"\S+/meta is not a CIFAR-100 python file \(UnpicklingError: os\.makedirs is not "
                                r"part of a CIFAR file\)"),
}


@pytest.mark.parametrize("fault", list(BAD_CIFAR))
def test_bad_cifar_files_stop_data_py_with_one_line(tmp_path, capsys, fault):
    break_files, says = BAD_CIFAR[fault]
    root = make_cifar_files(tmp_path / "cifar100", per_class=1, test_per_class=1)
    break_files(root / "cifar-100-python")
    with pytest.raises(SystemExit) as e:
        data.main(["--data", "cifar100_lt", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    assert e.value.code == 2
    lines = errors_and_warnings(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(says, lines[0]), lines
    assert not os.path.exists(root / "cifar-100-python" / "made_by_pickle")  # the payload never ran


# ----------------------------------------------------------------------------------------------
# Every stage end to end: cvlp -> anss -> lgr (LGR and the CLIP + FC baseline) -> evaluate -> predict


def run_every_stage(common, clip, out):
    """The pipeline of test_pipeline.py on another dataset: two steps per training stage, M = 8 anchors."""
    short = ["--epochs", "1", "--stop-after-steps", "2", "--batch", "8"]
    common = common + ["--out", str(out), "--device", "cpu", "--backbone", "shapes-tiny", "--image-size", "32",
                       "--workers", "0"]
    cvlp.main(common + ["--clip-weights", str(clip)] + short)
    anss.main(common + ["--M", "8"])
    lgr.main(common + short)
    lgr.main(common + ["--clip-weights", str(clip), "--init", "clip", "--head", "fc"] + short)
    evaluate.main(common + ["--clip-weights", str(clip)])
    return common


def check_every_stage(out, name, num_classes, counts):
    """What test_pipeline.py checks on shapes_lt: the files, plain checkpoints naming the dataset, anchors
    (C, M, D) with a mask, every head by shot split with per-class accuracies."""
    for f, stage in (("cvlp.pt", "cvlp"), ("anchor_embeds.pt", "anss"), ("lgr.pt", "lgr"), ("fc_clip.pt", "lgr")):
        ckpt = torch.load(out / f, weights_only=True)
        assert ckpt["stage"] == stage and ckpt["data"] == name and ckpt["args"]["data"] == name
        assert ckpt["num_classes"] == num_classes
    a = torch.load(out / "anchor_embeds.pt", weights_only=True)
    assert a["embeds"].shape == (num_classes, 8, 64) and a["mask"].all()   # every class has 80 prompts at least
    r = json.loads((out / "eval.json").read_text())
    assert r["data"] == name and r["train_counts"] == list(counts)
    shots = set(data.shot_split(counts))                                   # a split without classes scores NaN
    for head in ("Zero-Shot CLIP", "Baseline (CLIP + FC)", "VL-LTR (LGR)", "VL-LTR (LGR): P^I only",
                 "VL-LTR (LGR): P^T only", "KNN head (k=5)"):
        scores = r["results"][head]
        assert 0 <= scores["overall"] <= 100 and len(scores["per_class"]) == num_classes, head
        assert all(0 <= scores[k] <= 100 if k in shots else np.isnan(scores[k]) for k in ("many", "medium", "few"))


@pytest.mark.parametrize("test_folder, descriptions", [(True, True), (False, False)])
def test_every_stage_runs_on_a_folder_tree(tmp_path, tiny_clip, capsys, test_folder, descriptions):
    root = make_folder_tree(tmp_path / "birds", test=test_folder, descriptions=descriptions)
    out = tmp_path / "run"
    run_every_stage(["--data", "folder", "--data-root", str(root)], tiny_clip, out)
    check_every_stage(out, "folder", 4, [1, 120, 30, 5])                 # many, medium and few classes
    anchors = json.loads((out / "anchors.json").read_text())["classes"]
    assert [c["name"] for c in anchors] == ["Kiwi", "house sparrow", "robin", "snowy owl"]
    capsys.readouterr()
    predict.main([str(root / "val/robin/0.png"), "--run", str(out), "--device", "cpu", "--json", "--top", "4"])
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert sorted(t["name"] for t in top) == ["Kiwi", "house sparrow", "robin", "snowy owl"]


def test_every_stage_runs_on_cifar100_lt_and_refuses_another_imbalance(tmp_path, tiny_clip, capsys):
    # 10 classes, not 100: the zero-shot head alone would encode 100 x 80 prompts on the CPU
    root = make_cifar_files(tmp_path / "cifar100", num_classes=10)
    out = tmp_path / "run"
    common = run_every_stage(["--data", "cifar100_lt", "--imbalance", "10", "--data-root", str(root)], tiny_clip, out)
    check_every_stage(out, "cifar100_lt_ir10", 10, [20, 15, 11, 9, 7, 5, 4, 3, 2, 2])   # int(20 * 0.1 ** (i / 9))
    capsys.readouterr()
    predict.main(["--demo", "--demo-images", "2", "--run", str(out), "--device", "cpu"])   # test images of few-shot classes
    assert os.path.getsize(out / "predict_demo.png") > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                                    # an ir50 stage on the ir10 run folder
        anss.main([x if x != "10" else "50" for x in common] + ["--M", "8"])
    assert e.value.code == 2
    lines = errors_and_warnings(capsys.readouterr().err)                 # after the data's warnings, one error
    assert [x for x in lines if x.startswith("error:")] == lines[-1:]
    assert "cvlp checkpoint of cifar100_lt_ir10/shapes-tiny" in lines[-1] and "expects data 'cifar100_lt_ir50'" in lines[-1]


def test_unreadable_image_in_a_tree_stops_cvlp_and_skip_bad_images_leaves_it_out(tmp_path, tiny_clip, capsys):
    root = make_folder_tree(tmp_path / "birds", counts={"house_sparrow": 4, "robin": 2, "snowy_owl": 1, "Kiwi": 1})
    bad = root / "train/robin/9.png"
    write(bad, np.random.default_rng(0).bytes(500))
    args = ["--data", "folder", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
            "--clip-weights", str(tiny_clip), "--epochs", "1", "--batch", "3", "--sampling", "instance",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:                                    # 9 images, batch 3: every one is read
        cvlp.main(args)
    assert e.value.code == 2
    assert errors_and_warnings(capsys.readouterr().err)[-1] == (
        f"error: cannot read image {bad}: cannot identify image file '{bad}'; replace it or remove it")
    cvlp.main(args + ["--skip-bad-images"])
    out, err = capsys.readouterr()
    assert errors_and_warnings(err)[-1] == (f"warning: skipped 1 unreadable images (first: {bad}); --skip-bad-images "
                                            "left them out (train 1, val 0, test 0)")
    assert "cvlp: folder shapes-tiny 8 images" in out and "cvlp done" in out
