"""The GPU check: every measurement of this project that needs a CUDA GPU, in one run, most valuable first.

    python -m tools.gpu_check OUT                         # on a CUDA machine: the parts that fit in --budget (450 s)
    python -m tools.gpu_check OUT --parts env,tests,step  # the CVLP step's new path against the old: 8 minutes at most
    python -m tools.gpu_check OUT --wheels .whl           # open_clip, torchcodec not installed: wheels from a folder
    python -m tools.gpu_check OUT --parts demo,rehearse   # some parts only (names below), in the order given
    python -m tools.gpu_check OUT --dry-run               # tiny sizes on the CPU, about a minute: the script checked

Parts, in order, each a subprocess with its own time limit, all under one --budget:
  env       torch / CUDA / GPU versions, a bf16 matmul and a device-to-device copy: the machine's two ceilings
  tests     tests/test_cuda.py: the CUDA path against the CPU and fp32 paths (bf16, LGR head, fused AdamW, nvjpeg,
            compile, evaluation, out of memory, the packed text tower, a step without host waits)
  step      bench.py's CVLP step at batch 256, 224 px, as cvlp.py runs it (packed text, no host waits, channels_last,
            the teacher cast once, the compiled loss) against the best paths of before, ViT-B/16 (plain) then RN50
            (plain, fast + compile): samples/s, peak memory, compile time, a torch.profiler table of each new
            compiled step; 5 minutes at most, compiling included (what does not fit is named for a second run)
  loaders   bench.py's loader section: --loader pil and gpu feeding 224 px training crops; and its decoders
  heads     bench_heads.py: inference of the LGR head against the FC head (batch 1 latency, batch 256), and the
            LGR head's training step, Eq. 4-7 as written against the gram form, at ImageNet-LT and iNat shapes
  demo      the README's first command (less its pip install), timed, in a fresh folder: a new user's first run
  rehearse  rehearse.py imagenet_lt on the GPU: every stage at ImageNet-LT's full size, time and peak GPU memory

OUT receives gpu_check.log (every part's output, as it comes), gpu_check.json (every part's status, time and
numbers; rewritten after each part, so a run cut short keeps what it measured) and the rehearsal's report. This
file imports nothing outside the standard library (and util/flags.py, which imports only it): open_clip may be
missing until --wheels installs it.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from util import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the stage scripts
PARTS = ("env", "tests", "step", "loaders", "heads", "demo", "rehearse")
LIMITS = {"env": 40, "tests": 150, "step": 300, "loaders": 50, "heads": 45, "demo": 100,
          "rehearse": 240}   # seconds each part may take at most on the GPU; the --budget may leave it less
# part step: the CVLP step's targets, twice the official code's samples/s on one H100 within its memory
STEP_TARGETS = {"ViT-B-16": {"samples_s": 2060, "peak_gib": 29.6}, "RN50": {"samples_s": 2250, "peak_gib": 20.6}}
# part step: per backbone, the paths in the order they run (most valuable first: a command stopped at its limit
# keeps what it measured) and the share of the part's time its command may take at most (RN50: all that is left).
# The best paths of before: ViT-B/16 plain; RN50 fast + compile, with plain, the best uncompiled one, before it in case
# its compile does not fit (it took 73 s on an H200, and the new step's compile is larger; torch.compile's caches
# on disk shorten a second run's).
STEP_PATHS = {"ViT-B-16": (["packed+compile", "plain", "packed"], 0.45),
              "RN50": (["packed+compile", "plain", "packed", "fast+compile"], 1.0)}

ENV_PROBE = r"""
import json, platform, sys, time
import torch, torchvision, open_clip
cuda = torch.cuda.is_available() and not DRY
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "torchvision": torchvision.__version__, "open_clip": open_clip.__version__, "cpus": __import__("os").cpu_count()}
device, n = ("cuda", 8192) if cuda else ("cpu", 256)
if cuda:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
def timed(fn, repeat=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize() if cuda else None
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize() if cuda else None
    return (time.perf_counter() - t0) / repeat
a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))   # random data, not zeros
info["bf16_matmul_tflops"] = round(2 * n ** 3 / timed(lambda: a @ b) / 1e12, 1)
x = torch.randn(2 ** 28 if cuda else 2 ** 20, device=device)                      # 1 GiB of fp32 on the GPU
y = torch.empty_like(x)
info["copy_gb_s"] = round(2 * x.numel() * 4 / timed(lambda: y.copy_(x)) / 1e9, 0)   # bytes read + written
print(json.dumps(info))
"""


# --dry-run: each part's limit is the GPU's times this. The dry run checks that the commands fit together, on whatever
# CPU runs the tests (a slow 2-core one takes minutes where the GPU's limits count seconds): no limit should end it.
DRY_RUN_SLACK = 20


def get_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for gpu_check.log, gpu_check.json and the rehearsal's report")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, run in the order given (default: "
                   f"{','.join(PARTS)})")
    p.add_argument("--budget", type=flags.positive, default=450, help="seconds for the whole run: a part gets at most what is "
                   "left, and parts that would start with under 10 s left are skipped")
    p.add_argument("--wheels", default=None, metavar="DIR", help="install DIR/*.whl (open_clip_torch, ftfy, wcwidth, "
                   "torchcodec) into a private folder first, for a machine whose Python lacks them and cannot download")
    p.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU (a minute): checks "
                   "that the script and the commands it runs still fit together")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown --parts {unknown}; choose from {','.join(PARTS)}")
    return args


# ----------------------------------------------------------------------------------------------
# Running the parts: a subprocess per command, its output into the log as it comes, killed at its limit


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        os.makedirs(args.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="gpu_check_")      # scratch: benches' JSON, demo folder, rehearsal tree
        self.log = open(os.path.join(args.out, "gpu_check.log"), "a", buffering=1)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "VL_LTR_CACHE": os.path.join(self.work, "token_cache")}
        self.summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run,
                        "budget_s": args.budget, "parts": {}}

    def left(self):
        return self.args.budget - (time.time() - self.t0)

    def write_summary(self):
        path = os.path.join(self.args.out, "gpu_check.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.summary, f, indent=1)
        os.replace(path + ".tmp", path)

    def command(self, argv, limit, cwd=ROOT):
        """Run argv (python scripts of this project run with this Python), its output into the log; returns
        {"command", "rc", "wall_s", "output"}; rc "timeout" when it ran past `limit` seconds (its process group killed)."""
        argv = [sys.executable if a == "python" else a for a in argv]
        shown = " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv).replace(sys.executable, "python")
        self.note(f"$ {shown}   (limit {limit:.0f} s)")
        t0, lines = time.time(), []
        proc = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                lines.append(line)
                self.log.write(line)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)                  # the stages save and stop on SIGTERM; then for sure
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
        reader.join(timeout=5)
        wall = round(time.time() - t0, 1)
        self.note(f"  -> {'exit ' + str(rc) if rc != 'timeout' else 'stopped at its limit'} after {wall} s")
        return {"command": shown, "rc": rc, "wall_s": wall, "output": "".join(lines)}

    def note(self, text):
        print(text, flush=True)
        self.log.write(text + "\n")


def part_status(commands):
    rcs = [c["rc"] for c in commands]
    return "ok" if all(rc == 0 for rc in rcs) else "timeout" if "timeout" in rcs else "failed"


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# The parts: each returns (the commands it ran, the numbers it found)


def part_env(run, limit):
    dry = run.args.dry_run
    c = run.command(["python", "-c", f"DRY = {dry}\n" + ENV_PROBE], limit)
    found = [line for line in c["output"].splitlines() if line.startswith("{")]
    results = json.loads(found[-1]) if found else {}
    smi = shutil.which("nvidia-smi")
    if smi and not dry:
        s = run.command([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 20)
        results["nvidia_smi"] = s["output"].strip()
        return [c, s], results
    return [c], results


def part_tests(run, limit):
    c = run.command(["python", "-m", "pytest", "-q", "-rA", "-s", "-p", "no:cacheprovider", "tests/test_cuda.py"], limit)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", c["output"].splitlines()[-1]
                                               if c["output"].strip() else "")}
    printed = [line.strip() for line in c["output"].splitlines()
               if re.match(r"^\.*(bf16 vs|nvjpeg vs|eval loader|predictions with)", line)]
    return [c], {"counts": counts, "measured": printed,
                 "failed": re.findall(r"^FAILED (\S+)", c["output"], flags=re.M)}


def bench(run, limit, name, flags, tool="tools.bench"):
    path = os.path.join(run.work, f"{name}.json")
    sizes = []
    if run.args.dry_run:
        sizes = ["--backbone", "shapes-tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--classes", "50",
                 "--threads", "1"]                                # two threads on a busy CPU stall on each other
        sizes += (["--head-shapes", "run"] if tool == "tools.bench_heads" else
                  ["--batch", "16", "--loader-batches", "2", "--workers", "0", "--decode-images", "8"])
    c = run.command(["python", "-m", tool, *flags, *sizes, "--json", path], limit)
    return [c], read_json(path) or {}


def part_step(run, limit):
    """bench.py's CVLP step for ViT-B/16, then RN50 (the rest of the part's time), the new paths first; each
    +compile path's compile time (its first call: the compiles and one forward) and what did not fit, left for a
    second run (torch.compile's caches on disk make a second run's compiles much shorter)."""
    commands, results, t0 = [], {}, time.time()
    for backbone, (paths, share) in STEP_PATHS.items():
        left = limit - (time.time() - t0)
        flags = ["--backbone", backbone, "--sections", "cvlp", "--paths", *paths, "--profile", "packed+compile"]
        if run.args.dry_run:
            flags += ["--compile-backend", "eager"]
        c, found = bench(run, min(left, share * limit), f"step_{backbone}", flags)
        commands += c
        cvlp = found.get("cvlp", {})
        measured = {p: {k: r[k] for k in ("samples_s", "seconds", "peak_gib", "flop", "tflop_s", "loss", "first_call_s")}
                    for p, r in cvlp.items()}
        steps = found.get("args", {}).get("steps", 0)
        compile_s = {p: round(r["first_call_s"], 1) for p, r in cvlp.items() if p.endswith("+compile")}   # with 1 forward
        new = max((r["samples_s"] for p, r in cvlp.items() if p.startswith("packed")), default=None)
        old = max((r["samples_s"] for p, r in cvlp.items() if not p.startswith("packed")), default=None)
        target = STEP_TARGETS[backbone]
        results[backbone] = {"paths": measured, "compile_s": compile_s, "steps": steps,
                             "left_for_a_second_run": [p for p in paths if p not in cvlp],
                             "new_over_old": round(new / old, 2) if new and old else None, "target": target,
                             "met": bool(new and new >= target["samples_s"] and all(
                                 r["peak_gib"] <= target["peak_gib"] for p, r in cvlp.items() if p.startswith("packed")))}
    return commands, results


def part_loaders(run, limit):
    return bench(run, limit, "loaders", ["--backbone", "RN50", "--sections", "loader", "decode"])


def part_heads(run, limit):
    return bench(run, limit, "heads", ["--backbone", "RN50", "--head-shapes", "imagenet_lt", "inat2018", "inat2018_vit"],
                 tool="tools.bench_heads")


def part_demo(run, limit):
    """The README's first command after its pip install, stage by stage, in a fresh folder (the shapes_lt world
    and its CLIP stand-in made on first use, as for a new user). Dry run: one epoch, two steps, random weights."""
    folder = os.path.join(run.work, "demo")
    os.makedirs(folder, exist_ok=True)
    stages = [["cvlp.py"], ["anss.py"], ["lgr.py"], ["lgr.py", "--init", "clip", "--head", "fc"], ["evaluate.py"]]
    extra = {}
    if run.args.dry_run:
        clip = os.path.join(folder, "tiny_clip.pt")
        run.command(["python", "-c", "import sys, torch; from util import clip_models; torch.manual_seed(0); "
                     "torch.save(clip_models.create_clip('shapes-tiny', 32).state_dict(), sys.argv[1])", clip], 60)
        extra = {"cvlp.py": ["--epochs", "1", "--stop-after-steps", "2"], "lgr.py": ["--epochs", "1", "--stop-after-steps", "2"]}
        extra = {k: [*v, "--device", "cpu", "--clip-weights", clip] for k, v in extra.items()}
        extra.update({k: ["--device", "cpu", "--clip-weights", clip] for k in ("anss.py", "evaluate.py")})
    commands, t0 = [], time.time()
    for stage in stages:
        c = run.command(["python", os.path.join(ROOT, stage[0]), *stage[1:], *extra.get(stage[0], [])],
                        limit - (time.time() - t0), cwd=folder)
        commands.append(c)
        if c["rc"] != 0:
            break
    lines = commands[-1]["output"].splitlines() if commands[-1]["rc"] == 0 else []
    first = next((i for i, line in enumerate(lines) if "top-1 (%)" in line), len(lines))
    table = [line for line in lines[first:] if line.strip() and not line.startswith("peak GPU memory")]
    gpu = [float(m) for c in commands for m in re.findall(r"peak GPU memory: ([0-9.]+) GiB allocated", c["output"])]
    return commands, {"total_s": round(time.time() - t0, 1), "stages_s": {c["command"]: c["wall_s"] for c in commands},
                      "peak_gpu_gib": max(gpu) if gpu else None, "table": table}


def part_rehearse(run, limit):
    root = os.path.join(run.work, "rehearsal_imagenet_lt")
    flags = (["--fraction", "0.01", "--stages", "data,cvlp", "--stop-after-steps", "2", "--device", "cpu", "--workers",
              "0"] if run.args.dry_run else ["--device", "cuda", "--workers", "8"])
    c = run.command(["python", "-m", "tools.rehearse", "imagenet_lt", "--root", root, *flags], limit)
    for path in glob.glob(os.path.join(root, "rehearsal_imagenet_lt.*")):
        shutil.copy(path, run.args.out)
    return [c], read_json(os.path.join(root, "rehearsal_imagenet_lt.json")) or {}


# ----------------------------------------------------------------------------------------------


def install_wheels(run, folder):
    """pip install folder/*.whl (no index, no dependencies) into a private site folder on PYTHONPATH."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        sys.exit(f"error: --wheels {folder} holds no .whl files")
    site = os.path.join(run.work, "site")
    c = run.command([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--upgrade", "--target", site, *wheels], 120)
    if c["rc"] != 0:
        sys.exit(f"error: could not install the wheels in {folder} (see gpu_check.log)")
    run.env["PYTHONPATH"] = os.pathsep.join(p for p in [site, run.env.get("PYTHONPATH")] if p)


def main(argv=None):
    args = get_args(argv)
    run = Run(args)
    run.note(f"gpu check {run.summary['started']}: parts {','.join(args.parts)}, budget {args.budget:.0f} s"
             + (", dry run (CPU, tiny sizes)" if args.dry_run else ""))
    if args.dry_run:
        run.env["CUDA_VISIBLE_DEVICES"] = ""                      # the CPU, also on a GPU machine
    if args.wheels:
        install_wheels(run, args.wheels)
    try:
        for name in args.parts:
            limit = min(LIMITS[name] * (DRY_RUN_SLACK if args.dry_run else 1), run.left())
            if limit < 10:
                run.summary["parts"][name] = {"status": "skipped: out of budget"}
                run.note(f"\n== {name}: skipped, {run.left():.0f} s of the budget left")
                continue
            run.note(f"\n== {name} ({limit:.0f} s at most; {run.left():.0f} s of the budget left)")
            run.summary["parts"][name] = {"status": "running"}
            run.write_summary()
            t0 = time.time()
            commands, results = globals()[f"part_{name}"](run, limit)
            run.summary["parts"][name] = {"status": part_status(commands), "wall_s": round(time.time() - t0, 1),
                                          "limit_s": round(limit), "results": results,
                                          "commands": [{k: v for k, v in c.items() if k != "output"} for c in commands]}
            run.write_summary()
    finally:
        run.summary["wall_s"] = round(time.time() - run.t0, 1)
        run.write_summary()
        shutil.rmtree(run.work, ignore_errors=True)
    run.note("\n== summary")
    for name, part in run.summary["parts"].items():
        run.note(f"  {name:<11} {part['status']:<10} {part.get('wall_s', '-')} s")
    failed = [n for n, p in run.summary["parts"].items() if p["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
