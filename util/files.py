"""Files written whole or not at all: a crash, a kill or a full disk leaves the previous file, never half of one.
Every checkpoint, record and JSON file of a run is written through atomic_write."""
import os


def atomic_write(path, write_fn, mode="wb"):
    """Write `path` via a temporary file in the same directory and os.replace: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
