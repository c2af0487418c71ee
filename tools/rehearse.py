"""A cost rehearsal of the real-data pipeline: every stage on a generated tree of the real size, before GPU time.

    python -m tools.rehearse imagenet_lt                  # 1,000 classes, 115,846 / 20,000 / 50,000 images
    python -m tools.rehearse places_lt --fraction 0.1     # a tenth: 36 classes, the same per-class profile
    python -m tools.rehearse inat2018 --stages data,cvlp,anss --stop-after-steps 20
    python -m tools.rehearse imagenet_lt --device cuda    # on a GPU: each stage's peak GPU memory too
    python -m tools.rehearse imagenet_lt --regenerate     # write the tree again (otherwise it is generated once)

1. Generates, once (tree.json marks a finished tree), the dataset's official layout at its real size, with tiny
   hard-linked JPEGs (tools/rehearsal_tree.py).
2. Runs every stage as a subprocess with a user's command line, on the tiny 32 px model (random weights). The
   three training runs stop after --stop-after-steps steps (engine.fit saves the checkpoint mid-epoch, and the
   next stages read it like a finished one); all else (loading, AnSS, every evaluation head) runs in full.
3. Prints per stage the wall time, the peak RSS of its process tree (the stage and its DataLoader workers, summed
   from /proc every 0.2 s: shared pages count once per process), the largest single process's RSS (os.wait4's
   ru_maxrss), the exit status and a failed stage's last stderr line. Each stage runs under --mem-cap (RLIMIT_AS,
   per process), so a runaway stage fails instead of taking the machine down. Writes <root>/rehearsal_<data>.json
   and .md (for BENCHMARKS.md), with a growth column (full / tenth) once both sizes have run.
"""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

from tools.rehearsal_tree import SIZES, TREE_VERSION, disk_use, read_json, write_text, write_tree
from util import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the stage scripts
STAGES = ("data", "cvlp", "anss", "lgr", "fc_clip", "evaluate", "predict")


def get_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n")[0])
    p.add_argument("data", choices=list(SIZES), help="the dataset whose official layout and size to rehearse")
    p.add_argument("--fraction", type=flags.Range(float, 0, 1, lo_open=True), default=1.0, help="share of the "
                   "classes (and so of the images) to generate; 0.1: a tenth, with the same per-class profile (at "
                   "least 10 classes)")
    p.add_argument("--root", default=None, help="the generated tree (default data/rehearsal/<data>[_<fraction>])")
    p.add_argument("--regenerate", action="store_true", help="delete and write the tree again")
    p.add_argument("--seed", type=flags.seed, default=0, help="seeds the tree, the tiny CLIP weights and the stages")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}; "
                   "with cvlp in it the run folder <root>/run starts empty (token caches included)")
    p.add_argument("--stop-after-steps", type=flags.count_or_zero, default=200, help="optimiser steps of each "
                   "training run (cvlp, lgr, fc_clip; 0: whole epochs); the cost of the rest of an epoch is not measured")
    p.add_argument("--workers", type=flags.count_or_zero, default=2, help="DataLoader workers of every stage")
    p.add_argument("--device", default="cpu", help="where every stage runs: cpu, or cuda (then each stage's peak "
                   "GPU memory is measured too)")
    p.add_argument("--mem-cap", default=None, help="address-space limit per stage process (RLIMIT_AS): 16G, "
                   "512M, or 0 for none (default 16G on the CPU; none on a GPU, whose driver maps far more address "
                   "space than it uses)")
    p.add_argument("--timeout", type=flags.non_negative, default=0, help="seconds after which a stage is stopped (0: never)")
    args = p.parse_args(argv)
    args.root = args.root or default_root(args.data, args.fraction)
    args.mem_cap = args.mem_cap or ("0" if args.device.startswith("cuda") else "16G")
    args.mem_cap_bytes = parse_size(args.mem_cap)                # a typo stops here, before the tree is written
    return args


def default_root(data, fraction):
    return os.path.join("data", "rehearsal", data if fraction == 1 else f"{data}_{fraction:g}")


def ensure_tree(args):
    """The cached tree if its tree.json matches (data, fraction, seed, version); else generate it."""
    marker = os.path.join(args.root, "tree.json")
    want = {"data": args.data, "fraction": args.fraction, "seed": args.seed, "version": TREE_VERSION}
    if os.path.exists(marker) and not args.regenerate:
        tree = read_json(marker)
        found = {k: tree.get(k) for k in want}
        if found == want:
            return {**tree, "cached": True}
        if {**found, "version": TREE_VERSION} != want:
            sys.exit(f"error: {args.root} holds another tree ({found}); pass --regenerate or --root")
        print(f"{args.root} was written by an older rehearse.py (tree version {found['version']}): writing it again")
    if os.path.isdir(args.root) and os.listdir(args.root):
        if not os.path.exists(marker) and not os.path.isdir(os.path.join(args.root, "pool")):
            sys.exit(f"error: {args.root} is not empty and was not written by rehearse.py; pass another --root")
        shutil.rmtree(args.root)
    os.makedirs(args.root)
    print(f"generating {args.data} (fraction {args.fraction:g}) under {args.root} ...", flush=True)
    tree = write_tree(args.data, args.root, args.fraction, args.seed)
    tree["disk_bytes"], tree["files"] = disk_use(args.root)
    write_text(marker, json.dumps(tree, indent=1))
    return {**tree, "cached": False}


# ----------------------------------------------------------------------------------------------
# The stages, measured


def stage_commands(args, tree, run):
    """Each stage's command line, as a user would type it on the real data (tiny model, --device)."""
    data = ["--data", args.data, "--data-root", args.root]
    common = [*data, "--backbone", "shapes-tiny", "--image-size", "32", "--workers", str(args.workers),
              "--device", args.device, "--out", run, "--seed", str(args.seed)]
    clip = ["--clip-weights", os.path.join(args.root, "shapes_tiny_clip.pt")]
    stop = ["--stop-after-steps", str(args.stop_after_steps)]
    again = ["--overwrite"]                  # each stage is measured anew: it replaces the last rehearsal's file
    return {"data": ["data.py", *data, "--sheet", os.path.join(run, "sheet.png")],
            "cvlp": ["cvlp.py", *common, *clip, *stop, *again], "anss": ["anss.py", *common, *again],
            "lgr": ["lgr.py", *common, *stop, *again],
            "fc_clip": ["lgr.py", *common, *clip, "--init", "clip", "--head", "fc", *stop, *again],
            "evaluate": ["evaluate.py", *common, *clip],
            "predict": ["predict.py", *tree["predict_images"], "--run", run, "--device", args.device]}


def parse_size(text):
    """ "16G" -> bytes; "0" -> 0 (no cap)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not m:
        sys.exit(f"error: --mem-cap {text!r}: give a size like 16G or 512M")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def tree_rss(pid):
    """Summed RSS (bytes) of pid and its descendants (DataLoader workers), from /proc/<pid>/statm and children."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:                                                     # a process may end meanwhile
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def gb(n):
    return f"{n / 2 ** 30:.2f}"


def last_line(text, skip=None):
    """The last non-empty line of text ("" if none), passing over the lines that start with `skip`."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not (skip and line.startswith(skip))]
    return (lines or [""])[-1]


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def measure(name, argv, log_dir, mem_cap, timeout):
    """Run one stage; its wall time, peak tree RSS (polled every 0.2 s), ru_maxrss, status and error line."""
    cap = (lambda: resource.setrlimit(resource.RLIMIT_AS, (mem_cap, mem_cap))) if mem_cap else None
    out, err = (os.path.join(log_dir, f"{name}.{k}") for k in ("out", "err"))
    print(f"[{name}] python {' '.join(argv)}", flush=True)
    with open(out, "w") as f_out, open(err, "w") as f_err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], stdout=f_out, stderr=f_err,
                                preexec_fn=cap, process_group=0, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        peak, timed_out, next_note, pid = 0, False, t0 + 30, 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = tree_rss(proc.pid)
                peak = max(peak, now)
                if time.time() > next_note:                      # the stages' tqdm bars are silent in a log
                    print(f"  ... {time.time() - t0:.0f} s, RSS {gb(now)} GiB (peak {gb(peak)})", flush=True)
                    next_note += 30
                if timeout and time.time() - t0 > timeout and not timed_out:
                    os.killpg(proc.pid, signal.SIGKILL)          # its own process group: the stage and its workers
                    timed_out = True
                time.sleep(0.2)
        finally:
            if not pid:                                          # rehearse.py itself was stopped: stop the stage too
                os.killpg(proc.pid, signal.SIGKILL)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    state = ("ok" if rc == 0 else "timeout" if timed_out else f"exit {rc}" if rc > 0
             else f"signal {signal.Signals(-rc).name}")
    stderr = read_text(err)
    r = {"stage": name, "command": "python " + " ".join(argv), "wall_s": round(wall, 1), "peak_rss_tree_bytes": peak,
         "max_rss_process_bytes": usage.ru_maxrss * 1024, "status": state, "load_avg": round(os.getloadavg()[0], 1),
         "error": last_line(stderr, skip="peak GPU memory:") if rc else "", "last_output": last_line(read_text(out)),
         "gpu_peak_gib": gpu_peak(stderr)}
    gpu = "" if r["gpu_peak_gib"] is None else f", peak GPU memory {r['gpu_peak_gib']:.2f} GiB"
    print(f"  {state}: {wall:.1f} s, peak RSS {gb(peak)} GiB (tree), {gb(r['max_rss_process_bytes'])} GiB (largest "
          f"process){gpu}\n  " + (f"error: {r['error']}" if rc else r["last_output"][:160]), flush=True)
    return r


def gpu_peak(stderr):
    """The stage's peak GPU memory (GiB allocated) from the line engine.report_gpu_memory writes; None without one."""
    found = re.findall(r"peak GPU memory: ([0-9.]+) GiB allocated", stderr)
    return float(found[-1]) if found else None




def markdown(report, other):
    """The table for BENCHMARKS.md; with `other`, the other size's report, a growth column: full / tenth."""
    t, before = report["tree"], {r["stage"]: r for r in other["stages"]} if other else {}
    flip = other is not None and report["fraction"] < other["fraction"]   # this run is the tenth

    def growth(r, key, floor):
        b = before.get(r["stage"])                               # "-": not run and ok at both sizes, or the
        if not b or (r["status"], b["status"]) != ("ok", "ok") or key == "wall_s" and r.get("steps") != b.get("steps"):
            return "-"                                           # training runs not for as many steps
        a, b = max(r[key], floor), max(b[key], floor)
        return f"{(b / a if flip else a / b):.1f}x"
    lines = [f"`python -m tools.rehearse {report['data']} --fraction {report['fraction']:g}`, {report['date']}: "
             f"{t['classes']} classes, {t['images']['train']} / {t['images']['val']} / {t['images']['test']} images; "
             f"tree generated in {t['seconds']} s, {t['disk_bytes'] / 2 ** 20:.0f} MiB on disk ({t['files']} files); "
             f"shapes-tiny 32 px on {report.get('device', 'cpu')}, {report['cpus']} CPU cores, --workers "
             f"{report['workers']}, --mem-cap {report['mem_cap']}; load: the "
             "1-minute load average as the stage ended (a shared machine inflates the times).", "",
             "| stage | wall (s) | peak RSS, tree (GiB) | largest process (GiB) | peak GPU memory (GiB) | load | status "
             "| error |" + (" growth full / tenth (wall, RSS) |" if other else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if other else "")]
    for r in report["stages"]:
        steps = f" ({r['steps']} steps)" if r.get("steps") else ""
        gpu = "-" if r.get("gpu_peak_gib") is None else f"{r['gpu_peak_gib']:.2f}"
        lines.append(f"| {r['stage']}{steps} | {r['wall_s']} | {gb(r['peak_rss_tree_bytes'])} | "
                     f"{gb(r['max_rss_process_bytes'])} | {gpu} | {r.get('load_avg', '-')} | {r['status']} | "
                     f"{r['error'].replace('|', '/')[:200]} |"
                     + (f" {growth(r, 'wall_s', 0.1)}, {growth(r, 'peak_rss_tree_bytes', 1)} |" if other else ""))
    return "\n".join(lines) + "\n"


def device_name(device):
    """"cpu", or the GPU's name for a cuda device (asked in a subprocess: this process never touches CUDA)."""
    if not device.startswith("cuda"):
        return "cpu"
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or f"{device} (not available: {last_line(probe.stderr)})"


def main(argv=None):
    args = get_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # stopped: the stage is stopped too
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES):
        sys.exit(f"error: unknown --stages {sorted(set(stages) - set(STAGES))}; choose from {','.join(STAGES)}")
    tree = ensure_tree(args)
    print(f"tree {args.root}: {tree['classes']} classes, images {tree['images']}, train/class {tree['train_max_min']}, "
          f"description sentences/class {tree['sentences']}, {tree['files']} files, {tree['disk_bytes'] / 2 ** 20:.0f} "
          f"MiB, " + ("cached" if tree["cached"] else f"generated in {tree['seconds']} s"))
    run = os.path.join(args.root, "run")
    if "cvlp" in stages:                                         # a fresh run: token caches are made again
        shutil.rmtree(run, ignore_errors=True)
    os.makedirs(os.path.join(run, "logs"), exist_ok=True)
    os.environ["VL_LTR_CACHE"] = os.path.join(run, "token_cache")   # the stages' tokens (data.cache_dir), as on a first run
    print(f"training stages stop after {args.stop_after_steps} steps (--stop-after-steps); the rest runs in full")
    commands = stage_commands(args, tree, run)
    path = os.path.join(args.root, f"rehearsal_{args.data}.json")
    kept = []
    if os.path.exists(path) and tree["cached"] and "cvlp" not in stages:   # the same run folder: keep the others
        kept = [r for r in read_json(path)["stages"] if r["stage"] not in stages]
    report = {"data": args.data, "fraction": args.fraction, "date": time.strftime("%Y-%m-%d"), "tree": tree,
              "cpus": len(os.sched_getaffinity(0)), "workers": args.workers, "mem_cap": args.mem_cap,
              "device": device_name(args.device), "stages": kept}
    for s in (s for s in STAGES if s in stages):                 # the report is written after every stage: a run
        r = measure(s, commands[s], os.path.join(run, "logs"), args.mem_cap_bytes, args.timeout)   # cut short keeps
        r.update(steps=args.stop_after_steps if s in ("cvlp", "lgr", "fc_clip") else None, mem_cap=args.mem_cap)
        report["stages"] = sorted(report["stages"] + [r], key=lambda r: STAGES.index(r["stage"]))   # what it measured
        write_text(path, json.dumps(report, indent=1))
    other = os.path.join(default_root(args.data, 0.1 if args.fraction == 1 else 1), f"rehearsal_{args.data}.json")
    other = read_json(other) if args.fraction in (0.1, 1) and os.path.exists(other) else None
    if other and other.get("device", "cpu") != report["device"]:  # growth only between runs on the same device
        other = None
    table = markdown(report, other)
    write_text(path.replace(".json", ".md"), table)
    print("\n" + table + f"\nwrote {path} and {path.replace('.json', '.md')}")


if __name__ == "__main__":
    main()
