"""A cost rehearsal of the real-data pipeline: every stage on a generated tree of the real size, before GPU time.

    python rehearse.py imagenet_lt                  # 1,000 classes, 115,846 / 20,000 / 50,000 images
    python rehearse.py places_lt --fraction 0.1     # a tenth: 36 classes, the same per-class profile
    python rehearse.py inat2018 --stages data,cvlp,anss --stop-after-steps 20
    python rehearse.py imagenet_lt --regenerate     # write the tree again (otherwise it is generated once)

1. Generates, once (tree.json marks a finished tree), the dataset's official layout (SPEC.md §4) at its real size:
   split files or iNat's COCO-style json, labels.txt / categories.json, train counts from n_max to n_min with the
   real total and many / medium / few class counts, balanced val / test, and wiki/desc_<index>.txt with Table 7's
   sentences per class, as paragraphs under "== Section ==" headers plus sections parse_wiki must drop. Pixels do
   not matter for a cost rehearsal: every image is a hard link (a copy where links fail) to one of a few thousand
   tiny JPEGs (32-48 px), which stay in the page cache: loader times are a lower bound of real photos'.
2. Runs every stage as a subprocess with a user's command line, on the tiny 32 px model (random weights). The
   three training runs stop after --stop-after-steps steps (engine.fit saves the checkpoint mid-epoch, and the
   next stages read it like a finished one); all else (loading, AnSS, every evaluation head) runs in full.
3. Prints per stage the wall time, the peak RSS of its process tree (the stage and its DataLoader workers, summed
   from /proc every 0.2 s: shared pages count once per process), the largest single process's RSS (os.wait4's
   ru_maxrss), the exit status and a failed stage's last stderr line. Each stage runs under --mem-cap (RLIMIT_AS,
   per process), so a runaway stage fails instead of taking the machine down. Writes <root>/rehearsal_<data>.json
   and .md (for BENCHMARKS.md), with a growth column (full / tenth) once both sizes have run.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("data", "cvlp", "anss", "lgr", "fc_clip", "evaluate", "predict")
TREE_VERSION = 2
# Real sizes (Liu et al. 2019; iNat 2018), the real many (> 100) / medium / few (< 20) class counts, and the
# paper's Table 7 description sentences per class: (min, max, mean, median). iNat's val is its test set.
SIZES = {
    "imagenet_lt": dict(classes=1000, train=115846, n_max=1280, n_min=5, shots=(385, 479, 136), val=20, test=50,
                        sentences=(1, 721, 127, 89)),
    "places_lt": dict(classes=365, train=62500, n_max=4980, n_min=5, shots=(131, 163, 71), val=20, test=100,
                      sentences=(2, 610, 116, 77)),
    "inat2018": dict(classes=8142, train=437513, n_max=1000, n_min=2, shots=(842, 4076, 3224), val=3, test=0,
                     sentences=(1, 1774, 33, 17)),
}
SECTIONS = ("Description", "Distribution", "History", "Ecology", "Uses", "Taxonomy", "In culture")
INAT_GROUPS = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia", "Mollusca")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", choices=list(SIZES), help="the dataset whose official layout and size to rehearse")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the classes (and so of the images) to "
                   "generate; 0.1: a tenth, with the same per-class profile (at least 10 classes)")
    p.add_argument("--root", default=None, help="the generated tree (default data/rehearsal/<data>[_<fraction>])")
    p.add_argument("--regenerate", action="store_true", help="delete and write the tree again")
    p.add_argument("--seed", type=int, default=0, help="seeds the tree, the tiny CLIP weights and the stages")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}; "
                   "with cvlp in it the run folder <root>/run starts empty (token caches included)")
    p.add_argument("--stop-after-steps", type=int, default=200, help="optimiser steps of each training run "
                   "(cvlp, lgr, fc_clip); the cost of the rest of an epoch is not measured")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of every stage")
    p.add_argument("--device", default="cpu", help="where every stage runs: cpu, or cuda (then each stage's peak "
                   "GPU memory is measured too)")
    p.add_argument("--mem-cap", default=None, help="address-space limit per stage process (RLIMIT_AS): 16G, "
                   "512M, or 0 for none (default 16G on the CPU; none on a GPU, whose driver maps far more address "
                   "space than it uses)")
    p.add_argument("--timeout", type=float, default=0, help="seconds after which a stage is stopped (0: never)")
    args = p.parse_args(argv)
    args.root = args.root or default_root(args.data, args.fraction)
    args.mem_cap = args.mem_cap or ("0" if args.device.startswith("cuda") else "16G")
    args.mem_cap_bytes = parse_size(args.mem_cap)                # a typo stops here, before the tree is written
    return args


def default_root(data, fraction):
    return os.path.join("data", "rehearsal", data if fraction == 1 else f"{data}_{fraction:g}")


# ----------------------------------------------------------------------------------------------
# The tree: counts, names, descriptions, images


def train_counts(C, total, n_max, n_min, shots):
    """(C,) training images per class, head to tail, summing to `total`. Log-linear from 99 to 21 over the
    medium classes and from 19 to n_min over the few (real class counts per split, scaled to C); no class has
    exactly 100 or 20 images, so the > 100 / < 20 and >= 100 / <= 20 rules give the same split; over the many,
    log n = log 101 + log(n_max / 101) t^p from n_max to 101, its bend p found by bisection. With a handful
    of classes n_max is lowered until the total can be reached."""
    many, medium = (max(1, round(s * C / sum(shots))) for s in shots[:2])
    i = np.arange(C)
    t_med, t_few = (i - many) / medium, (i - many - medium + 1) / max(C - many - medium, 1)
    tail = np.exp(np.where(i < many + medium, np.log(99) + np.log(21 / 99) * t_med,
                           np.log(19) + np.log(n_min / 19) * t_few)).round()
    n_max = min(n_max, (total - tail[many:].sum() - 101 * (many - 1)) // 2)

    def counts(p):
        head = np.log(101) + np.log(n_max / 101) * ((many - i) / many).clip(0) ** p
        return np.where(i < many, np.exp(head).round(), tail).astype(np.int64)
    lo, hi = 1e-3, 1e3                                           # the sum falls as p grows
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if counts(mid).sum() > total else (lo, mid)
    n, diff = counts(hi), int(total - counts(hi).sum())         # rounding leftovers: +-1 on the head after class 0
    np.add.at(n, 1 + np.arange(abs(diff)) % max(many - 1, 1), np.sign(diff))
    return np.sort(n)[::-1].copy()


def sentence_counts(C, m_min, m_max, m_mean, m_med, rng):
    """(C,) description sentences per class (Table 7): log-normal quantiles with the paper's median and mean
    (sigma = sqrt(2 ln(mean / median))), clipped to [min, max], the extremes set to min and max, shuffled."""
    sigma = (2 * np.log(m_mean / m_med)) ** 0.5
    z = [statistics.NormalDist().inv_cdf((c + 0.5) / C) for c in range(C)]
    m = np.round(m_med * np.exp(sigma * np.array(z))).clip(m_min, m_max).astype(np.int64)
    m[0], m[-1] = m_min, m_max
    return rng.permutation(m)


def wiki_text(n, words, rng):
    """A class's description file as parse_wiki reads it, with exactly n description sentences of 12-24 words
    (about 27 tokens with [SOS] and [EOS]: Table 7's L_avg is 26-29): one paragraph (1-6 sentences) per line,
    now and then under a "== Section ==" header, and at the end "See also" and "References" (a "=== Notes ==="
    below it), whose lines must all be dropped."""
    sentences = [" ".join(words[rng.integers(len(words), size=int(rng.integers(12, 25)))]).capitalize() + "."
                 for _ in range(n)]
    lines, i = [], 0
    while i < len(sentences):
        if lines and rng.random() < 0.3:
            lines.append(f"== {SECTIONS[int(rng.integers(len(SECTIONS)))]} ==")
        k = int(rng.integers(1, 7))
        lines.append(" ".join(sentences[i:i + k]))
        i += k
    lines += ["", "== See also ==", "List of related articles in the same family of pages.", "== References ==",
              "Smith, John (1999). A field guide to the classes of this data set. Oxford University Press.",
              "=== Notes ===", "The notes above were cited by several authors in the main text."]
    return "\n".join(lines) + "\n"


def class_names(data, C, words, rng):
    """The class-list entries: ImageNet wnid + open_clip's name, Places365 "/a/abbey_hall/indoor", iNat binomials."""
    if data == "imagenet_lt":
        from open_clip import IMAGENET_CLASSNAMES
        return [(f"n{1440764 + 1000 * c:08d}", IMAGENET_CLASSNAMES[c]) for c in range(C)]
    names = []
    while len(names) < C:
        a, b = words[rng.integers(len(words), size=2)]
        name = (f"/{a[0]}/{a}_{b}" + ("", "/indoor", "/outdoor")[int(rng.integers(3))] if data == "places_lt"
                else f"{a.capitalize()} {b}")
        if name not in names:
            names.append(name)
    return names


def image_lists(data, counts, names):
    """[(relative path, class)] of train, val and test, as the official files name them (ImageNet-LT's val comes
    from ImageNet's train set and its test from ImageNet's val; iNat's val lies beside its train images)."""
    s, splits = SIZES[data], {"train": [], "val": [], "test": []}
    ext = ".JPEG" if data == "imagenet_lt" else ".jpg"
    for c, n in enumerate(counts):
        own = {"imagenet_lt": f"train/{names[c][0]}/{names[c][0]}_", "places_lt": f"train{names[c]}/",
               "inat2018": f"train_val2018/{INAT_GROUPS[c % len(INAT_GROUPS)]}/{c}/"}[data]
        test = f"val/{names[c][0]}/ILSVRC2012_val_" if data == "imagenet_lt" else "val/Places365_val_"
        splits["train"] += [(f"{own}{k:08d}{ext}", c) for k in range(n)]
        splits["val"] += [(f"{own}{k:08d}{ext}", c) for k in range(n, n + s["val"])]
        splits["test"] += [(f"{test}{c * s['test'] + k:08d}{ext}", c) for k in range(s["test"])]
    return splits


def place_images(root, relpaths, n_pool, rng):
    """n_pool distinct tiny JPEGs (32-48 px, blurred random colour blocks) under root/pool, and each listed file a
    hard link to one of them (no bytes copied); copies instead once the file system refuses a link."""
    os.makedirs(os.path.join(root, "pool"))
    pool = [os.path.join(root, "pool", f"{k:05d}.jpg") for k in range(n_pool)]
    for path in pool:
        size = int(rng.integers(32, 49))
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR).save(path)
    put, folders = os.link, set()
    for i, rel in enumerate(relpaths):
        path = os.path.join(root, rel)
        if os.path.dirname(path) not in folders:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            folders.add(os.path.dirname(path))
        try:
            put(pool[i % n_pool], path)
        except OSError:
            put = shutil.copyfile
            put(pool[i % n_pool], path)


def write_text(path, text):
    """Written to a temporary file, then renamed: a cut-off run leaves the old file or none, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_tree(data, root, fraction, seed):
    """The whole tree; returns what tree.json records about it (written last: a half-written tree is no cache)."""
    t0, s, rng = time.time(), SIZES[data], np.random.default_rng(seed)
    C = max(10, round(s["classes"] * fraction))
    counts = train_counts(C, round(s["train"] * C / s["classes"]), s["n_max"], s["n_min"], s["shots"])
    from open_clip import IMAGENET_CLASSNAMES                     # words of its class names (1,217) for sentences
    words = np.array(sorted({w for n in IMAGENET_CLASSNAMES for w in re.findall(r"[a-z]+", n.lower()) if len(w) > 2}))
    names = class_names(data, C, words, rng)
    splits = image_lists(data, counts, names)
    if data == "inat2018":
        categories = [{"id": c, "name": n, "supercategory": INAT_GROUPS[c % len(INAT_GROUPS)]}
                      for c, n in enumerate(names)]
        write_text(os.path.join(root, "categories.json"), json.dumps(categories))
        ids = iter(range(10 ** 9))
        for split, name in (("train", "train2018.json"), ("val", "val2018.json")):
            rows = [(next(ids), p, c) for p, c in splits[split]]
            write_text(os.path.join(root, name), json.dumps({
                "info": {"year": 2018}, "categories": categories,
                "images": [{"id": i, "file_name": p, "width": 48, "height": 48} for i, p, _ in rows],
                "annotations": [{"id": i, "image_id": i, "category_id": c} for i, _, c in rows]}))
    else:
        prefix = "ImageNet_LT" if data == "imagenet_lt" else "Places_LT"
        for split in ("train", "val", "test"):
            write_text(os.path.join(root, f"{prefix}_{split}.txt"), "".join(f"{p} {c}\n" for p, c in splits[split]))
        write_text(os.path.join(root, "labels.txt"), "".join(
            f"{n[0]} {c} {n[1]}\n" if data == "imagenet_lt" else f"{n} {c}\n" for c, n in enumerate(names)))
    m = sentence_counts(C, *s["sentences"], rng)
    os.makedirs(os.path.join(root, "wiki"))
    for c in range(C):
        write_text(os.path.join(root, "wiki", f"desc_{c}.txt"), wiki_text(m[c], words, rng))
    listed = [p for split in splits.values() for p, _ in split]
    place_images(root, listed, min(4096, len(listed)), rng)
    import torch                                                 # random tiny CLIP weights for --clip-weights
    from clip_models import create_clip
    torch.manual_seed(seed)
    torch.save(create_clip("shapes-tiny", 32).state_dict(), os.path.join(root, "shapes_tiny_clip.pt"))
    test = splits["test"] or splits["val"]
    return {"data": data, "fraction": fraction, "seed": seed, "version": TREE_VERSION, "classes": C,
            "images": {k: len(v) for k, v in splits.items()}, "train_max_min": [int(counts[0]), int(counts[-1])],
            "sentences": {"min": int(m.min()), "max": int(m.max()), "mean": round(float(m.mean()), 1),
                          "median": float(np.median(m))},
            "predict_images": [os.path.join(root, test[k][0]) for k in (0, len(test) // 2, -1)],
            "seconds": round(time.time() - t0, 1)}


def disk_use(root):
    """(bytes on disk of files and folders, each hard-linked inode counted once, as du does; files) under root."""
    walk = [(folder, dirs + names, len(names)) for folder, dirs, names in os.walk(root)]
    stats = [os.lstat(os.path.join(folder, n)) for folder, entries, _ in walk for n in entries]
    return sum({(st.st_dev, st.st_ino): st.st_blocks * 512 for st in stats}.values()), sum(w[2] for w in walk)


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
    return {"data": ["data.py", *data, "--sheet", os.path.join(run, "sheet.png")],
            "cvlp": ["cvlp.py", *common, *clip, *stop], "anss": ["anss.py", *common], "lgr": ["lgr.py", *common, *stop],
            "fc_clip": ["lgr.py", *common, *clip, "--init", "clip", "--head", "fc", *stop],
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


def last_line(path):
    with open(path, errors="replace") as f:
        return ([line.strip() for line in f if line.strip()] or [""])[-1]


def measure(name, argv, log_dir, mem_cap, timeout):
    """Run one stage; its wall time, peak tree RSS (polled every 0.2 s), ru_maxrss, status and error line."""
    cap = (lambda: resource.setrlimit(resource.RLIMIT_AS, (mem_cap, mem_cap))) if mem_cap else None
    out, err = (os.path.join(log_dir, f"{name}.{k}") for k in ("out", "err"))
    print(f"[{name}] python {' '.join(argv)}", flush=True)
    with open(out, "w") as f_out, open(err, "w") as f_err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], stdout=f_out, stderr=f_err,
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
    r = {"stage": name, "command": "python " + " ".join(argv), "wall_s": round(wall, 1), "peak_rss_tree_bytes": peak,
         "max_rss_process_bytes": usage.ru_maxrss * 1024, "status": state, "load_avg": round(os.getloadavg()[0], 1),
         "error": last_error(err) if rc else "", "last_output": last_line(out), "gpu_peak_gib": gpu_peak(err)}
    gpu = "" if r["gpu_peak_gib"] is None else f", peak GPU memory {r['gpu_peak_gib']:.2f} GiB"
    print(f"  {state}: {wall:.1f} s, peak RSS {gb(peak)} GiB (tree), {gb(r['max_rss_process_bytes'])} GiB (largest "
          f"process){gpu}\n  " + (f"error: {r['error']}" if rc else r["last_output"][:160]), flush=True)
    return r


def gpu_peak(err_log):
    """The stage's peak GPU memory (GiB allocated) from the line engine.report_gpu_memory writes; None without one."""
    with open(err_log, errors="replace") as f:
        found = re.findall(r"peak GPU memory: ([0-9.]+) GiB allocated", f.read())
    return float(found[-1]) if found else None


def last_error(err_log):
    """The line that says why a stage failed: its last line, unless that is the GPU memory report."""
    with open(err_log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("peak GPU memory:")]
    return (lines or [""])[-1]


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
    lines = [f"`python rehearse.py {report['data']} --fraction {report['fraction']:g}`, {report['date']}: "
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
    return probe.stdout.strip() or f"{device} (not available: {last_line_of(probe.stderr)})"


def last_line_of(text):
    return ([line.strip() for line in text.splitlines() if line.strip()] or [""])[-1]


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
