"""The experiments behind the results tables: every Table 8 and Table 4 row trained and evaluated over
several seeds, and the learning curves of runs side by side. Evaluation itself is evaluate.py's.

    python -m tools.experiments table                                # every row, seeds 0, 1, 2 -> results/shapes_lt.{json,md}
    python -m tools.experiments table --data shapes_lt_coined --seeds 0
    python -m tools.experiments curves runs/a runs/b/lgr.jsonl       # learning curves side by side, and a plot
    python -m tools.experiments regroup results/shapes_lt.json       # many / medium / few again from the per-class accuracies

`table` runs each row's stages (run_table: a finished stage is skipped, a stopped one resumed), evaluates
every run folder on the test split (evaluate.evaluate_folder), then writes results/<data>.json and .md (mean
and std over seeds) and the README's plots.
"""
import functools
import glob
import json
import math
import os
import shutil
import time

import numpy as np
import torch

import anss
import cvlp
from data import DATASETS, FEW_UP_TO, MANY_FROM, fill_defaults, image_transform, load_data, shot_split
from evaluate import evaluate_folder
import evaluate
from lgr import build_recognizer, lgr_probabilities
import lgr
from util import flags
from util.engine import load_checkpoint, one_process_only, run_file, run_stage
from util.errors import DataError
from util.files import atomic_write
from util.images import contact_sheet
from util.records import epoch_records, read_records


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR experiments: the results tables over seeds, learning curves")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", parents=[evaluate.get_parser(add_help=False)],
                       help="run and evaluate every Table 8 and Table 4 row for each of --seeds (run_table)")
    t.add_argument("--seeds", type=flags.seed, nargs="+", default=[0, 1, 2],
                   help="seeds (each a new world, CLIP stand-in and training run)")
    t.add_argument("--table-out", default=os.path.join("runs", "table"), help="run folders <this>/<data>/seed<s>/<row>")
    t.add_argument("--results", default="results", help="where <data>.json, <data>.md and the plots go")
    t.add_argument("--stage-args", default="", help="extra arguments for every cvlp.py and lgr.py run, "
                   "for example '--batch 64'")
    c = sub.add_parser("curves", help="print the learning curves of training runs side by side and plot them")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each of their <stage>.jsonl records), "
                   "<stage>.jsonl files, or checkpoints (cvlp.pt, lgr.pt: the history they keep): mean losses and, with "
                   "--val-every-epoch or lgr.py, the val top-1 per epoch")
    c.add_argument("--results", default="results", help="where the plot goes")
    c.add_argument("--name", default="learning_curves.png", help="file name of the plot")
    r = sub.add_parser("regroup", help="recompute the many / medium / few cells of results/<data>.json (and .md, and "
                       "the per-class plot) from its per-class test accuracies with data.shot_split, without the runs")
    r.add_argument("reports", nargs="+", metavar="JSON", help="results/<data>.json files written by `table`")
    args = p.parse_args(argv)
    return fill_defaults(args) if args.command == "table" else args


def main(argv=None):
    one_process_only("experiments.py")
    args = get_args(argv)
    run_stage({"table": run_table, "curves": run_curves, "regroup": run_regroup}[args.command], args)


def run_curves(args):
    """curves: each run's epoch records side by side (over-fitting shows as the loss still falling while the val
    score stops rising), and one plot of them."""
    runs = {}
    for path in args.runs:
        for name, history in learning_curves(path).items():
            runs[os.path.relpath(name)] = history
    print("| run | " + " | ".join(f"epoch {h['epoch']}" for h in max(runs.values(), key=len)) + " |")
    for name, history in runs.items():                           # one row per quantity the run recorded
        for k in [k for k in ("loss", "L_ccl", "L_dis", "CE_I", "CE_T", "val") if any(k in h for h in history)]:
            cells = ["-" if k not in h else f"{h[k]:.1f}" if k == "val" else f"{h[k]:.3f}" for h in history]
            print(f"| {name} {k} | " + " | ".join(cells) + " |")
    if not any("val" in h for r in runs.values() for h in r):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    loss = "L_ccl" if all("L_ccl" in r[0] for r in runs.values()) else "loss"   # CVLP: comparable across lam
    for i, (name, history) in enumerate(runs.items()):
        label = os.path.dirname(name) if name.endswith(("cvlp.pt", "cvlp.jsonl")) else name   # a CVLP run: its folder
        ax0.plot([h["epoch"] for h in history], [h[loss] for h in history], color=f"C{i}", label=label)
        ax1.plot([h["epoch"] for h in history if "val" in h], [h["val"] for h in history if "val" in h],
                 color=f"C{i}", label=label)
    ax0.set(xlabel="epoch", ylabel=f"training {loss} (epoch mean)", yscale="log")
    ax1.set(xlabel="epoch", ylabel="val top-1 (%)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, args.name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def learning_curves(path):
    """{file: [{"epoch", loss terms..., "val": overall top-1 in %}]} of a run folder (each <stage>.jsonl in it), a
    .jsonl file (util/records.py) or a checkpoint (the history its position keeps)."""
    if os.path.isdir(path) or (path.endswith(".jsonl") and not os.path.exists(path)):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise DataError(f"{path}: no .jsonl records of a training run there; pass a run folder, a .jsonl or a .pt")
        return {f: learning_curves(f)[f] for f in files}
    if path.endswith(".jsonl"):
        history = [{**r, "val": r["val"]["overall"]} if r.get("val") else r for r in epoch_records(read_records(path))]
    else:
        stage = "lgr" if os.path.basename(path).startswith(("lgr", "fc")) else "cvlp"
        history = load_checkpoint(path, stage, f"python {stage}.py")["position"].get("history")
    if not history:
        raise DataError(f"{path} holds no finished epoch yet (a checkpoint written before the history was recorded: "
                        f"rerun its stage)")
    return {path: history}


# ----------------------------------------------------------------------------------------------
# The table: python -m tools.experiments table  (Table 8 and Table 4 rows, several seeds)

SPLITS = ("overall", "many", "medium", "few")
SHOT_SPLIT = f"many >= {MANY_FROM}, few <= {FEW_UP_TO} training images (Sec. 4.2)"   # recorded in results/<data>.json
# Each row: the folder its checkpoints live in and the method name evaluate_folder() gives it there.
TABLE8 = [("Zero-shot CLIP", "full", "Zero-Shot CLIP"), ("Baseline (CLIP + FC)", "full", "Baseline (CLIP + FC)"),
          ("VL-LTR", "full", "VL-LTR (LGR)"),
          ("Baseline with LGR's epochs (not in the paper)", "equal_epochs", "Baseline (CLIP + FC)")]
TABLE4 = [  # (row, folder, method, paper's ImageNet-LT RN50 top-1, docs/design.md §6)
    ("#1 full VL-LTR", "full", "VL-LTR (LGR)", 70.1),
    ("#2 without CVLP (CLIP weights into LGR)", "full", "LGR without CVLP", 62.8),
    ("#3 without CLIP weights (scratch, no L_dis)", "scratch", "VL-LTR (LGR)", 46.8),
    ("#4 without L_dis (lam = 1)", "no_dis", "VL-LTR (LGR)", 66.2),
    ("#5 FC head", "full", "FC head (CVLP)", 62.1),
    ("#6 KNN head", "full", "KNN head (k=5)", 63.9),
    ("#7 cut-off instead of AnSS", "cutoff", "VL-LTR (LGR)", 69.7),
    ("prompt-only corpus (Table 10)", "prompt", "VL-LTR (LGR)", 69.4)]


def table_jobs(data):
    """The stages behind every row, in order: (folder, stage module, its arguments). The baseline gets
    CVLP + LGR epochs (the paper's 100 vs 50 + 50), and once more only LGR's; cut-off reuses full/cvlp.pt."""
    lgr_epochs = str(lgr.get_args(["--data", data]).epochs)
    return [("full", cvlp, []), ("full", anss, []), ("full", lgr, []), ("full", lgr, ["--head", "fc"]),
            ("full", lgr, ["--init", "clip", "--head", "fc"]),
            ("full", anss, ["--init", "clip"]), ("full", lgr, ["--init", "clip"]),
            ("no_dis", cvlp, ["--lam", "1"]), ("no_dis", anss, []), ("no_dis", lgr, []),
            ("scratch", cvlp, ["--init", "scratch", "--lam", "1"]), ("scratch", anss, []), ("scratch", lgr, []),
            ("cutoff", anss, ["--select", "cutoff"]), ("cutoff", lgr, []),
            ("prompt", cvlp, ["--text", "prompt"]), ("prompt", anss, ["--text", "prompt"]), ("prompt", lgr, []),
            ("equal_epochs", lgr, ["--init", "clip", "--head", "fc", "--epochs", lgr_epochs])]


def stage_output(stage, stage_args):
    """The file a stage writes last, and whether a finished run is there (trained stages: all epochs)."""
    if stage is anss:
        path = run_file(stage_args, "anchor_embeds")
        return path, os.path.exists(path)
    path = os.path.join(stage_args.out, "cvlp.pt") if stage is cvlp else run_file(stage_args, stage_args.head)
    if not os.path.exists(path):
        return path, False
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # reads the epoch, not the weights
    return path, ckpt.get("epoch") == stage_args.epochs


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def run_table(args):
    """Every Table 8 and Table 4 row for each seed, under runs/table/<data>/seed<s>/<folder>; a finished stage
    is skipped and a stopped one resumed, so rerunning the command continues. Writes <results>/<data>.json
    and .md (mean and std over seeds) and the plots."""
    common = ["--data", args.data, "--data-root", args.data_root, "--device", str(args.device),
              "--workers", str(args.workers), "--backbone", args.backbone, "--pretrained", args.pretrained]
    if args.clip_weights:
        common += ["--clip-weights", args.clip_weights]
    root = os.path.join(args.table_out, args.data)
    per_seed, timings, t_start = {}, {}, time.time()
    for seed in args.seeds:
        seed_root = os.path.join(root, f"seed{seed}")
        timings_path = os.path.join(seed_root, "stage_seconds.json")   # kept across reruns of the command
        if os.path.exists(timings_path):
            with open(timings_path) as f:
                timings.update(json.load(f))
        for folder, stage, extra in table_jobs(args.data):
            out = os.path.join(seed_root, folder)
            if folder == "cutoff" and not os.path.exists(os.path.join(out, "cvlp.pt")):
                os.makedirs(out, exist_ok=True)                  # cut-off selects from the full run's CVLP model
                shutil.copyfile(os.path.join(seed_root, "full", "cvlp.pt"), os.path.join(out, "cvlp.pt"))
            argv = common + ["--seed", str(seed), "--out", out] + extra
            argv += args.stage_args.split() if stage is not anss else []
            stage_args = stage.get_args(argv)
            path, done = stage_output(stage, stage_args)
            label = f"seed {seed} {folder}: {stage.__name__}.py {' '.join(extra)}".rstrip()
            if done:
                print(f"[table] {label}: done ({path})")
                continue
            if os.path.exists(path) and stage is not anss:
                stage_args = stage.get_args(argv + ["--resume"])
            print(f"[table] {label}")
            t0 = time.time()
            stage.run(stage_args)
            timings[f"seed{seed}/{folder}/{stage.__name__} {' '.join(extra)}".rstrip()] = round(time.time() - t0, 1)
            mine = {k: v for k, v in timings.items() if k.startswith(f"seed{seed}/")}
            atomic_write(timings_path, lambda f: f.write(json.dumps(mine, indent=1).encode()))

        data = load_data(args.data, args.data_root, seed)
        args.num_classes, args.seed = data.num_classes, seed
        per_seed[seed] = {"results": {}, "precision": {}}
        for folder in ("full", "no_dis", "scratch", "cutoff", "prompt", "equal_epochs"):
            args.out = os.path.join(seed_root, folder)
            results, _, _, failed = evaluate_folder(args, data, zero_shot=folder == "full")
            if failed:
                name, why = next(iter(failed.items()))
                raise DataError(f"{args.out}: {name} failed: {why}; fix it and rerun (finished stages are skipped)")
            per_seed[seed]["results"][folder] = results
            if os.path.exists(os.path.join(args.out, "anchors.json")):
                with open(os.path.join(args.out, "anchors.json")) as f:
                    per_seed[seed]["precision"][folder] = json.load(f)["precision"]
        per_seed[seed]["train_counts"] = data.counts.tolist()
        print(f"[table] seed {seed} evaluated ({time.time() - t_start:.0f} s so far)")

    report = table_report(args, per_seed, timings, time.time() - t_start)
    os.makedirs(args.results, exist_ok=True)
    write_report(report, os.path.join(args.results, f"{args.data}.json"))
    for path in make_plots(args, report, root):
        print(f"wrote {path}")


def write_report(report, json_path):
    """results/<data>.json and its table beside it as .md, both written atomically; the table printed."""
    md_path, table = json_path[:-len(".json")] + ".md", table_markdown(report)
    atomic_write(json_path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    atomic_write(md_path, lambda f: f.write(table.encode()))
    print(table)
    print(f"wrote {json_path} and {md_path}")


def plot_path(folder, data, name):
    """Where a figure goes: <folder>/<name> for shapes_lt, <folder>/<data>_<name> beside it for the other worlds."""
    return os.path.join(folder, ("" if data == "shapes_lt" else f"{data}_") + name)


def seed_cells(per_seed, folder, method):
    """One row of a table: {split: {"mean", "std"}} over the seeds of one method's accuracies."""
    rows = [per_seed[s]["results"][folder][method] for s in per_seed]
    return {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rows]))) for k in SPLITS}


def table_rows(per_seed):
    """Table 8, Table 4 and the Eq. (7) branches as mean ± std cells over the seeds."""
    cells = functools.partial(seed_cells, per_seed)
    return {"table8": {row: cells(folder, method) for row, folder, method in TABLE8},
            "table4": {row: {**cells(folder, method), "paper": paper} for row, folder, method, paper in TABLE4},
            "branches": {m: cells("full", f"VL-LTR (LGR): {m} only") for m in ("P^I", "P^T")}}


def table_report(args, per_seed, timings, seconds):
    """Mean and std over seeds of every cell of Table 8, Table 4 and the AnSS precision."""
    seeds = list(per_seed)

    def precision(pick):                                         # pick: the full run's anchors.json "precision"
        return dict(zip(("mean", "std"), mean_std([pick(per_seed[s]["precision"]["full"]) for s in seeds])))

    epochs = {"cvlp": cvlp.get_args(["--data", args.data]).epochs, "lgr": lgr.get_args(["--data", args.data]).epochs,
              "baseline": lgr.get_args(["--data", args.data, "--head", "fc", "--init", "clip"]).epochs}
    return {
        "data": args.data, "backbone": args.backbone, "split": args.split, "seeds": seeds, "epochs": epochs,
        "device": str(args.device), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "wall_seconds": round(seconds, 1), "stage_seconds": timings, "shot_split": SHOT_SPLIT,
        **table_rows(per_seed),
        "anss_precision": {
            "AnSS, M = 64 from templates + descriptions": precision(lambda p: p["anss"]["precision"]),
            "cut-off, M = 64 from templates + descriptions": precision(lambda p: p["cutoff"]["precision"]),
            "AnSS, description sentences kept": precision(lambda p: p["anss"]["descriptions_kept"]),
            "AnSS, M = 64 from the descriptions alone": precision(lambda p: p["descriptions_only"]["anss"]),
            "cut-off, M = 64 from the descriptions alone": precision(lambda p: p["descriptions_only"]["cutoff"]),
            "informative share of all description sentences": precision(lambda p: p["descriptions_only"]["corpus"])},
        "per_seed": per_seed,
    }


def table_markdown(report):
    """results/<data>.md: the tables as the README shows them (mean ± std over seeds, top-1 %)."""
    def row(name, c, extra=""):
        return f"| {name} | " + " | ".join("-" if math.isnan(c[k]["mean"]) else f"{c[k]['mean']:.1f} ± {c[k]['std']:.1f}"
                                          for k in SPLITS) + f" |{extra}"

    e = report["epochs"]
    lines = [f"# {report['data']}: Table 8 and Table 4 rows, {report['split']} top-1 (%), mean ± std over "
             f"{len(report['seeds'])} seeds", "",
             f"Seeds {report['seeds']} (each a new world, CLIP stand-in and training run); {report['device']}, "
             f"torch {report['torch']}, {report['date']}; epochs: CVLP {e['cvlp']}, LGR {e['lgr']}, baseline "
             f"{e['baseline']}. Regenerate: `python -m tools.experiments table"
             + ("" if report["data"] == "shapes_lt" else f" --data {report['data']}") + "`.", ""]
    if "shot_split" in report:
        regrouped = report.get("regrouped")
        lines += [f"Shot splits: {report['shot_split']}" + (f"; many / medium / few regrouped from the per-class "
                  f"accuracies on {regrouped} (`python -m tools.experiments regroup`)" if regrouped else "") + ".", ""]
    lines += ["| method (Table 8) | overall | many | medium | few |", "|---|---|---|---|---|"]
    lines += [row(name, c) for name, c in report["table8"].items()]
    lines += ["", "| Table 4 row | overall | many | medium | few | paper, ImageNet-LT RN50 |", "|---|---|---|---|---|---|"]
    lines += [row(name, c, f" {c['paper']} |") for name, c in report["table4"].items()]
    lines += ["", "| VL-LTR branch (Eq. 7) | overall | many | medium | few |", "|---|---|---|---|---|"]
    lines += [row(f"{name} alone", c) for name, c in report["branches"].items()]
    lines += ["", "| anchor sentences (ground-truth informative flags) | value |", "|---|---|"]
    for name, c in report["anss_precision"].items():
        value = (f"{c['mean']:.0f} ± {c['std']:.0f}" if "kept" in name
                 else f"{100 * c['mean']:.1f}% ± {100 * c['std']:.1f}")
        lines.append(f"| {name} | {value} |")
    return "\n".join(lines) + "\n"


def regroup(report):
    """A results report with every many / medium / few number recomputed from the per-class test accuracies under
    data.shot_split, for a report written under other boundaries whose runs are gone. Exact where the test split
    is balanced (every class the same number of test images, as shapes_lt's 20; Sec. 4.2 evaluates on balanced
    test sets): a group's top-1 is then the mean of its classes' top-1. Checked first on every method of every
    seed: its stored overall top-1 must be the mean of its per-class top-1."""
    for seed, run in report["per_seed"].items():
        shots = shot_split(run["train_counts"])                  # (C,)
        for folder, methods in run["results"].items():
            for method, r in methods.items():
                per_class = np.array(r["per_class"])             # (C,) top-1 % per class, rounded to 0.01
                if abs(per_class.mean() - r["overall"]) > 0.01:
                    raise DataError(f"seed {seed} {folder} {method}: overall {r['overall']:.2f} is not the mean of "
                                    f"its per-class accuracies ({per_class.mean():.2f}): the test split is not "
                                    f"balanced, so the groups cannot be recomputed; re-evaluate the runs instead")
                for k in ("many", "medium", "few"):
                    r[k] = per_class[shots == k].mean() if (shots == k).any() else float("nan")
    return {**report, **table_rows(report["per_seed"]), "shot_split": SHOT_SPLIT,
            "regrouped": time.strftime("%Y-%m-%d")}


def run_regroup(args):
    """regroup: rewrite each results/<data>.json, its .md and its per-class plot."""
    for path in args.reports:
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; pass a results/<data>.json written by `python -m tools.experiments table`")
        with open(path) as f:
            report = json.load(f)
        report["per_seed"] = {int(s): run for s, run in report["per_seed"].items()}   # JSON keys are strings
        report = regroup(report)
        write_report(report, path)
        import matplotlib
        matplotlib.use("Agg")
        plot = plot_path(os.path.dirname(path), report["data"], "per_class_accuracy.png")
        plot_per_class_accuracy(report, report["data"], plot)
        print(f"wrote {plot}")


def make_plots(args, report, root):
    """The README's figures from the table's runs: per-class accuracy against training images (all seeds),
    the contact sheet of the first seed's world, and one example of LGR attention in that world."""
    import matplotlib
    matplotlib.use("Agg")
    paths = [plot_path(args.results, args.data, f) for f in ("per_class_accuracy.png", "contact_sheet.png",
                                                            "lgr_attention.png")]
    plot_per_class_accuracy(report, args.data, paths[0])
    seed = report["seeds"][0]
    data = load_data(args.data, args.data_root, seed)
    contact_sheet(data.train, data.counts, paths[1])
    args.out, args.seed, args.num_classes = os.path.join(root, f"seed{seed}", "full"), seed, data.num_classes
    plot_lgr_attention(args, data, report["per_seed"][seed]["results"]["full"], paths[2])
    return paths


def plot_per_class_accuracy(report, name, path):
    """Test top-1 of every class of every seed against its training images (log x), baseline vs VL-LTR,
    with the binned means and the many / medium / few boundaries."""
    import matplotlib.pyplot as plt
    import numpy as np
    seeds = report["seeds"]
    n = np.concatenate([report["per_seed"][s]["train_counts"] for s in seeds])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, label, colour in (("Baseline (CLIP + FC)", "baseline", "C0"), ("VL-LTR (LGR)", "VL-LTR", "C3")):
        acc = np.concatenate([report["per_seed"][s]["results"]["full"][method]["per_class"] for s in seeds])
        ax.scatter(n, acc, s=8, alpha=0.25, color=colour)
        bins = np.digitize(n, np.geomspace(n.min(), n.max() + 1, 12))
        centres = [np.exp(np.log(n[bins == b]).mean()) for b in np.unique(bins)]
        ax.plot(centres, [acc[bins == b].mean() for b in np.unique(bins)], "-o", color=colour,
                label=f"{label} (binned mean)")
    for x in (FEW_UP_TO + 0.5, MANY_FROM - 0.5):                 # few <= 20 < medium < 100 <= many (Sec. 4.2)
        ax.axvline(x, color="grey", ls="--", lw=1)
    for x, text in ((9.5, "few"), (45, "medium"), (230, "many")):
        ax.text(x, 97, text, ha="center", va="top", color="grey")
    ax.set(xscale="log", xlabel="training images of the class (log)", ylabel="test top-1 of the class (%)",
           ylim=(0, 102), title=f"{name}: per-class accuracy, seeds {seeds} (dots: one class of one seed)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lgr_attention(args, data, results, path):
    """Eq. (6) on one test image of the few-shot class where VL-LTR gains most over the baseline: the
    attention weights over that class's anchor sentences, coloured by their ground-truth flag."""
    import matplotlib.pyplot as plt
    import numpy as np
    args.head, args.init = "lgr", "cvlp"
    ckpt = load_checkpoint(os.path.join(args.out, "lgr.pt"), "lgr", "python lgr.py")
    args.variant = ckpt["args"]["variant"]
    model = build_recognizer(args, args.device, ckpt).eval()
    with open(os.path.join(args.out, "anchors.json")) as f:
        anchors = json.load(f)["classes"]
    gain = np.array(results["VL-LTR (LGR)"]["per_class"]) - np.array(results["Baseline (CLIP + FC)"]["per_class"])
    gain[shot_split(data.counts) != "few"] = -np.inf
    c = int(gain.argmax())
    i = int(np.flatnonzero(data.test.labels == c)[0])
    transform = image_transform(args, train=False)
    x = transform(torch.from_numpy(data.test.images[i]).permute(2, 0, 1))
    with torch.no_grad():
        logits_I, logits_T, A = model(x[None].to(args.device))
    predicted = int(lgr_probabilities(logits_I, logits_T, args.variant, DATASETS[args.data]["alpha"]).argmax())
    weights = A[0, c, :len(anchors[c]["sentences"])].cpu()       # (M,) over class c's real anchors
    kind = {s: ("template" if src == "template" else "informative" if inf else "noise") for s, src, inf in
            zip(data.corpus.sentences[c], data.corpus.source[c], data.corpus.informative[c])}
    order = weights.argsort(descending=True).tolist()
    rank = {k: r + 1 for r, k in enumerate(order)}
    descriptions = [k for k in order if kind[anchors[c]["sentences"][k]] != "template"]
    top = sorted(set(order[:8]) | set(descriptions[:8]), key=rank.get)[::-1]   # the top 8, and the top 8 descriptions
    sentences = [anchors[c]["sentences"][k] for k in top]
    colours = {"template": "C7", "informative": "C2", "noise": "C3"}
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1, 3.2]})
    ax0.imshow(data.test.images[i], interpolation="nearest")
    ax0.set_title(f"test image of '{data.classnames[c]}'\n({data.counts[c]} training images)", fontsize=9)
    ax0.axis("off")
    ax1.barh(range(len(top)), weights[top].numpy(), color=[colours[kind[s]] for s in sentences])
    ax1.set_yticks(range(len(top)), [f"#{rank[k]}  {t}" for k, t in zip(top, sentences)], fontsize=8)
    ax1.set_xlabel(f"attention weight A (Eq. 6) over the {len(weights)} anchors of the class "
                   f"(uniform = {1 / len(weights):.3f})")
    ax1.set_title(f"LGR attention: top 8 anchors and top descriptions (#rank); predicted '{data.classnames[predicted]}'"
                  "\ngreen: informative description, grey: prompt template, red: noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
