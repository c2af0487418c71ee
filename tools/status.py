"""One look at a run folder: each stage's file, the epochs done, the last and best val top-1, whether a run stopped
part-way (and the command that continues it), the eval table, and what is still missing with the command that makes
it. The first thing to run after a night of training, or after a preemption.

    python -m tools.status                          # every run folder under runs/
    python -m tools.status runs/imagenet_lt/RN50    # these run folders

Reads the .jsonl records (util/records.py) and only the small entries of the checkpoints (torch.load with mmap: the
weights stay on disk). The commands repeat the run's own flags (those that differ from the defaults), from the
arguments its checkpoints and records keep (util/run_folder.command, which also names the command that makes a stale
file again).
"""
import argparse
import json
import os
import time

from data import DATASETS, add_common_args
from evaluate import format_table, table_title
from util import flags
from util.engine import best_path, run_stage
from util.errors import DataError
from util.records import epoch_records, read_records, records_path
from util.run_folder import command, small_entries

# The run folder's files in the pipeline's order: (file, the script that makes it, the flags that name this file).
PIPELINE = [("cvlp.pt", "cvlp", []), ("anchor_embeds.pt", "anss", []), ("lgr.pt", "lgr", []),
            ("fc_clip.pt", "lgr", ["--init", "clip", "--head", "fc"]), ("eval.json", "evaluate", [])]
# Files of the ablation rows (Table 4 #2, #5), shown when they are there.
OPTIONAL = [("anchor_embeds_clip.pt", "anss", ["--init", "clip"]), ("lgr_clip.pt", "lgr", ["--init", "clip"]),
            ("fc.pt", "lgr", ["--head", "fc"])]
COMMON = set(vars(add_common_args(argparse.ArgumentParser()).parse_args([])))   # --data, --out, ... every stage takes


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR: the state of run folders at a glance")
    p.add_argument("folders", nargs="*", metavar="RUN_FOLDER", help="default: every run folder under runs/")
    return p.parse_args(argv)


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    folders = args.folders or run_folders("runs")
    if not folders:
        print("no run folders under runs/ yet: start with `python cvlp.py` (README.md)")
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError(f"run folder {folder} not found")
        print("\n".join(folder_status(folder)) + "\n")


def run_folders(root):
    """Every folder under root that holds a file of the pipeline (tb/ folders aside), in name order."""
    names = {f for f, _, _ in PIPELINE + OPTIONAL} | {records_path(f) for f, _, _ in PIPELINE + OPTIONAL}
    return sorted(d for d, subdirs, files in os.walk(root) if names & set(files) and "tb" not in d.split(os.sep))


def folder_status(folder):
    """The lines printed for one run folder."""
    lines, table, saved, first = [folder], [], known_args(folder), True
    for name, script, flags in PIPELINE + OPTIONAL:
        path = os.path.join(folder, name)
        if not os.path.exists(path) and (name, script, flags) in OPTIONAL:
            continue
        if not os.path.exists(path):
            make = command(script, saved, flags, keys=COMMON | ({"text"} if script == "anss" else set()))
            lines.append(f"  {name:<23}missing{', next' if first else ''}: {make}")
            first = False
        elif name == "eval.json":
            status, table = eval_status(folder, saved)
            lines += status
        elif script == "anss":
            a = small_entries(path)
            lines.append(f"  {name:<23}done: {a.get('select', 'anss')}, M {a['mask'].shape[1]}, {a['num_classes']} "
                         f"classes, {age(path)}" if a else f"  {name:<23}unreadable: delete it and rerun python anss.py")
        else:
            lines += training_status(path, script)
    return lines + table


def training_status(path, script):
    """A trained checkpoint's lines: epochs done, last and best val top-1, and the command that continues it."""
    name, ckpt = os.path.basename(path), small_entries(path)
    if not ckpt or "position" not in ckpt:
        return [f"  {name:<23}unreadable: delete it and rerun python {script}.py"]
    pos, saved, total = ckpt["position"], ckpt["args"], ckpt["args"]["epochs"]
    done = pos["epoch"] == total
    state = (f"done: {total}/{total} epochs" if done else f"unfinished: {pos['epoch']}/{total} epochs" +
             (f" and {pos['batch']} batch{'es' * (pos['batch'] > 1)}" if pos["batch"] else ""))
    trained = f" in {duration(pos['wall_s'])}" if pos.get("wall_s") else ""     # training time, over resumes
    lines = [f"  {name:<23}{state}{trained}, {age(path, records_path(path))}{val_summary(path, pos)}"]
    if not done:                                                 # stopped, or still running (see its age)
        world_size = (run_headers(path) or [{}])[-1].get("world_size", 1)
        lines.append(f"  {'':<23}continue: {command(script, saved, resume=True, world_size=world_size)}")
    return lines


def val_summary(path, pos):
    """"; val 66.0 (many 80.1 / medium 63.2 / few 40.3), best 67.2 at epoch 8 (lgr_best.pt)", from the .jsonl
    records, else from the checkpoint's history; "" without a val score."""
    if os.path.exists(records_path(path)):
        scored = [(r["epoch"], r["val"]) for r in epoch_records(read_records(records_path(path))) if r.get("val")]
    else:
        scored = [(h["epoch"], {"overall": h["val"]}) for h in pos.get("history", []) if "val" in h]
    if not scored:
        return ""
    last = scored[-1][1]
    best_epoch, best = max(scored, key=lambda s: s[1]["overall"])
    split = (" (" + " / ".join(f"{k} {cell(last.get(k))}" for k in ("many", "medium", "few")) + ")"
             if "many" in last else "")
    return (f"; val {cell(last['overall'])}{split}, best {cell(best['overall'])} at epoch {best_epoch} "
            f"({os.path.basename(best_path(path))})")


def eval_status(folder, saved):
    """eval.json's lines (what made it, whether a checkpoint is newer than it) and its table's."""
    path = os.path.join(folder, "eval.json")
    with open(path) as f:
        report = json.load(f)
    header = report.get("header") or {}
    git = header.get("git") or {}
    made = f"commit {git['commit'][:7]}{' (dirty)' if git.get('dirty') else ''}, " if git else ""
    lines = [f"  {'eval.json':<23}done: {report['split']} split, {made}{age(path)}"]
    newer = [f for f, _, _ in PIPELINE + OPTIONAL if f.endswith(".pt") and os.path.exists(os.path.join(folder, f))
             and os.path.getmtime(os.path.join(folder, f)) > os.path.getmtime(path)]
    if newer:
        lines.append(f"  {'':<23}older than {', '.join(newer)}: rerun {command('evaluate', saved, keys=COMMON)}")
    table = format_table(report["results"], table_title(report))
    return lines, [""] + ["  " + line for line in table.splitlines()]


def known_args(folder):
    """A run's arguments from its files (the first checkpoint or record header found), for the commands; from the
    folder's name runs/<data>/<backbone> when no stage has written anything yet."""
    for name, _, _ in PIPELINE + OPTIONAL:
        path = os.path.join(folder, name)
        ckpt = small_entries(path) if name.endswith(".pt") and os.path.exists(path) else None
        if ckpt and "args" in ckpt:
            return ckpt["args"]
        headers = run_headers(path)
        if headers:
            return headers[0]["args"]
    data, backbone = os.path.basename(os.path.dirname(os.path.abspath(folder))), os.path.basename(folder)
    return {"data": data if data in DATASETS else "shapes_lt", "backbone": backbone, "out": folder}


def run_headers(path):
    """The header records of a checkpoint's .jsonl (or eval.json's header), oldest first; [] when there are none."""
    if path.endswith("eval.json"):
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [h for h in [json.load(f).get("header")] if h]
    records = records_path(path)
    return [r["header"] for r in read_records(records) if "header" in r] if os.path.exists(records) else []


def cell(value):
    return "-" if value is None else f"{value:.1f}"


def age(*paths):
    """How long ago the newest of `paths` was written: "written 5 min ago"."""
    return f"written {duration(time.time() - max(os.path.getmtime(p) for p in paths if os.path.exists(p)))} ago"


def duration(seconds):
    """"42 s", "5 min", "3.2 h", "2.0 d"."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


if __name__ == "__main__":
    main()
