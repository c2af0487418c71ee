"""Fault injection: a broken dataset tree or text corpus, an interrupted run, a bad number, a bad checkpoint
or a full disk stops a run with one line that names the problem (exit status 2, no traceback) and leaves
existing files as they were, or, where the run can sensibly go on, with one warning.

    python -m pytest -q test_faults.py        # CPU, no download, about a minute

Each case runs a real entry point on a tiny ImageNet-LT tree (test_data.make_imagenet_tree: 3 classes,
6 train and 3 val images, wiki for classes 0 and 1): `python data.py` as a subprocess where it must fail
(so the exit status and stderr are exactly what a user sees), `data.main` / `cvlp.main` in-process
otherwise. The training faults at the end run cvlp.py / lgr.py / anss.py in-process on shapes_lt
(the conftest `shapes_env` world) with a tiny random CLIP and a few steps.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import anss
import cvlp
import data
import lgr
from util import clip_models, engine, images, progress
from tools import experiments
from tests.test_data import append_line, make_imagenet_tree, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
                       cwd=ROOT, capture_output=True, text=True)
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
    tokens, truncated = clip_models.tokenize_exact(sentences, 8)
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
    with pytest.raises(engine.DataError, match=r"ImageNet_LT_train\.txt:7: image .*gone\.JPEG not found"):
        data.load_data("imagenet_lt", str(root), text="prompt")


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
    write(tmp_path / "run/cvlp.pt", b"the checkpoint of an earlier run")    # replaced only by a first save
    code, root = cvlp_on_tree_with_a_corrupt_image(tmp_path, tiny_clip, "--overwrite")
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


# ----------------------------------------------------------------------------------------------
# Faults in training: interruption, resume, bad numbers, bad checkpoints, no space. Each runs the real
# entry point in-process on shapes_lt with a tiny random CLIP and a few steps.


def cvlp_args(env, out, *extra):
    return ["--data", "shapes_lt", "--data-root", str(env["root"]), "--out", str(out), "--device", "cpu",
            "--clip-weights", str(env["clip"]), "--batch", "16", "--epochs", "2", *extra]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


FOUR_STEPS = ("--accum", "2", "--stop-after-steps", "4")         # 4 optimiser steps of 2 accumulated batches


@pytest.fixture(scope="module")
def uninterrupted(shapes_env, tmp_path_factory):
    """cvlp.pt of an uninterrupted run of FOUR_STEPS: what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    cvlp.main(cvlp_args(shapes_env, out, *FOUR_STEPS))
    return out / "cvlp.pt"


def test_resume_mid_epoch_ends_with_bitwise_the_same_weights(shapes_env, tmp_path, uninterrupted):
    # Interrupted: stop after 2 of the 4 steps, resume to 4.
    cvlp.main(cvlp_args(shapes_env, tmp_path / "b", "--accum", "2", "--stop-after-steps", "2"))
    assert torch.load(tmp_path / "b" / "cvlp.pt", weights_only=True)["position"]["batch"] == 4   # mid-epoch
    cvlp.main(cvlp_args(shapes_env, tmp_path / "b", *FOUR_STEPS, "--resume"))
    assert_same_weights(weights(uninterrupted), weights(tmp_path / "b" / "cvlp.pt"))
    # Without restoring the sample order and random states the weights differ (the test can fail):
    cvlp.main(cvlp_args(shapes_env, tmp_path / "c", "--accum", "2", "--stop-after-steps", "2", "--seed", "1"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(uninterrupted), weights(tmp_path / "c" / "cvlp.pt"))


def noisy_tree(root, n_per_class=2, classes=3):
    """An ImageNet-LT tree of random-noise 24 px images: every crop and flip of the augmentation changes the pixels."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_per_class * classes):
        rel = f"train/{i}.JPEG"
        os.makedirs(root / "train", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / rel, format="PNG")
        lines.append(f"{rel} {i % classes}\n")
    write(root / "ImageNet_LT_train.txt", "".join(lines))
    write(root / "ImageNet_LT_val.txt", "".join(lines[:classes]))
    write(root / "ImageNet_LT_test.txt", "".join(lines[:classes]))
    write(root / "labels.txt", "".join(f"n{c} {c} class {c}\n" for c in range(classes)))
    return root


def test_resume_from_an_end_of_epoch_checkpoint_is_exact(tmp_path, tiny_clip, monkeypatch):
    """Killed between epochs (epoch 1's checkpoint written, no step of epoch 2 taken) and resumed: the same weights
    as without the kill. Epoch 2's augmentation (PIL images, torch's generator in the main process) must start from
    the random state epoch 1 ended in, before the loader's own draw at the start of the epoch."""
    root = noisy_tree(tmp_path / "imagenet")
    args = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "16",
            "--clip-weights", str(tiny_clip), "--epochs", "2", "--batch", "2", "--sampling", "instance",
            "--workers", "0", "--device", "cpu", "--text", "prompt"]
    cvlp.main(args + ["--out", str(tmp_path / "a")])                       # 2 epochs x 3 steps, uninterrupted
    real, calls = cvlp.cvlp_loss, []

    def killed_at_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 4:                                              # the first batch of epoch 2
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(cvlp, "cvlp_loss", killed_at_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        cvlp.main(args + ["--out", str(tmp_path / "b")])
    position = torch.load(tmp_path / "b" / "cvlp.pt", weights_only=True)["position"]
    assert (position["epoch"], position["batch"]) == (1, 0)                # the end of epoch 1
    monkeypatch.setattr(cvlp, "cvlp_loss", real)
    cvlp.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert_same_weights(weights(tmp_path / "a" / "cvlp.pt"), weights(tmp_path / "b" / "cvlp.pt"))


def test_val_every_epoch_reports_each_epoch_and_leaves_the_training_unchanged(tmp_path, tiny_clip, capsys):
    """The over-fitting check of the L_dis experiment: a val line after every epoch and cvlp_best.pt, while the
    weights equal a run without it (the val loader's seed draw from torch's generator must not reach epoch 2's
    augmentation of the PIL images)."""
    root = noisy_tree(tmp_path / "imagenet")
    args = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "16",
            "--clip-weights", str(tiny_clip), "--epochs", "2", "--batch", "2", "--sampling", "instance",
            "--workers", "0", "--device", "cpu", "--text", "prompt"]
    cvlp.main(args + ["--out", str(tmp_path / "a")])
    capsys.readouterr()
    cvlp.main(args + ["--out", str(tmp_path / "b"), "--val-every-epoch"])
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("val proto top-1" in line for line in epoch_lines), epoch_lines
    assert "before training: val proto top-1" in out
    assert (tmp_path / "b" / "cvlp_best.pt").exists() and not (tmp_path / "a" / "cvlp_best.pt").exists()
    assert_same_weights(weights(tmp_path / "a" / "cvlp.pt"), weights(tmp_path / "b" / "cvlp.pt"))
    history = [torch.load(tmp_path / run / "cvlp.pt", weights_only=True)["position"]["history"] for run in "ab"]
    assert [h["epoch"] for h in history[1]] == [1, 2] and all(0 <= h["val"] <= 100 for h in history[1])   # top-1 %
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]] and "val" not in history[0][0]
    # experiments.py curves prints them side by side: a loss row per run, a val row (in %) for the run that validated
    experiments.main(["curves", str(tmp_path / "a" / "cvlp.pt"), str(tmp_path / "b" / "cvlp.pt"),
                      "--results", str(tmp_path / "results")])
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")}
    b = os.path.relpath(tmp_path / "b" / "cvlp.pt")
    assert rows[b + " val"] == [f"{h['val']:.1f}" for h in history[1]]
    assert rows[b + " loss"] == [f"{h['loss']:.3f}" for h in history[1]] and len(rows) == 1 + 3 + 4   # header, a: loss L_ccl L_dis, b: + val
    with pytest.raises(SystemExit) as e:                          # a file without a curve: one line, exit 2
        experiments.main(["curves", str(tmp_path / "missing" / "cvlp.pt")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_resume_of_the_fc_baseline_across_stops_is_exact(shapes_env, tmp_path):
    args = ["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--device", "cpu", "--clip-weights",
            str(shapes_env["clip"]), "--init", "clip", "--head", "fc", "--batch", "16", "--epochs", "1"]
    lgr.main(args + ["--out", str(tmp_path / "a"), "--stop-after-steps", "3"])
    lgr.main(args + ["--out", str(tmp_path / "b"), "--stop-after-steps", "1"])
    lgr.main(args + ["--out", str(tmp_path / "b"), "--stop-after-steps", "3", "--resume"])
    assert_same_weights(weights(tmp_path / "a" / "fc_clip.pt"), weights(tmp_path / "b" / "fc_clip.pt"))


@pytest.fixture
def stray_signal_fails():
    """While the test runs, a Ctrl-C or SIGTERM that the training loop does not catch fails the test (instead of
    stopping pytest, or killing it)."""
    def stray(signum, _frame):
        raise AssertionError(f"signal {signum} was not caught by the training loop")
    before = {s: signal.signal(s, stray) for s in (signal.SIGINT, signal.SIGTERM)}
    yield stray
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum, code, says", [(signal.SIGINT, 130, "interrupted: saved"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM): saved")],
                         ids=["ctrl_c", "sigterm"])                    # SIGTERM: slurm before preemption, torchrun
def test_ctrl_c_or_sigterm_saves_the_step_exits_128_plus_signal_and_resumes_exactly(
        shapes_env, tmp_path, monkeypatch, capsys, uninterrupted, stray_signal_fails, signum, code, says):
    real, calls = cvlp.cvlp_loss, []

    def loss_then_signal(*a):
        calls.append(1)
        if len(calls) == 3:                                      # in the first of step 2's two batches
            os.kill(os.getpid(), signum)
        return real(*a)

    monkeypatch.setattr(cvlp, "cvlp_loss", loss_then_signal)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, *FOUR_STEPS))
    assert e.value.code == code
    assert [line for line in capsys.readouterr().out.splitlines() if "--resume" in line] == [
        f"{says} {tmp_path / 'cvlp.pt'} at epoch 1, batch 4; continue with --resume"]
    position = torch.load(tmp_path / "cvlp.pt", weights_only=True)["position"]
    assert (position["epoch"], position["batch"]) == (0, 4)     # the step in which the signal came was finished
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is stray_signal_fails   # restored
    monkeypatch.setattr(cvlp, "cvlp_loss", real)
    cvlp.main(cvlp_args(shapes_env, tmp_path, *FOUR_STEPS, "--resume"))
    assert_same_weights(weights(uninterrupted), weights(tmp_path / "cvlp.pt"))


def test_save_every_writes_mid_epoch_checkpoints_and_leaves_the_training_unchanged(shapes_env, tmp_path, monkeypatch,
                                                                                   uninterrupted):
    positions, real = [], engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda path, ckpt: positions.append(
        (ckpt["position"]["epoch"], ckpt["position"]["batch"])) or real(path, ckpt))
    cvlp.main(cvlp_args(shapes_env, tmp_path, *FOUR_STEPS, "--save-every", "1e-7"))   # 6 us: after every step
    assert positions == [(0, 2), (0, 4), (0, 6), (0, 8)]         # steps 1-3 by --save-every, step 4 by the stop
    assert_same_weights(weights(uninterrupted), weights(tmp_path / "cvlp.pt"))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(shapes_env, tmp_path, monkeypatch, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    before = (tmp_path / "cvlp.pt").read_bytes()
    real, calls = cvlp.cvlp_loss, []

    def nan_at_third(*a):
        calls.append(1)
        loss, stats = real(*a)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(cvlp, "cvlp_loss", nan_at_third)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "loss is nan at epoch 1, batch 4" in err and "Traceback" not in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before        # no NaN weights written


def test_gradient_clipping_bounds_the_update(shapes_env, tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: norms.append(m) or real(p, m))
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--clip-grad", "0.5", "--stop-after-steps", "2"))
    assert norms == [0.5, 0.5]


@pytest.mark.parametrize("content, says", [(b"not a checkpoint", "not a readable checkpoint"), (None, "not a readable checkpoint")])
def test_corrupt_or_truncated_checkpoint_is_refused(shapes_env, tmp_path, capsys, content, says):
    if content is None:                                          # truncated: half of a real checkpoint
        cvlp.main(cvlp_args(shapes_env, tmp_path / "src", "--stop-after-steps", "1"))
        full = (tmp_path / "src" / "cvlp.pt").read_bytes()
        content = full[:len(full) // 2]
    (tmp_path / "cvlp.pt").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        anss.main(["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1


def test_resume_refuses_a_checkpoint_of_another_dataset_or_class_count(shapes_env, tmp_path, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    ckpt = torch.load(tmp_path / "cvlp.pt", weights_only=True)
    torch.save({**ckpt, "num_classes": 1000, "data": "imagenet_lt"}, tmp_path / "cvlp.pt")
    before = (tmp_path / "cvlp.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "imagenet_lt" in err and "expects data 'shapes_lt'" in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before


def test_unwritable_out_fails_before_any_work(shapes_env, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, blocker / "run"))
    assert e.value.code == 2 and "cannot write to --out" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(shapes_env, tmp_path, monkeypatch, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    before = (tmp_path / "cvlp.pt").read_bytes()

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", full)               # the disk fills while the checkpoint is written
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume", "--stop-after-steps", "2"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and "intact" in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before


def test_gpu_out_of_memory_suggests_a_smaller_batch_or_accum(shapes_env, tmp_path, monkeypatch, capsys):
    def oom(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cvlp, "cvlp_loss", oom)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch 8 --accum 2" in err and "Traceback" not in err


def test_a_class_without_sentences_is_refused_before_training(shapes_env, tmp_path, monkeypatch, capsys):
    real = cvlp.load_data

    def one_class_speechless(*a, **k):
        d = real(*a, **k)
        d.corpus.sentences[7], d.corpus.source[7], d.corpus.informative[7] = [], [], []
        return d

    monkeypatch.setattr(cvlp, "load_data", one_class_speechless)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 classes have no sentences" in err and not (tmp_path / "cvlp.pt").exists()


def test_progress_in_a_log_file_writes_a_line_every_so_often(monkeypatch, capsys):
    """Not a terminal (nohup, slurm, CI): no bar, but a line per LOG_EVERY seconds with the count, the share done
    and the time left, and a closing line; every item still passes through."""
    clock = iter([0.0, 10.0, 40.0, 50.0, 80.0, 90.0])              # start, then one reading after each item
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.progress(range(4), total=4, desc="cvlp 1/50", unit="batch")
    assert isinstance(bar, progress.LogLines)                      # pytest's stderr is not a terminal
    items = []
    for x in bar:
        items.append(x)
        bar.set_postfix(loss=f"{x:.1f}")
    assert items == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    # items end at 10, 40, 50, 80 s: a line at 40 s (30 s after the start) and at 80 s (40 s after that)
    assert lines == ["cvlp 1/50: 2/4 batch (50%), 0.05 batch/s, 40 s, ~40 s left  loss=1.0",
                     "cvlp 1/50: 4/4 batch (100%), 0.05 batch/s, 80 s, ~0 s left  loss=3.0",
                     "cvlp 1/50: done, 4/4 batch (100%), 0.04 batch/s, 90 s  loss=3.0"]


def test_loader_workers_outlive_a_sigterm_sent_to_the_whole_job():
    """slurm and torchrun send SIGTERM to every process: the loader workers ignore it (the training process saves
    and then stops them), so the batches after it still arrive instead of 'DataLoader worker ... killed'."""
    split = data.Split(np.zeros((6, 8, 8, 3), dtype=np.uint8), np.arange(6) % 3)
    args = argparse.Namespace(loader="pil", workers=1, batch=2, device="cpu")
    loader = data.make_loader(split, images.make_transform(8, (0.5,) * 3, (0.5,) * 3, train=False), args)
    batches = iter(loader)
    first = next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    rest = list(batches)
    assert [y.tolist() for _, y in [first] + rest] == [[0, 1], [2, 0], [1, 2]]
