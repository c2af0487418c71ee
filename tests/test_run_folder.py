"""A finished run folder survives what a new user types after the demo: every mistyped or repeated command either
does what it should or stops with one line (exit status 2), and no earlier file of the folder changes (compared by
SHA-256 of every file, taken before the command). Also: a checkpoint is replaced only with --overwrite, which keeps
the old run's record readable; a file made from another state of cvlp.pt or of the anchors is never read beside the
new one (util/run_folder.py); a stage removes the temporary files that killed processes of this machine left.

Each test works on a copy of one finished tiny run (the `finished` fixture: a 3-class ImageNet-LT tree, the shapes-tiny
CLIP at 16 px, one epoch of 3 steps per training stage), run in-process; one case runs as a subprocess to show the
exit status and stderr exactly as a shell sees them.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import anss
import cvlp
import evaluate
import lgr
import predict
from tests.test_data import make_imagenet_tree, write
from util import engine, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hashes(folder):
    """{path relative to folder: SHA-256} of every file under it."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                found[os.path.relpath(os.path.join(dirpath, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def state_by_hand(path):
    """The state hash of a checkpoint as run_folder.state_hash documents it, computed here on its own: SHA-256 over
    every weight in name order ("model.<name> <dtype> <shape>" and a newline, then its bytes), then the position."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name in sorted(ckpt["model"]):
        t = ckpt["model"][name].contiguous()
        h.update(f"model.{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(f"position {ckpt['position']['epoch']} {ckpt['position']['batch']}".encode())
    return h.hexdigest()


def call(main, argv):
    """Run a stage's main in-process: its exit status (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def finished(tiny_clip, tmp_path_factory):
    """The folder the README's first command leaves, at a tiny size: cvlp.pt, anchors.json and anchor_embeds.pt,
    lgr.pt, fc_clip.pt (each with its record and best epoch) and eval.json; and the command that made each."""
    tmp = tmp_path_factory.mktemp("finished")
    root = make_imagenet_tree(tmp / "imagenet")
    write(root / "wiki/desc_2.txt", "The great white shark is a large fish.\n")   # every class has text: no warning
    out = tmp / "run"
    common = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "16",
              "--clip-weights", str(tiny_clip), "--workers", "0", "--device", "cpu", "--out", str(out)]
    train = ["--epochs", "1", "--batch", "2", "--sampling", "instance"]
    commands = {"cvlp": (cvlp.main, common + train + ["--text", "prompt"]),
                "anss": (anss.main, common + ["--M", "4", "--text", "prompt"]),
                "lgr": (lgr.main, common + train),
                "fc_clip": (lgr.main, common + train + ["--init", "clip", "--head", "fc"]),
                "evaluate": (evaluate.main, common)}
    for main, argv in commands.values():
        assert call(main, argv) == 0
    return {"tmp": tmp, "root": root, "clip": tiny_clip, "out": out, "commands": commands}


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished folder, and the commands that made it pointed at the copy."""
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    to_copy = lambda argv: [str(out) if a == str(finished["out"]) else a for a in argv]
    return {"out": out, "tmp": tmp_path, "root": finished["root"], "clip": finished["clip"],
            "commands": {k: (main, to_copy(argv)) for k, (main, argv) in finished["commands"].items()}}


def command(run, name, *extra):
    main, argv = run["commands"][name]
    return main, argv + list(extra)


# ----------------------------------------------------------------------------------------------
# The commands a new user tried after the demo: each one line and exit status 2, nothing changed


def table_cases(run):
    """(main, argv, what the one error line says) of each mistaken command, as a new user typed it beside a finished
    run; the run's own flags (data root, tiny backbone, --out) are kept where the command names that run."""
    tmp, out = run["tmp"], run["out"]
    (tmp / "empty").mkdir()
    return {
        "cvlp without its data": (cvlp.main, ["--data", "imagenet_lt"],
                                  r"data root data/imagenet not found; expected ImageNet_LT_\{train,val,test\}\.txt"),
        "lgr before cvlp": (*command(run, "lgr", "--out", str(tmp / "new")),
                            rf"{tmp}/new/cvlp\.pt not found; run `python cvlp\.py --data imagenet_lt` first"),
        "anss before cvlp": (*command(run, "anss", "--out", str(tmp / "new")),
                             rf"{tmp}/new/cvlp\.pt not found; run `python cvlp\.py --data imagenet_lt` first"),
        "evaluate a released file that is not there": (
            *command(run, "evaluate", "--released", str(tmp / "checkpoint.pth")), r"--released \S+ not found$"),
        "predict an image that is not there": (predict.main, [str(tmp / "photo.jpg"), "--run", str(out), "--device",
                                                              "cpu"], r"photo\.jpg: no such image file$"),
        "places_lt in an empty folder": (cvlp.main, ["--data", "places_lt", "--data-root", str(tmp / "empty")],
                                         r"data root \S+/empty is empty; expected Places_LT_"),
        "a dataset that does not exist": (cvlp.main, ["--data", "nosuch"], r"unknown --data 'nosuch'; choose one of: "),
        "cvlp --batch 0 --epochs 1": (*command(run, "cvlp", "--batch", "0", "--epochs", "1"),
                                      r"argument --batch: 0 is out of range: an integer >= 1$"),
        "cvlp --batch -5": (*command(run, "cvlp", "--batch", "-5"),
                            r"argument --batch: -5 is out of range: an integer >= 1$"),
        "cvlp --lr -1": (*command(run, "cvlp", "--lr", "-1"), r"argument --lr: -1 is out of range: a number > 0$"),
        "cvlp --lam 2": (*command(run, "cvlp", "--lam", "2"),
                         r"argument --lam: 2 is out of range: a number in \[0, 1\]$"),
        "cvlp --epochs -1": (*command(run, "cvlp", "--epochs", "-1"),
                             r"argument --epochs: -1 is out of range: an integer >= 1$"),
        "evaluate --knn-k 0": (*command(run, "evaluate", "--knn-k", "0"),
                               r"argument --knn-k: 0 is out of range: an integer >= 1$"),
        "cvlp --epochs 2 over the finished cvlp.pt": (
            *command(run, "cvlp", "--epochs", "2"),
            rf"{out}/cvlp\.pt holds a finished run made otherwise \(--epochs 2 here, 1 there\): continue it with "
            r"--resume, write to another --out, or replace it with --overwrite$"),
        "lgr --lr 0.01 over the finished lgr.pt": (
            *command(run, "lgr", "--lr", "0.01"),
            rf"{out}/lgr\.pt holds a finished run made otherwise \(--lr 0\.01 here, 0\.001 there\): continue it with "
            r"--resume, write to another --out, or replace it with --overwrite$"),
    }


CASES = ["cvlp without its data", "lgr before cvlp", "anss before cvlp", "evaluate a released file that is not there",
         "predict an image that is not there", "places_lt in an empty folder", "a dataset that does not exist",
         "cvlp --batch 0 --epochs 1", "cvlp --batch -5", "cvlp --lr -1", "cvlp --lam 2", "cvlp --epochs -1",
         "evaluate --knn-k 0", "cvlp --epochs 2 over the finished cvlp.pt", "lgr --lr 0.01 over the finished lgr.pt"]


@pytest.mark.parametrize("case", CASES)
def test_a_mistaken_command_is_one_line_and_changes_nothing_in_the_run_folder(run, case, capsys, monkeypatch):
    monkeypatch.chdir(run["tmp"])                                # the default data/ and runs/ folders are here
    main, argv, says = table_cases(run)[case]
    before = hashes(run["out"])
    assert call(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(says, err.strip()), err
    assert hashes(run["out"]) == before


def test_a_bad_number_stops_the_real_command_before_it_writes_anything(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cvlp.py"), "--batch", "-5"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "error: argument --batch: -5 is out of range: an integer >= 1\n"
    assert os.listdir(tmp_path) == []                            # no run folder made


def test_the_same_commands_again_say_each_file_is_done_and_change_nothing(run, capsys):
    before = hashes(run["out"])
    for name, says in (("cvlp", "cvlp.pt is finished (1/1 epochs) and was made with these settings: nothing to do"),
                       ("anss", "anchor_embeds.pt is up to date (made from cvlp.pt as it is now, with these settings): "
                                "nothing to do"),
                       ("lgr", "lgr.pt is finished (1/1 epochs) and was made with these settings: nothing to do"),
                       ("fc_clip", "fc_clip.pt is finished (1/1 epochs) and was made with these settings: nothing to "
                                   "do")):
        assert call(*command(run, name)) == 0
        out, err = capsys.readouterr()
        assert out == f"{run['out']}/{says} (--overwrite {'makes it' if name == 'anss' else 'trains it'} again)\n"
        assert err == ""
        assert hashes(run["out"]) == before
    assert call(*command(run, "evaluate")) == 0                  # eval.json may be made again; nothing else
    after = hashes(run["out"])
    assert {k: v for k, v in after.items() if k != "eval.json"} == {k: v for k, v in before.items() if k != "eval.json"}


# ----------------------------------------------------------------------------------------------
# A replaced cvlp.pt: kept record, no mixing of states (the table's last command)


def test_a_replaced_cvlp_pt_is_never_read_beside_files_made_from_the_old_one(run, capsys):
    out = run["out"]
    before, old_state = hashes(out), state_by_hand(out / "cvlp.pt")
    assert torch.load(out / "anchor_embeds.pt", weights_only=True)["made_from"] == {"cvlp.pt": old_state}
    assert torch.load(out / "lgr.pt", weights_only=True)["made_from"] == {
        "cvlp.pt": old_state, "anchor_embeds.pt": anchors_state_by_hand(out / "anchor_embeds.pt")}

    # --overwrite: the new run trains; the old run's record is kept, byte for byte, in replaced/
    assert call(*command(run, "cvlp", "--lr", "1e-4", "--overwrite")) == 0
    moved = sorted(os.listdir(out / "replaced"))
    assert len(moved) == 1 and re.fullmatch(r"cvlp-\d{8}-\d{6}\.jsonl", moved[0])
    assert hashes(out / "replaced") == {moved[0]: before["cvlp.jsonl"]}
    assert records.read_records(out / "replaced" / moved[0])[0]["header"]["args"]["lr"] == 5e-5   # readable
    new_state = state_by_hand(out / "cvlp.pt")
    assert new_state != old_state
    after = hashes(out)
    changed = {k for k in set(after) | set(before) if after.get(k) != before.get(k)}
    assert {k for k in changed if not k.startswith(("tb/cvlp/", "replaced/"))} == {"cvlp.pt", "cvlp.jsonl"}
    capsys.readouterr()

    # evaluate.py and lgr.py refuse the anchors made from the old cvlp.pt, naming the command that makes them again
    stale = (f"error: {out}/anchor_embeds.pt is stale: it was made from another cvlp.pt (state {old_state[:10]}, the "
             f"one there now is {new_state[:10]}); make it again: python anss.py --data imagenet_lt --backbone "
             f"shapes-tiny --data-root {run['root']} --clip-weights {run['clip']} --image-size 16 --workers 0 --out "
             f"{out} --M 4 --text prompt\n")
    for name in ("evaluate", "lgr"):
        now = hashes(out)
        assert call(*command(run, name)) == 2
        assert capsys.readouterr().err == stale
        assert hashes(out) == now                                # eval.json and lgr.pt as they were
    assert call(predict.main, [str(run["root"] / "val/v0.JPEG"), "--run", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == stale

    # the anchors made again from the new cvlp.pt: now lgr.pt is the stale file, and --resume may not mix the two
    assert call(*command(run, "anss")) == 0
    assert torch.load(out / "anchor_embeds.pt", weights_only=True)["made_from"] == {"cvlp.pt": new_state}
    assert json.loads((out / "anchors.json").read_text())["made_from"] == {"cvlp.pt": new_state}
    capsys.readouterr()
    now = hashes(out)
    assert call(*command(run, "lgr")) == 2
    assert capsys.readouterr().err == (
        f"error: {out}/lgr.pt holds a finished run made otherwise (made from another anchor_embeds.pt; made from "
        f"another cvlp.pt): continue it with --resume, write to another --out, or replace it with --overwrite\n")
    assert call(*command(run, "lgr", "--resume")) == 2
    assert capsys.readouterr().err == (
        f"error: {out}/lgr.pt was made from another anchor_embeds.pt and cvlp.pt than {out} holds now: --resume would "
        f"continue it on other inputs; train it again with --overwrite instead of --resume\n")
    assert call(*command(run, "evaluate")) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out}/lgr.pt is stale: it was made from another cvlp.pt (state {old_state[:10]}, the one "
                   f"there now is {new_state[:10]}); make it again: python lgr.py --data imagenet_lt --overwrite "
                   f"--backbone shapes-tiny --data-root {run['root']} --clip-weights {run['clip']} --image-size 16 "
                   f"--workers 0 --out {out} --epochs 1 --batch 2 --sampling instance\n")
    assert hashes(out) == now

    # lgr.py --overwrite: the folder is of one state again; eval.json names the state of each file it read
    assert call(*command(run, "lgr", "--overwrite")) == 0
    assert call(*command(run, "evaluate")) == 0
    made_from = json.loads((out / "eval.json").read_text())["made_from"]
    assert made_from == {"lgr.pt": state_by_hand(out / "lgr.pt"), "fc_clip.pt": state_by_hand(out / "fc_clip.pt"),
                         "cvlp.pt": new_state, "anchor_embeds.pt": anchors_state_by_hand(out / "anchor_embeds.pt")}


def anchors_state_by_hand(path):
    """anss.py's state hash, by hand: "embeds", then "mask" (name order within each), each as state_by_hand."""
    a = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name in ("embeds", "mask"):
        t = a[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_an_unfinished_checkpoint_is_refused_and_resumes_to_the_finished_state(finished, tmp_path, capsys):
    main, argv = finished["commands"]["cvlp"]
    argv = [str(tmp_path) if a == str(finished["out"]) else a for a in argv]
    assert call(main, argv + ["--stop-after-steps", "1"]) == 0
    before = hashes(tmp_path)
    capsys.readouterr()
    assert call(main, argv) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/cvlp.pt holds an unfinished run (epoch 1/1, batch 1): "
                                       f"continue it with --resume, write to another --out, or replace it with "
                                       f"--overwrite\n")
    assert call(main, argv + ["--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert hashes(tmp_path) == before
    assert call(main, argv + ["--resume"]) == 0                  # exact resume: the uninterrupted run's state
    assert state_by_hand(tmp_path / "cvlp.pt") == state_by_hand(finished["out"] / "cvlp.pt")
    assert torch.load(tmp_path / "cvlp.pt", weights_only=True)["state_hash"] == state_by_hand(tmp_path / "cvlp.pt")


# ----------------------------------------------------------------------------------------------
# Temporary files left by killed processes


def dead_pid():
    """The id of a process of this machine that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stage_removes_only_the_stale_temporary_files_of_this_machine(run, capsys):
    host, dead = socket.gethostname(), dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = {f"cvlp.pt.tmp-{host}-{dead}": b"half a checkpoint",                # removed: this machine's, ended
                f"lgr.pt.tmp-{host}-{alive.pid}": b"a checkpoint being written",   # kept: its process runs
                f"lgr.pt.tmp-node-7-{dead}": b"another machine's",                # kept: another host (torchrun)
                f"cvlp.pt.tmp{dead}": b"no host in the name",                     # kept: whose it is is unknown
                "notes.tmp-by-hand": b"not a temporary name"}                       # kept
        for name, content in left.items():
            (run["out"] / name).write_bytes(content)
        before = hashes(run["out"])
        assert call(*command(run, "anss")) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == (f"removed 1 temporary file (0.0 MiB) left in {run['out']} by stopped processes of this "
                          f"machine: cvlp.pt.tmp-{host}-{dead}")
        assert hashes(run["out"]) == {k: v for k, v in before.items() if k != f"cvlp.pt.tmp-{host}-{dead}"}
    finally:
        alive.kill()
        alive.wait()


def test_a_process_killed_while_writing_leaves_a_temporary_file_that_the_next_stage_removes(tmp_path, capsys):
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom util.files import atomic_write\n"
                               "def half(f):\n    f.write(b'half'); f.flush(); print('writing', flush=True); "
                               "time.sleep(60)\natomic_write(sys.argv[1], half)", str(tmp_path / "cvlp.pt")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()                                                # SIGKILL: no handler, no clean-up
    writer.wait()
    name = f"cvlp.pt.tmp-{socket.gethostname()}-{writer.pid}"
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_bytes() == b"half"
    engine.prepare_out(Namespace(out=str(tmp_path)))             # what every stage does first
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().out == (f"removed 1 temporary file (0.0 MiB) left in {tmp_path} by stopped processes "
                                       f"of this machine: {name}\n")
