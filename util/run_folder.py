"""A run folder's files: what each was made from (lineage), and what a training stage does with a checkpoint that is
already there (it never trains over one by accident).

Lineage. Every checkpoint keeps "state_hash", the content hash of its saved state (state_hash), and every file a
stage writes names the files of the run it was made from by theirs, {file name: state hash} under "made_from":

    cvlp.pt                        CLIP's weights only: nothing of the run
    anchor_embeds.pt, anchors.json cvlp.pt                       (--init clip: anchor_embeds_clip.pt, nothing)
    lgr.pt, lgr_best.pt            cvlp.pt, anchor_embeds.pt     (--init clip: lgr_clip.pt, anchor_embeds_clip.pt)
    fc.pt, fc_best.pt              cvlp.pt                       (--init clip: fc_clip.pt, nothing)
    eval.json                      every checkpoint it read

The hash is of the state, not of the file's name or place: a copy of cvlp.pt keeps it, a checkpoint advanced by
--resume gets another. A file is stale when a file it was made from is there now in another state; a stage that
would read it with that file refuses in one line that names it and the command that makes it again (check_file):
lgr.py before training, evaluate.py for the whole folder before it reads anything (check_folder), predict.py. A
file written before lineage was kept names nothing and is taken as it is.

Overwriting (already_finished). cvlp.py and lgr.py look at their checkpoint in --out before any work: finished and
made with the same settings from the same files, they say so in one line and stop (exit 0: a finished command can
be run again); unfinished or made otherwise, they stop with one line naming the three ways on: --resume, another
--out, or --overwrite, which sets the old run's record aside in <out>/replaced/ and trains anew. anss.py likewise
stops when its anchors were made from the cvlp.pt there now with the same settings (anss.up_to_date).
"""
import datetime
import hashlib
import importlib
import os
import shlex
import shutil

import torch

from util.errors import DataError, OverwriteError, StaleError
from util.records import records_path

# What a checkpoint's state is: the weights (cvlp.py, lgr.py) or the anchors (anss.py), and where training stood.
STATE_KEYS = ("model", "embeds", "mask")
# Flags that do not change what a training run computes, left out when a checkpoint's settings are compared with a
# command's (other_settings): where it runs and how fast (device, workers, loader, compile), what else it writes
# (tensorboard, save_every), how it starts or stops (resume, overwrite, stop_after_steps: a finished checkpoint ran
# every epoch), out, which is the folder itself (spelt one way or another), and head_form and text_pass, two exact forms
# of one computation (the same values and gradients up to rounding).
SAME_RESULT = {"device", "workers", "loader", "compile", "tensorboard", "save_every", "stop_after_steps", "resume",
               "overwrite", "out", "head_form", "text_pass"}
NOT_REPEATED = {"resume", "stop_after_steps", "num_classes", "overwrite"}   # not repeated in a command()
# The files a run folder may hold whose lineage evaluate.py checks, in the pipeline's order.
CHECKED = ("anchor_embeds.pt", "anchor_embeds_clip.pt", "lgr.pt", "lgr_best.pt", "fc.pt", "fc_best.pt",
           "lgr_clip.pt", "lgr_clip_best.pt", "fc_clip.pt", "fc_clip_best.pt")


def best_path(path):
    """<out>/<stem>_best.pt, the checkpoint of a run's best val epoch, beside <out>/<stem>.pt."""
    return os.path.splitext(path)[0] + "_best.pt"


# ----------------------------------------------------------------------------------------------
# The state of a file


def state_hash(ckpt):
    """The content hash of a checkpoint's state, 64 hex digits: SHA-256 over each tensor of "model", "embeds" and
    "mask" in name order (its name, dtype, shape, then its bytes), then "position <epoch> <batch>" where the
    checkpoint has a position. Two checkpoints with equal hashes hold the same weights (or anchors) at the same point
    of training, whatever else they record (arguments, optimiser, dates)."""
    h = hashlib.sha256()
    for key in STATE_KEYS:
        if key in ckpt:
            add_tensors(h, key, ckpt[key])
    if isinstance(ckpt.get("position"), dict):
        h.update(f"position {ckpt['position']['epoch']} {ckpt['position']['batch']}".encode())
    return h.hexdigest()


def add_tensors(h, name, value):
    """Feed a tensor, or a dict of them (a state dict), to the hash h: name, dtype and shape, then the bytes."""
    if isinstance(value, dict):
        for k in sorted(value):
            add_tensors(h, f"{name}.{k}", value[k])
    elif torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def state(ckpt):
    """The state hash a checkpoint keeps, or computed for one written before it was kept."""
    return ckpt.get("state_hash") or state_hash(ckpt)


def small_entries(path):
    """A checkpoint's dict with its tensors left on disk (mmap: only what is read is read); None when there is no
    such file or it is not a readable checkpoint (the stage that loads it says why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def state_of(path):
    """The state hash of the checkpoint at path; None when it is not there or cannot be read."""
    ckpt = small_entries(path)
    return None if ckpt is None else state(ckpt)


def states(folder, names):
    """{name: state hash} of the checkpoints `names` in folder (the made_from of a file made from them)."""
    return {name: state_of(os.path.join(folder, name)) for name in names}


# ----------------------------------------------------------------------------------------------
# Lineage: refuse to mix files made from different states


def stale_input(path, made_from):
    """(name, hash then, hash now) of the first file of made_from that is there beside path in another state, or
    None. A file that is not there, or cannot be read, is not compared: nothing of it can be mixed in (the stage that
    needs it says it is missing)."""
    for name, was in (made_from or {}).items():
        now = state_of(os.path.join(os.path.dirname(path), name))
        if now is not None and now != was:
            return name, was, now
    return None


def check_file(path, entries=None):
    """Refuse, in one line, the checkpoint at path when it is stale (stale_input): the line names it, the file it was
    made from and the command that makes it again. entries: its small_entries, when already read."""
    entries = entries if entries is not None else small_entries(path)
    stale = stale_input(path, (entries or {}).get("made_from"))
    if stale:
        name, was, now = stale
        raise StaleError(f"{path} is stale: it was made from another {name} (state {was[:10]}, the one there now is "
                         f"{now[:10]}); make it again: {remake(path, entries)}")


def check_folder(folder):
    """check_file for every file of the folder whose lineage is kept (CHECKED), in the pipeline's order, so that the
    first one named is where the run went out of step."""
    for name in CHECKED:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            check_file(path)


def remake(path, entries):
    """The command that makes the stale file at path again, from the arguments it keeps, with --out where it is now:
    anss.py's as it was run; lgr.py's with --overwrite, as the stale checkpoint is in the way."""
    stage, saved = entries.get("stage"), {**entries.get("args", {}), "out": os.path.dirname(path)}
    return command(stage, saved, extra=["--overwrite"] if stage == "lgr" else [])


# ----------------------------------------------------------------------------------------------
# A checkpoint already in --out


def already_finished(path, args, made_from=None):
    """What a training stage does about the checkpoint at path, before any work. made_from: {file: state hash} of the
    run's files this run starts from (lgr.py: cvlp.pt, anchor_embeds.pt). True: it is finished, made with the same
    settings (other_settings) from the same files, and one line says so: nothing to do. False: go on (no checkpoint;
    --resume; --overwrite, after set_aside). Otherwise one line, and the checkpoint stays as it is:
    OverwriteError naming --resume, another --out and --overwrite; StaleError for --resume from other files."""
    if args.resume and args.overwrite:
        raise DataError("--resume continues the checkpoint in --out and --overwrite replaces it: pass one of them")
    if not os.path.exists(path):
        return False
    ckpt, made_from = small_entries(path), made_from or {}
    if args.resume:
        moved = other_inputs(ckpt, made_from) if ckpt is not None else []
        if moved:
            raise StaleError(f"{path} was made from another {' and '.join(moved)} than {args.out} holds now: --resume "
                             f"would continue it on other inputs; train it again with --overwrite instead of --resume")
        return False
    if args.overwrite:
        set_aside(path)
        return False
    if ckpt is None or not isinstance(ckpt.get("args"), dict):
        raise OverwriteError(f"{path} is there but is not a readable checkpoint; keep it and write to another --out, "
                             f"or replace it with --overwrite")
    pos, epochs = ckpt.get("position", {}), ckpt["args"].get("epochs")
    if (pos.get("epoch"), pos.get("batch")) != (epochs, 0):
        raise OverwriteError(f"{path} holds an unfinished run (epoch {pos.get('epoch', 0) + 1}/{epochs}, batch "
                             f"{pos.get('batch', 0)}): continue it with --resume, write to another --out, or replace "
                             f"it with --overwrite")
    differ = other_settings(ckpt["args"], args) + [f"made from another {f}" for f in other_inputs(ckpt, made_from)]
    if differ:
        raise OverwriteError(f"{path} holds a finished run made otherwise ({'; '.join(differ[:3])}"
                             f"{'; ...' if len(differ) > 3 else ''}): continue it with --resume, write to another "
                             f"--out, or replace it with --overwrite")
    if is_rank_0():
        print(f"{path} is finished ({epochs}/{epochs} epochs) and was made with these settings: nothing to do "
              f"(--overwrite trains it again)")
    return True


def other_inputs(ckpt, made_from):
    """The files (names) a checkpoint was made from in another state than `made_from` names them now, in name order;
    [] for a checkpoint written before lineage was kept."""
    was = ckpt.get("made_from", made_from)
    return [name for name in sorted(set(was) | set(made_from)) if was.get(name) != made_from.get(name)]


def other_settings(saved, args):
    """Where this command's arguments differ from those a checkpoint saved, one "--flag X here, Y there" each; []
    when they are the same settings. Flags in SAME_RESULT are not compared, nor a flag the checkpoint does not
    record (the code that wrote it had no such flag)."""
    return [f"--{k.replace('_', '-')} {v} here, {saved[k]} there" for k, v in sorted(vars(args).items())
            if k not in SAME_RESULT and k in saved and saved[k] != v]


def set_aside(path):
    """--overwrite: the old run's record <stem>.jsonl moves to <out>/replaced/<stem>-<date>.jsonl, where it stays
    readable, and its <stem>_best.pt (the best epoch of the run being replaced) is removed; the checkpoint itself
    stays until the new run's first save replaces it. One line says so. Rank 0 alone under torchrun."""
    if not is_rank_0():
        return
    record, moved = records_path(path), []
    if os.path.exists(record):
        folder = os.path.join(os.path.dirname(path), "replaced")
        os.makedirs(folder, exist_ok=True)
        stem = os.path.splitext(os.path.basename(record))[0]
        stamp = datetime.datetime.fromtimestamp(os.path.getmtime(record)).strftime("%Y%m%d-%H%M%S")
        target, n = os.path.join(folder, f"{stem}-{stamp}.jsonl"), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(folder, f"{stem}-{stamp}-{n}.jsonl")
        shutil.move(record, target)
        moved.append(f"its record moved to {target}")
    if os.path.exists(best_path(path)):
        os.remove(best_path(path))
        moved.append(f"{os.path.basename(best_path(path))} removed")
    print(f"replacing {path} (--overwrite)" + (": " + ", ".join(moved) if moved else ""))


def is_rank_0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ----------------------------------------------------------------------------------------------
# Commands: what to type to make a file again (also tools/status.py's)


def command(script, saved, extra=(), keys=None, resume=False, world_size=1):
    """`python SCRIPT.py ...` with `extra` and the flags of `saved` (a run's arguments; only `keys` of them, when
    given) whose values differ from the script's defaults, then --resume if asked. torchrun runs (world_size > 1)
    get torchrun's launcher. The script's defaults are its own get_args' (imported by name when called)."""
    module = importlib.import_module(script)
    wanted = {k: v for k, v in saved.items() if k not in NOT_REPEATED and (keys is None or k in keys)}
    if world_size > 1 and str(wanted.get("device", "")).startswith("cuda"):
        wanted.pop("device")                                     # torchrun gives each rank its own GPU
    argv = ["--data", str(saved["data"]), *extra]
    defaults = parsed(module, argv)
    for k in sorted(wanted, key=lambda k: k not in ("backbone", "pretrained", "init", "head")):   # they set others
        differs = k in defaults and defaults[k] != wanted[k] or not defaults and k != "data"   # {}: not yet parsable
        if differs and flag(k, wanted[k]):
            argv += flag(k, wanted[k])
            defaults = parsed(module, argv)
    launcher = f"torchrun --standalone --nproc-per-node {world_size}" if world_size > 1 else "python"
    return f"{launcher} {script}.py " + " ".join(shlex.quote(a) for a in argv + ["--resume"] * resume)


def parsed(module, argv):
    """vars() of the script's arguments for argv, with its per-dataset defaults filled in; {} when refused."""
    try:
        return vars(module.get_args(argv))
    except SystemExit:
        return {}


def flag(key, value):
    """The command-line words that set argument `key` to `value` ([] for None, which no flag sets)."""
    name = "--" + key.replace("_", "-")
    if value is None:
        return []
    if isinstance(value, bool):
        return [name] if value else ["--no-" + key.replace("_", "-")]
    return [name, *map(str, value)] if isinstance(value, list) else [name, str(value)]
