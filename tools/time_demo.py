"""The README's first command, timed: each of its stages by the wall clock, in a fresh clone of each commit asked for
(the world generated anew, the corpora tokenised into an empty cache), the commits taken in turn so that a drift of
the machine falls on all of them alike. BENCHMARKS.md's section on the first command comes from it.

    python -m tools.time_demo e44d62e HEAD --repeat 2      # e44d62e, HEAD, e44d62e, HEAD: seconds per stage, and
                                                           # the table each run printed

The command is read from each commit's own README (the line `pip install -r requirements.txt && python cvlp.py && ...`),
its pip install left out: the packages must be installed already, as after the first command's own install. The
clones go to a new temporary folder, removed at the end (`--keep` keeps them, with each stage's output). Nothing else
should run on the machine meanwhile.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from util import flags
from util.engine import run_stage
from util.records import device_name
from util.errors import DataError

INSTALL = "pip install -r requirements.txt && "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR: the README's first command timed stage by stage, in fresh clones")
    p.add_argument("commits", nargs="+", metavar="COMMIT", help="commits (or branches, tags) of the repository")
    p.add_argument("--repeat", type=flags.count, default=2, help="runs of each commit, taken in turn")
    p.add_argument("--repo", default=ROOT, help="the repository to clone (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the clones, their run folders and each stage's output")
    return p.parse_args(argv)


def first_command(readme):
    """The stages of the README's first command: the line of README.md that starts with its pip install, split at
    '&&', the install left out."""
    for line in readme.splitlines():
        if line.startswith(INSTALL):
            return [stage.strip() for stage in line[len(INSTALL):].split("&&")]
    raise DataError(f"README.md holds no line starting {INSTALL.strip()!r}: no first command to time")


def clone(repo, commit, folder):
    """A fresh clone of repo at commit in folder."""
    for cmd in (["git", "clone", "-q", repo, folder], ["git", "-C", folder, "checkout", "-q", commit]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise DataError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1]}")


def time_stages(folder):
    """Run the first command of the clone in folder, stage by stage, as the README's shell would (python being this
    interpreter); -> ({stage: seconds}, the last stage's output)."""
    with open(os.path.join(folder, "README.md")) as f:
        stages = first_command(f.read())
    env = {**os.environ, "VL_LTR_CACHE": os.path.join(folder, ".token_cache")}   # an empty tokenised-corpus cache
    seconds, out = {}, ""
    for stage in stages:
        argv = [sys.executable if a == "python" else a for a in shlex.split(stage)]
        t0 = time.perf_counter()
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
        seconds[stage] = time.perf_counter() - t0
        out = done.stdout
        with open(os.path.join(folder, f"stage{len(seconds)}.log"), "w") as f:
            f.write(done.stdout + done.stderr)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise DataError(f"{stage!r} in {folder} exited {done.returncode}: {last}")
    return seconds, out


def run(args):
    work = tempfile.mkdtemp(prefix="time_demo_")
    print(f"{device_name('cpu')}, {os.cpu_count()} cores; torch {torch.__version__}; clones in {work}")
    runs = []                                                    # (commit, {stage: seconds}, last output)
    try:
        for r in range(args.repeat):
            for i, commit in enumerate(args.commits):
                folder = os.path.join(work, f"{r}_{i}")
                clone(args.repo, commit, folder)
                print(f"[time_demo] run {r + 1}/{args.repeat} of {commit} ...", flush=True)
                seconds, out = time_stages(folder)
                print(f"[time_demo] {commit}: {sum(seconds.values()):.1f} s", flush=True)
                runs.append((commit, seconds, out))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args.commits, runs))


def report(commits, runs):
    """Seconds per stage of every run (a column each) and the totals; each commit's mean time, and the first commit's
    mean over it (above 1: that commit is faster); then the end of what each run's last stage printed."""
    lines, totals = [], {}
    for commit in commits:
        mine = [s for c, s, _ in runs if c == commit]
        totals[commit] = [sum(s.values()) for s in mine]
        lines.append(f"\n{commit}: seconds per stage, {len(mine)} run(s)")
        for stage in mine[0]:
            lines.append(f"  {stage:<40s}" + "".join(f"{s.get(stage, float('nan')):>9.1f}" for s in mine))
        lines.append(f"  {'the first command':<40s}" + "".join(f"{t:>9.1f}" for t in totals[commit]))
    means = {c: sum(t) / len(t) for c, t in totals.items()}
    lines.append("")
    for commit in commits:
        lines.append(f"{commit}: mean {means[commit]:.1f} s; {means[commits[0]] / means[commit]:.2f}x the speed of "
                     f"{commits[0]}")
    for commit, _, out in runs:
        lines.append(f"\n{commit}, the last stage printed:\n" + "\n".join(out.strip().splitlines()[-9:]))
    return "\n".join(lines)


def main(argv=None):
    run_stage(run, get_args(argv))


if __name__ == "__main__":
    main()
