"""Files written whole or not at all: a crash, a kill or a full disk leaves the previous file, never half of one.
Every checkpoint, record and JSON file of a run is written through atomic_write.

The temporary file is named <file>.tmp-<host>-<pid> (temporary_name). A process killed without warning (SIGKILL:
the out-of-memory killer, a lost node) leaves it behind, at ViT-B/16 size gigabytes each time; the next stage that
starts in the run folder removes the ones whose process is gone (remove_stale_temporaries). The host is in the
name because under torchrun on a shared filesystem the process ids of another machine mean nothing here: its
files are left alone, alive or not.
"""
import os
import re
import socket

TEMPORARY = re.compile(r"^(?P<file>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")    # temporary_name's pattern


def host():
    """This machine's name as temporary names carry it (no path separator, no dash-digits ambiguity: the pid is
    after the last dash)."""
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def temporary_name(path):
    """<path>.tmp-<host>-<pid>: the temporary file this process writes `path` through."""
    return f"{path}.tmp-{host()}-{os.getpid()}"


def atomic_write(path, write_fn, mode="wb"):
    """Write `path` via a temporary file in the same directory and os.replace: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid):
    """True when a process with this id runs on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                     # it exists, it is someone else's
        return True
    return True


def stale_temporaries(folder):
    """The temporary files in `folder` (not below it) that this machine's processes left and that no running process
    will finish: the host in the name is this one and its process is gone. Another machine's, a live process's and
    any file not named by temporary_name are not in the list."""
    if not os.path.isdir(folder):
        return []
    stale = []
    for name in sorted(os.listdir(folder)):
        m = TEMPORARY.match(name)
        if m and m["host"] == host() and int(m["pid"]) != os.getpid() and not process_alive(int(m["pid"])):
            stale.append(os.path.join(folder, name))
    return stale


def remove_stale_temporaries(folder):
    """Remove stale_temporaries(folder); one line says what was removed (nothing is said when there was none).
    Returns the removed paths. A file another process removed meanwhile is passed over."""
    removed, size = [], 0
    for path in stale_temporaries(folder):
        try:
            size += os.path.getsize(path)
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        names = ", ".join(os.path.basename(p) for p in removed)
        print(f"removed {len(removed)} temporary file{'s' * (len(removed) > 1)} ({size / 2 ** 20:.1f} MiB) left in "
              f"{folder} by stopped processes of this machine: {names}")
    return removed
