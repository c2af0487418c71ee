"""Errors: each kind its own class, and the one line a stage stops with (fail), never a traceback. Every stage's
main() runs through engine.run_stage, which turns a StageError into that line (exit status 2)."""
import re
import sys

import torch


class StageError(Exception):
    """A run cannot go on. The message is one line: what is wrong and how to fix it."""


class DataError(StageError):
    """Bad input: a dataset file or image, a text corpus, CLIP weights, a flag that does not fit the data."""


class CheckpointError(StageError):
    """A run's own file is missing, unreadable, or made by another run (dataset, backbone, weights, classes)."""


class OverwriteError(CheckpointError):
    """A training stage would overwrite a checkpoint in --out that is unfinished or was made with other settings."""


class StaleError(CheckpointError):
    """A file of the run was made from another state of a file it depends on (cvlp.pt -> anchors -> lgr.pt): reading
    the two together would mix two runs."""


class DivergedError(StageError):
    """The training loss became NaN or infinite."""


class GPUMemoryError(StageError):
    """The GPU ran out of memory."""


class DiskError(StageError):
    """A file could not be written: a full disk, a folder without permission."""


def out_of_memory(e):
    """True for torch's out-of-memory errors: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "alloc" in str(e).lower()


def fail(message):
    """Print a one-line error (no traceback) and exit with status 2. Used by every stage's main().
    A StageError raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its last line."""
    message = str(message).strip().splitlines()[-1] if str(message).strip() else "unknown error"
    message = re.sub(r"^([\w.]+\.)?\w+Error: ", "", message)
    sys.stderr.write(f"error: {message}\n")                    # write, not print: under torchrun every rank's errors show
    sys.exit(2)


def warn(message):
    """One "warning: ..." line on stderr (no warnings-module source line)."""
    print(f"warning: {message}", file=sys.stderr)
