"""Progress that is never silent: a tqdm bar on a terminal, a plain line every 30 seconds in a log file (nohup,
slurm, torchrun, CI). torchrun: rank 0 alone reports."""
import os
import sys
import time

from tqdm import tqdm

LOG_EVERY = 30.0   # seconds between progress lines when the output is a log file, not a terminal


def progress(iterable, total=None, desc="", unit="it"):
    """A tqdm progress bar on a terminal. When stderr is not a terminal (nohup, slurm, torchrun logs, CI), a
    plain line every LOG_EVERY seconds instead (LogLines), so that a long phase is never silent in a log.
    torchrun: rank 0 alone reports."""
    if os.environ.get("RANK", "0") != "0":
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return LogLines(iterable, total, desc, unit)


class LogLines:
    """Iterate like tqdm, but write "desc: 120/452 batch (27%), 3.1 batch/s, 39 s, ~1 min left  loss=..."
    to stderr at most once every `every` seconds, and a closing line when the loop took longer than that.
    set_postfix(**values) adds values to the next line, as tqdm's does."""

    def __init__(self, iterable, total=None, desc="", unit="it", every=None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = LOG_EVERY if every is None else every
        self.postfix, self.n = "", 0

    def set_postfix(self, **values):
        self.postfix = "  " + " ".join(f"{k}={v}" for k, v in values.items())

    def line(self, elapsed, done=False):
        rate = self.n / max(elapsed, 1e-9)
        speed = f"{rate:.2f}" if rate < 10 else f"{rate:.0f}"
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = (f", ~{duration((self.total - self.n) / rate)} left" if self.total and rate > 0 and not done else "")
        return (f"{self.desc}: {'done, ' if done else ''}{self.n}{of} {self.unit}{pct}, {speed} {self.unit}/s, "
                f"{duration(elapsed)}{left}{self.postfix}")

    def __iter__(self):
        start = last = time.monotonic()
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.monotonic()
            if now - last >= self.every:
                print(self.line(now - start), file=sys.stderr, flush=True)
                last = now
        if last > start or self.every == 0:                      # reported along the way: say it ended
            print(self.line(time.monotonic() - start, done=True), file=sys.stderr, flush=True)

    def __len__(self):
        return self.total


def duration(seconds):
    """12 s, 3 min, 2.5 h: a rough length of time for a progress line."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
