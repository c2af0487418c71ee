"""The records a run leaves (util/records.py): one JSON line per epoch beside the checkpoint and the same scalars as
TensorBoard events, equal to the epoch lines the training prints; after an interruption and --resume, the records of
an uninterrupted run; the header naming the arguments, the commit and the versions; evaluate.py --checkpoint; and
`python -m tools.status`.

Each run is lgr.py on a tiny ImageNet-LT tree (test_faults.noisy_tree: 3 classes, 6 noise images, batch 2, so an
epoch is 3 steps) with plain CLIP weights and hand-made anchors, so no CVLP or AnSS stage is needed.
"""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import open_clip
import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate
import lgr
from tests.test_faults import noisy_tree
from tools import status
from util import engine, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_anchors(out):
    """anchor_embeds_clip.pt as anss.py --init clip writes it: 3 classes x M = 4 unit embeddings (D = 64), class 0's
    last one padding."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, -1] = False
    embeds = torch.nn.functional.normalize(torch.randn(3, 4, 64, generator=g), dim=-1) * mask[..., None]
    engine.save_checkpoint(os.path.join(out, "anchor_embeds_clip.pt"), {
        "stage": "anss", "data": "imagenet_lt", "backbone": "shapes-tiny", "pretrained": "standin", "num_classes": 3,
        "init": "clip", "select": "anss", "embeds": embeds, "mask": mask})


@pytest.fixture(scope="module")
def world(tiny_clip, tmp_path_factory):
    """The tree, the flags every stage takes here, and lgr.py's (2 epochs of 3 steps; --init clip: from CLIP weights)."""
    tmp = tmp_path_factory.mktemp("records")
    root = noisy_tree(tmp / "imagenet")
    common = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "16",
              "--clip-weights", str(tiny_clip), "--workers", "0", "--device", "cpu"]
    return {"tmp": tmp, "root": root, "clip": tiny_clip, "common": common,
            "train": common + ["--epochs", "2", "--batch", "2", "--sampling", "instance", "--init", "clip"]}


def train(world, out, *extra):
    write_anchors(out)
    lgr.main(world["train"] + ["--out", str(out), *extra])


@pytest.fixture(scope="module")
def uninterrupted(world):
    """A run of 2 whole epochs, and the lines it printed (stdout.txt)."""
    out = world["tmp"] / "uninterrupted"
    os.makedirs(out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(world, out)
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


def without_times(rows):
    """The records without the header lines and what depends on the clock."""
    return [{k: v for k, v in r.items() if k not in ("wall_s", "time", "img_s")} for r in rows if "header" not in r]


def tensorboard_scalars(folder):
    """{tag: [(step, value)]} of the event files in folder, as TensorBoard reads them."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_epoch_records_and_tensorboard_scalars_equal_the_printed_epoch_lines(uninterrupted):
    rows = records.read_records(uninterrupted / "lgr_clip.jsonl")
    assert "header" in rows[0] and [r["epoch"] for r in rows[1:]] == [1, 2]
    printed = [line for line in (uninterrupted / "stdout.txt").read_text().splitlines() if line.startswith("epoch ")]
    assert len(printed) == 2
    for line, r in zip(printed, rows[1:]):
        # "epoch   1/2  loss 3.5642  CE_I 1.2298  CE_T 2.3345  tau 0.0700  lr 1.00e-03  2 img/s  val top-1 33.3
        #  (many nan / medium nan / few 33.3)": every number as the record holds it, at the printed precision
        words = dict(re.findall(r"(loss|CE_I|CE_T|tau|lr) (\S+)", line))
        assert words == {"loss": f"{r['loss']:.4f}", "CE_I": f"{r['CE_I']:.4f}", "CE_T": f"{r['CE_T']:.4f}",
                         "tau": f"{r['tau']:.4f}", "lr": f"{r['lr']:.2e}"}, line
        assert f"  {r['img_s']:.0f} img/s" in line
        val = {k: "nan" if v is None else f"{v:.1f}" for k, v in r["val"].items()}   # no many / medium class: nan
        assert (f"val top-1 {val['overall']} (many {val['many']} / medium {val['medium']} / few {val['few']})"
                in line), line
        assert r["step"] == 3 * r["epoch"]                       # 3 optimiser steps an epoch
    assert rows[2]["lr"] == 0.0                                  # the cosine schedule ends at 0
    # The training's own numbers: the history in the checkpoint holds the same means, bit for bit
    history = torch.load(uninterrupted / "lgr_clip.pt", weights_only=True)["position"]["history"]
    assert [{k: h[k] for k in ("epoch", "loss", "CE_I", "CE_T", "tau")} for h in history] == [
        {k: r[k] for k in ("epoch", "loss", "CE_I", "CE_T", "tau")} for r in rows[1:]]
    assert [h["val"] for h in history] == [r["val"]["overall"] for r in rows[1:]]
    # TensorBoard: the same scalars, one point per epoch, in float32
    events = tensorboard_scalars(uninterrupted / "tb" / "lgr_clip")
    expected = {}
    for r in rows[1:]:
        for tag, value in records.scalars(r).items():
            expected.setdefault(tag, []).append((r["epoch"], pytest.approx(value, rel=1e-6)))
    assert set(expected) == {"loss/total", "loss/CE_I", "loss/CE_T", "lr", "tau", "img_s", "val/overall", "val/few"}
    assert events == expected


def test_an_interrupted_and_resumed_run_writes_the_records_of_an_uninterrupted_one(world, uninterrupted, monkeypatch):
    out = world["tmp"] / "interrupted"
    train(world, out, "--stop-after-steps", "2")                  # stopped in epoch 1, after batch 2 of 3
    real = engine.save_checkpoint

    def killed_at_the_end_of_epoch_1(path, ckpt):              # the record is written, the checkpoint is not
        if path.endswith("lgr_clip.pt") and ckpt["position"]["batch"] == 0:
            raise RuntimeError("killed")
        real(path, ckpt)
    monkeypatch.setattr(engine, "save_checkpoint", killed_at_the_end_of_epoch_1)
    with pytest.raises(RuntimeError, match="killed"):
        train(world, out, "--resume")
    assert [r.get("epoch") for r in without_times(records.read_records(out / "lgr_clip.jsonl"))] == [1]   # left over
    monkeypatch.setattr(engine, "save_checkpoint", real)
    train(world, out, "--resume")                                # from batch 2 of epoch 1 again, to the end
    rows = records.read_records(out / "lgr_clip.jsonl")
    assert without_times(rows) == without_times(records.read_records(uninterrupted / "lgr_clip.jsonl"))
    assert [r["header"].get("resumed") for r in rows if "header" in r] == [   # each resume says where it went on
        None, {"epoch": 0, "batch": 2}, {"epoch": 0, "batch": 2}]
    a, b = (tensorboard_scalars(run / "tb" / "lgr_clip") for run in (uninterrupted, out))
    assert {tag: [p[0] for p in points] for tag, points in b.items()} == {tag: [1, 2] for tag in a}   # each epoch once
    assert b["loss/total"] == a["loss/total"] and b["val/overall"] == a["val/overall"]


def test_a_resume_keeps_the_records_up_to_the_checkpoints_position(tmp_path):
    # A run that wrote a save in epoch 1 (batch 2), epoch 1, a save in epoch 2 (batch 1) and epoch 2; its checkpoint
    # is the end of epoch 1: the later two are dropped (the resumed run writes them again), the header is kept.
    lines = [{"header": {"stage": "lgr"}}, {"epoch": 1, "batch": 2, "loss": 3.0}, {"epoch": 1, "loss": 2.0},
             {"epoch": 2, "batch": 1, "loss": 1.5}, {"epoch": 2, "loss": 1.0}]
    (tmp_path / "lgr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = records.RunRecord(str(tmp_path / "lgr.pt"), {"stage": "lgr"}, resumed_at=(1, 0))
    run.close()
    assert records.read_records(tmp_path / "lgr.jsonl") == lines[:3] + [{"header": {"stage": "lgr",
                                                                                    "resumed": {"epoch": 1, "batch": 0}}}]
    assert tensorboard_scalars(tmp_path / "tb" / "lgr") == {"loss/total": [(1, 2.0)]}   # events written again
    # At batch 2 of epoch 1 only the save of that batch stays; a new run (not resumed) starts a new file
    records.RunRecord(str(tmp_path / "lgr.pt"), {"stage": "lgr"}, resumed_at=(0, 2)).close()
    assert [r.get("batch") for r in records.read_records(tmp_path / "lgr.jsonl") if "header" not in r] == [2]
    records.RunRecord(str(tmp_path / "lgr.pt"), {"stage": "lgr"}).close()
    assert records.read_records(tmp_path / "lgr.jsonl") == [{"header": {"stage": "lgr"}}]
    assert tensorboard_scalars(tmp_path / "tb" / "lgr") == {}


def test_save_every_adds_records_marking_the_batch(world):
    out = world["tmp"] / "save_every"
    train(world, out, "--head", "fc", "--save-every", "1e-7", "--epochs", "1")   # a save after every step
    rows = without_times(records.read_records(out / "fc_clip.jsonl"))
    assert [(r["epoch"], r.get("batch"), r["step"]) for r in rows] == [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, None, 3)]
    assert rows[2]["loss"] == rows[3]["loss"]                     # after the last batch: the epoch's mean so far
    assert "val" in rows[3] and "val" not in rows[2]


def test_without_the_tensorboard_package_one_warning_and_the_json_lines_are_written(world, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # `from torch.utils.tensorboard import` fails
    out = world["tmp"] / "no_tensorboard"
    train(world, out, "--head", "fc", "--epochs", "1")
    assert [line for line in capsys.readouterr().err.splitlines() if "tensorboard" in line] == [
        "warning: tensorboard is not installed: pip install tensorboard; the JSON lines are written anyway"]
    assert [r["epoch"] for r in records.read_records(out / "fc_clip.jsonl")[1:]] == [1] and not (out / "tb").exists()
    monkeypatch.undo()
    train(world, world["tmp"] / "tensorboard_off", "--head", "fc", "--epochs", "1", "--no-tensorboard")
    assert "tensorboard" not in capsys.readouterr().err and not (world["tmp"] / "tensorboard_off" / "tb").exists()


def git(folder, *argv):
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_header_names_the_arguments_the_commit_and_the_versions(uninterrupted, tmp_path):
    header = records.read_records(uninterrupted / "lgr_clip.jsonl")[0]["header"]
    assert header["args"]["epochs"] == 2 and header["args"]["init"] == "clip" and header["args"]["resume"] is False
    assert header["git"]["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert (header["torch"], header["torchvision"], header["open_clip"]) == (
        torch.__version__, torchvision.__version__, open_clip.__version__)
    assert (header["stage"], header["checkpoint"], header["device"], header["world_size"]) == ("lgr", "lgr_clip.pt",
                                                                                              "cpu", 1)
    # The dirty flag, in a repository of one file; and no commit at all outside a git checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "a")
    assert records.git_state(tmp_path) == {"commit": git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert records.git_state(tmp_path)["dirty"] is True
    assert records.git_state(tmp_path / "not_a_checkout") is None


def test_evaluate_reads_the_checkpoint_asked_for_and_names_it(world, uninterrupted, capsys):
    common = world["common"] + ["--out", str(uninterrupted)]
    capsys.readouterr()
    epochs = {}
    for choice in ("best", "last"):
        evaluate.main(common + ["--checkpoint", choice])
        report = json.loads((uninterrupted / "eval.json").read_text())
        [read] = report["checkpoints"]
        epochs[choice] = read["epoch"]
        assert report["checkpoint"] == choice and read["path"].endswith({"best": "lgr_clip_best.pt",
                                                                          "last": "lgr_clip.pt"}[choice])
        title = (f"imagenet_lt shapes-tiny, test split, top-1 (%), checkpoint {choice}: "
                 f"{os.path.basename(read['path'])} epoch {read['epoch']}/2")
        assert title in capsys.readouterr().out.splitlines()
        assert report["header"]["git"]["commit"] == git(ROOT, "rev-parse", "HEAD")
        assert report["header"]["torch"] == torch.__version__ and report["header"]["args"]["checkpoint"] == choice
    val = [r["val"]["overall"] for r in records.read_records(uninterrupted / "lgr_clip.jsonl")[1:]]
    assert epochs == {"best": 1 + val.index(max(val)), "last": 2}   # best: the first epoch of the highest val top-1


def test_status_shows_each_stage_the_eval_table_and_the_commands_that_go_on(world, uninterrupted, capsys):
    out = world["tmp"] / "status"
    os.makedirs(out)
    for f in ("lgr_clip.pt", "lgr_clip_best.pt", "lgr_clip.jsonl"):
        (out / f).write_bytes((uninterrupted / f).read_bytes())
    train(world, out, "--head", "fc", "--stop-after-steps", "4")   # the baseline, stopped in its second epoch
    evaluate.main(world["common"] + ["--out", str(out)])
    assert str(out) in status.run_folders(str(world["tmp"]))     # found without naming it; tb/ folders are not runs
    assert not [f for f in status.run_folders(str(world["tmp"])) if "tb" in f.split(os.sep)]
    capsys.readouterr()
    status.main([str(out)])
    printed = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line for line in printed if line.startswith("  ") and line.split()}
    val = records.read_records(out / "lgr_clip.jsonl")[-1]["val"]["overall"]
    assert re.fullmatch(rf"  lgr_clip\.pt +done: 2/2 epochs in \d+ s, written \d+ s ago; val {val:.1f} \(many - / medium - / "
                        rf"few {val:.1f}\), best \S+ at epoch \d \(lgr_clip_best\.pt\)", lines["lgr_clip.pt"])
    assert re.fullmatch(r"  fc_clip\.pt +unfinished: 1/2 epochs and 1 batch in \d+ s, written \d+ s ago; val .*", lines["fc_clip.pt"])
    assert lines["cvlp.pt"].split(": ", 1)[1] == (
        f"python cvlp.py --data imagenet_lt --backbone shapes-tiny --data-root {world['root']} --clip-weights "
        f"{world['clip']} --image-size 16 --workers 0 --out {out}")    # the run's flags, from fc_clip.pt's arguments
    assert lines["cvlp.pt"].split()[1:3] == ["missing,", "next:"] and lines["lgr.pt"].split()[1] == "missing:"
    assert lines["eval.json"].startswith("  eval.json              done: test split, commit ")
    title = [line for line in printed if line.startswith("  imagenet_lt shapes-tiny, test split")]
    assert title == ["  imagenet_lt shapes-tiny, test split, top-1 (%), checkpoint last: fc_clip.pt epoch 1/2 and 1 "
                     "batch, lgr_clip.pt epoch 2/2"] and "Zero-Shot" in lines
    # The command that continues the stopped run is its own: run it, and the baseline finishes
    [resume] = [line.split("continue: ")[1] for line in printed if "continue: " in line]
    argv = shlex.split(resume)
    assert argv[:2] == ["python", "lgr.py"] and argv[-1] == "--resume"
    lgr.main(argv[2:])
    assert torch.load(out / "fc_clip.pt", weights_only=True, mmap=True)["position"]["epoch"] == 2
    status.main([str(out)])                                      # now newer than eval.json, which says so
    assert "older than fc_clip.pt: rerun python evaluate.py --data imagenet_lt" in capsys.readouterr().out
