"""What a run leaves for a person to read, plot and compare, beside its checkpoint <out>/<stem>.pt:

    <out>/<stem>.jsonl        one JSON object a line: {"header": ...} (what made the run), then one record per epoch
                              (and per --save-every save), appended and flushed as the run goes: `tail -f` it
    <out>/tb/<stem>/          the epoch records' scalars as TensorBoard events: `tensorboard --logdir runs`

A record: {"epoch", "step" (optimiser steps so far), the loss terms, "lr", "tau" (where the stage has one), "img_s",
"wall_s" (training seconds so far, over resumes), "time" (unix seconds), "val": {"overall", "many", "medium", "few"}
(%, where measured)}; a --save-every save adds {"epoch", "batch", ...} with the epoch's means so far. The header
(run_header) names the arguments, the git commit, the versions, the device and the world size; anss.py and
evaluate.py put the same header into anchors.json and eval.json. engine.Training writes the records (rank 0 alone
under torchrun); tools/status.py and `experiments.py curves` read them.
"""
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import subprocess
import time

import open_clip
import torch
import torchvision

from util.errors import DiskError, warn
from util.files import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the code's own folder: its git checkout


def git_state(folder=ROOT):
    """{"commit": the checked-out commit, "dirty": whether tracked or new files differ from it}, or None when the
    code is not a git checkout (or git is not installed)."""
    def git(*argv):
        return subprocess.run(["git", "-C", folder, *argv], capture_output=True, text=True, timeout=30)
    try:
        head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_name(device):
    """The device in words: "NVIDIA H200" for a CUDA device; for the CPU its model name as /proc/cpuinfo gives it
    (Linux), else the processor (or machine) platform names."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def run_header(args, stage):
    """What made a stage's output: the arguments (a dict), the code (git commit and dirty flag, None outside a git
    checkout), the versions of python, torch, torchvision and open_clip, the device and the world size, the date."""
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"stage": stage, "args": json_safe(vars(args)), "git": git_state(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "device": str(args.device),
            "device_name": device_name(args.device), "world_size": world_size,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def json_safe(value):
    """value with NaN and infinity as None (JSON has neither), tensors as numbers, anything else unknown as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# Reading


def records_path(checkpoint):
    """<out>/<stem>.jsonl beside <out>/<stem>.pt."""
    return os.path.splitext(checkpoint)[0] + ".jsonl"


def tensorboard_dir(checkpoint):
    """<out>/tb/<stem>/: one folder per checkpoint, so `tensorboard --logdir runs` shows every run and stage."""
    folder, name = os.path.split(checkpoint)
    return os.path.join(folder, "tb", os.path.splitext(name)[0])


def read_records(path):
    """Every object of a .jsonl file, in order. A last line cut short by a crash is left out."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def epoch_records(records):
    """The end-of-epoch records (no header, no mid-epoch save)."""
    return [r for r in records if "header" not in r and "batch" not in r]


def position(record):
    """Where in the run a record was written, as a checkpoint's position counts it: (epochs done, batches of the
    next epoch). An end-of-epoch record of epoch e: (e, 0); a save in epoch e after b batches: (e - 1, b)."""
    return (record["epoch"] - 1, record["batch"]) if "batch" in record else (record["epoch"], 0)


def scalars(record):
    """An epoch record's TensorBoard scalars, {tag: value}: "loss/total" and "loss/<term>" for the losses, "lr",
    "tau", "img_s", "val/<split>"; "epoch", "step" and the times are the axes, not scalars."""
    out = {}
    for k, v in record.items():
        if k == "val":
            out.update({f"val/{split}": s for split, s in v.items() if s is not None})
        elif k in ("lr", "tau", "img_s"):
            out[k] = v
        elif k not in ("epoch", "step", "batch", "wall_s", "time") and v is not None:
            out["loss/total" if k == "loss" else f"loss/{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Writing


class RunRecord:
    """A training run's <stem>.jsonl and TensorBoard events. resumed_at None: a new run, a new file (and the old
    event files of this checkpoint removed). resumed_at (epochs done, batch) from the checkpoint: the file keeps
    its records up to that position (a record written after the checkpoint, before a crash, would otherwise be
    there twice), gets one more header line marking the resume, and the TensorBoard events are written again
    from the kept records, so both show every epoch once. add() appends and flushes: a kill loses no record."""

    def __init__(self, checkpoint, header, resumed_at=None, tensorboard=True):
        self.path = records_path(checkpoint)
        kept = []
        if resumed_at is not None and os.path.exists(self.path):
            kept = [r for r in read_records(self.path) if "header" in r or position(r) <= tuple(resumed_at)]
            header = {**header, "resumed": {"epoch": resumed_at[0], "batch": resumed_at[1]}}
        try:                                                       # rewritten whole: a crash leaves the old file
            atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept + [{"header": header}]),
                         "w")
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise DiskError(f"cannot write {self.path} ({e.strerror}); free disk space or pass another --out")
        self.writer = tensorboard_writer(tensorboard_dir(checkpoint)) if tensorboard else None
        for r in epoch_records(kept):                              # the events again, as the kept records hold them
            self.add_scalars(r)

    def add(self, at, sched, means, wall_s, val=None):
        """Append one record to the .jsonl and, an epoch's, to TensorBoard: at {"epoch"} or {"epoch", "batch"}; the
        step and lr from the schedule; the epoch's mean losses `means` with "img_s" and, where the stage has one,
        "tau"; wall_s; val {"overall", "many", "medium", "few"} or None. NaN is written as null."""
        losses = {k: v for k, v in means.items() if k not in ("tau", "img_s")}
        tau = {"tau": means["tau"]} if "tau" in means else {}
        record = json_safe({**at, "step": sched.last_epoch, **losses, "lr": sched.get_last_lr()[0], **tau,
                            "img_s": means["img_s"], "wall_s": wall_s, "time": time.time(),
                            **({"val": val} if val is not None else {})})
        self.write_line(record)
        if "batch" not in record:
            self.add_scalars(record)

    def write_line(self, record):
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise DiskError(f"cannot write {self.path} ({e.strerror}); free disk space or pass another --out "
                            f"(the checkpoint is intact; --resume writes the record again)")

    def add_scalars(self, record):
        if self.writer is not None:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, record["epoch"], walltime=record.get("time"))
            self.writer.flush()

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def run_records(checkpoint, args, stage, resumed_at=None):
    """The RunRecord of a training run (rank 0; None on the other ranks under torchrun), closed at the end. Its
    header: run_header and the checkpoint's name; --tensorboard / --no-tensorboard chooses the events."""
    record = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        header = {**run_header(args, stage), "checkpoint": os.path.basename(checkpoint)}
        record = RunRecord(checkpoint, header, resumed_at, args.tensorboard)
    try:
        yield record
    finally:
        if record is not None:
            record.close()


def tensorboard_writer(folder):
    """A SummaryWriter on `folder` after removing the event files there (RunRecord writes them all again), or None
    with one warning when the tensorboard package is missing: the JSON lines are written either way."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("tensorboard is not installed: pip install tensorboard; the JSON lines are written anyway")
        return None
    for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        os.remove(old)
    return SummaryWriter(folder)
