"""Fault injection on the data side: a broken dataset tree or text corpus stops a run with one line that
names the problem (exit status 2, no traceback) or, where the run can sensibly go on, with one warning.

    python -m pytest -q test_faults.py        # CPU, no download, ~15 s

Each case runs a real entry point on a tiny ImageNet-LT tree (test_data.make_imagenet_tree: 3 classes,
6 train and 3 val images, wiki for classes 0 and 1): `python data.py` as a subprocess where it must fail
(so the exit status and stderr are exactly what a user sees), `data.main` / `cvlp.main` in-process
otherwise. Training faults (resume, NaN, bad checkpoints) are in test_faults_training.py.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cvlp
import data
from test_data import append_line, make_imagenet_tree, write

HERE = os.path.dirname(os.path.abspath(__file__))
EOT = 49407                                                       # open_clip's end-of-text token id


def snapshot(folder):
    """{relative path: bytes} of every file under folder: to show that a failed run changed nothing."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def errors_and_warnings(stderr):
    return [line for line in stderr.splitlines() if line.startswith(("error:", "warning:"))]


# ----------------------------------------------------------------------------------------------
# A broken tree: `python data.py` exits 2 with one line naming the problem, and writes nothing


BROKEN_TREES = {   # what breaks the tree -> what the one error line must say
    "missing root": (lambda root: shutil.rmtree(root),
                     r"data root \S+/imagenet not found; expected ImageNet_LT_\{train,val,test\}\.txt.*pass --data-root"),
    "empty root": (lambda root: shutil.rmtree(root) or os.mkdir(root), r"data root \S+/imagenet is empty; expected ImageNet_LT_\{train,val,test\}\.txt"),
    "missing split file": (lambda root: os.remove(root / "ImageNet_LT_val.txt"),
                           r"split file \S+/ImageNet_LT_val\.txt not found"),
    "image listed but absent": (lambda root: append_line(root / "ImageNet_LT_train.txt", "train/n01440764/gone.JPEG 0"),
                                r"\S+/ImageNet_LT_train\.txt:7: image \S+/train/n01440764/gone\.JPEG not found"),
    "label out of range": (lambda root: append_line(root / "ImageNet_LT_val.txt", "val/v0.JPEG 3"),
                           r"\S+/ImageNet_LT_val\.txt:4: label 3 out of range \(valid: 0\.\.2\)"),
}


@pytest.mark.parametrize("fault", list(BROKEN_TREES))
def test_broken_tree_stops_data_py_with_one_line_naming_the_problem(tmp_path, fault):
    break_tree, says = BROKEN_TREES[fault]
    root = make_imagenet_tree(tmp_path / "imagenet")
    break_tree(root)
    sheet = tmp_path / "sheet.png"
    write(sheet, b"the contact sheet of an earlier run")
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "data.py", "--data", "imagenet_lt", "--data-root", str(root), "--sheet", str(sheet)],
                       cwd=HERE, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(says, lines[0]), lines[0]
    assert snapshot(tmp_path) == before                         # neither the tree nor the old sheet touched


# ----------------------------------------------------------------------------------------------
# Odd text: loads, with at most one warning per kind of oddity


def test_non_utf8_wiki_file_loads_and_its_sentences_survive(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    write(root / "wiki/desc_2.txt", b"\xff\xfe The caf\xe9 shark swims fast.\nIt hunts seals near the coast.\n")
    data.main(["--data", "imagenet_lt", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    out, err = capsys.readouterr()
    assert err == "" and "corpus       249 sentences (240 template, 9 description)" in out
    d = data.load_data("imagenet_lt", str(root))
    # Each undecodable byte becomes U+FFFD ("\xff\xfe" is not read as a UTF-16 byte-order mark).
    assert d.corpus.sentences[2][80:] == ["\ufffd\ufffd The caf\ufffd shark swims fast.", "It hunts seals near the coast."]


def test_empty_and_whitespace_only_sentences_are_dropped(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    write(root / "wiki/desc_2.txt", "\n   \n\t\n . \nThe shark is a fish.\n")
    d = data.load_data("imagenet_lt", str(root))
    assert d.corpus.sentences[2][80:] == ["The shark is a fish."]
    # Descriptions handed to build_corpus directly: "" and "   " go, the flags stay aligned.
    corpus = data.build_corpus(["red circle"], [["", "It is red.", "   ", "It is round."]],
                               informative=[[False, True, False, True]])
    assert corpus.sentences[0][80:] == ["It is red.", "It is round."]
    assert corpus.source[0][80:] == ["description", "description"] and corpus.informative[0][80:] == [True, True]
    assert capsys.readouterr().err == ""


def test_class_without_any_sentence_is_one_warning_and_an_empty_list(capsys):
    corpus = data.build_corpus(["red circle", "blue square", "green star"], [["It is red."], [" "], []], prompts=False)
    assert corpus.sentences == [["It is red."], [], []] and corpus.source == [["description"], [], []]
    assert capsys.readouterr().err == ("warning: 2 of 3 classes have no text at all (no description, no prompt "
                                       "templates); they get no sentence to train on\n")
    text = data.tokenize_corpus(corpus, context_length=8)     # and tokenising it does not crash
    assert text["offsets"].tolist() == [0, 1, 1, 1] and text["label"].tolist() == [0]


def test_sentence_longer_than_the_context_is_one_truncation_warning(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    write(root / "wiki/desc_2.txt", "The shark " + "swims " * 197 + "fast.\n")   # 200 words, ~202 tokens
    data.main(["--data", "imagenet_lt", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    assert capsys.readouterr().err == ("warning: 1 sentences are longer than the 77-token context and were "
                                       "truncated (EOT kept last)\n")
    d = data.load_data("imagenet_lt", str(root))
    for _ in range(2):                                        # tokenised, then from the cache: one warning each
        text = data.tokenize_corpus(d.corpus, 77, cache_dir=str(tmp_path))
        assert capsys.readouterr().err.count("warning:") == 1
    long = text["tokens"][-1]                                 # the long sentence is the last one of the last class
    assert long[-1] == EOT and (long != 0).all()


def test_truncated_count_is_exact_and_tokens_are_open_clips():
    # "a b c d e f": [SOT] + 6 words + [EOT] = 8 tokens, fits a context of 8 exactly (EOT in the last slot
    # but nothing cut); "a b c d e f g" has 9 and is cut to [SOT] a b c d e f [EOT].
    import open_clip
    sentences = ["a b c d e f", "a b c d e f g", "a b"]
    tokens, truncated = data.tokenize_exact(sentences, 8)
    assert truncated == 1
    assert torch.equal(tokens, open_clip.get_tokenizer("RN50")(sentences, context_length=8))
    assert tokens[0, -1] == tokens[1, -1] == EOT and tokens[2, 3] == EOT and tokens[2, -1] == 0


def test_class_without_training_images_is_one_warning_not_an_error(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    append_line(root / "labels.txt", "n01491361 3 tiger shark")
    for c in (2, 3):
        write(root / f"wiki/desc_{c}.txt", "It is a large shark.\n")
    data.main(["--data", "imagenet_lt", "--data-root", str(root), "--sheet", str(tmp_path / "sheet.png")])
    out, err = capsys.readouterr()
    assert err == "warning: 1 of 4 classes have no training images in imagenet_lt\n"
    assert "train/class  max 2, min 0" in out and os.path.exists(tmp_path / "sheet.png")


# ----------------------------------------------------------------------------------------------
# Unreadable images: an error naming image and split line, or with --skip-bad-images left out


def add_corrupt_image(root, rel, split_file, label):
    """Random bytes saved under an image name, listed at the end of the split file."""
    write(root / rel, np.random.default_rng(0).bytes(2000))
    append_line(root / split_file, f"{rel} {label}")


def test_skip_bad_images_drops_missing_and_corrupt_images_with_one_warning(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    append_line(root / "ImageNet_LT_train.txt", "train/n01440764/gone.JPEG 0")           # line 7
    add_corrupt_image(root, "val/bad.JPEG", "ImageNet_LT_val.txt", 1)                     # line 4
    d = data.load_data("imagenet_lt", str(root), text="prompt", skip_bad_images=True)
    assert list(d.train.labels) == [0, 0, 1, 1, 2, 2] and list(d.val.labels) == [0, 1, 2]
    assert [x.rsplit(":", 1)[1] for x in d.val.lines] == ["1", "2", "3"]                 # lines kept aligned
    assert d.val.images[2].endswith("val/v2.JPEG")
    train_file = os.path.join(str(root), "ImageNet_LT_train.txt")
    assert capsys.readouterr().err == (
        f"warning: skipped 2 unreadable images (first: {root}/train/n01440764/gone.JPEG at {train_file}:7); "
        "--skip-bad-images left them out (train 1, val 1, test 0)\n")
    # Without the flag the missing image is an error at load time; the corrupt one waits for its loading.
    with pytest.raises(data.DataError, match=r"ImageNet_LT_train\.txt:7: image .*gone\.JPEG not found"):
        data.load_data("imagenet_lt", str(root), text="prompt")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "shapes_tiny.pt"
    torch.manual_seed(0)
    torch.save(cvlp.create_clip("shapes-tiny", 32).state_dict(), path)
    return path


def cvlp_on_tree_with_a_corrupt_image(tmp_path, tiny_clip, *extra):
    """cvlp.main on 8 train images, one of them random bytes (line 8). Batch 4 with instance sampling
    draws every image in the one epoch, so the corrupt one is always reached. Returns (exit code, root)."""
    root = make_imagenet_tree(tmp_path / "imagenet")
    write(root / "train/n01484850/c.JPEG", (root / "train/n01484850/a.JPEG").read_bytes())
    append_line(root / "ImageNet_LT_train.txt", "train/n01484850/c.JPEG 2")              # line 7
    add_corrupt_image(root, "train/n01484850/bad.JPEG", "ImageNet_LT_train.txt", 2)       # line 8
    write(root / "wiki/desc_2.txt", "The great white shark is a large fish.\n")
    args = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
            "--clip-weights", str(tiny_clip), "--epochs", "1", "--batch", "4", "--sampling", "instance",
            "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run"), *extra]
    code = 0
    try:
        cvlp.main(args)
    except SystemExit as e:
        code = e.code
    return code, root


def test_corrupt_image_stops_cvlp_naming_image_and_split_line(tmp_path, tiny_clip, capsys):
    write(tmp_path / "run/cvlp.pt", b"the checkpoint of an earlier run")
    code, root = cvlp_on_tree_with_a_corrupt_image(tmp_path, tiny_clip)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert errors_and_warnings(err) == [
        f"error: cannot read image {root}/train/n01484850/bad.JPEG (listed at {root}/ImageNet_LT_train.txt:8): "
        f"cannot identify image file '{root}/train/n01484850/bad.JPEG'; "
        "re-download it or remove its line from the split file"]
    assert (tmp_path / "run/cvlp.pt").read_bytes() == b"the checkpoint of an earlier run"


def test_corrupt_image_with_skip_bad_images_trains_to_the_end(tmp_path, tiny_clip, capsys):
    code, root = cvlp_on_tree_with_a_corrupt_image(tmp_path, tiny_clip, "--skip-bad-images")
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert errors_and_warnings(err) == [
        f"warning: skipped 1 unreadable images (first: {root}/train/n01484850/bad.JPEG at {root}/ImageNet_LT_train.txt:8); "
        "--skip-bad-images left them out (train 1, val 0, test 0)"]
    assert "cvlp: imagenet_lt shapes-tiny 7 images" in out and "cvlp done" in out
    assert torch.load(tmp_path / "run/cvlp.pt", weights_only=True)["stage"] == "cvlp"
