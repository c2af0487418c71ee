"""The training machinery every VL-LTR stage shares: how a stage runs (run_stage), precision, atomic files and
checkpoints, the training flags and optimiser both training stages use, and the training loop with exact resume
(cvlp.py and lgr.py both train through `fit`).

Nothing here is in the paper's equations; the stage scripts (cvlp.py, anss.py, lgr.py, evaluate.py) are.
Like MAE's engine_*.py: the stages import from this file, it imports from none of them. torchrun is
distributed.py's, the kinds of error errors.py's, CLIP models, their weights, tokens and embeddings
clip_models.py's.
"""
import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from util import flags
from util.distributed import agree, rank_world, stop_signal
from util.errors import (CheckpointError, DataError, DiskError, DivergedError, GPUMemoryError, StageError, fail,
                         warn)
from util.files import atomic_write, remove_stale_temporaries, temporary_name
from util.progress import progress
from util.records import run_records
from util.run_folder import best_path, state_hash

CODE_VERSION = "0.2.0"   # recorded in every checkpoint


def run_stage(run, args):
    """Run a stage's run(args): a StageError ends in the one-line error of fail(), never a traceback. On a GPU,
    fp32 matmuls run as TF32 (evaluation is fp32, docs/design.md §3; training's bf16 autocast is unaffected), and the
    stage ends with a line giving its peak GPU memory."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        run(args)
    except StageError as e:
        fail(e)
    except torch.cuda.OutOfMemoryError:                          # fit() says this with the batch to use; elsewhere
        fail(f"GPU out of memory on {args.device}; lower --batch, or run with fewer other processes on that GPU")
    finally:
        report_gpu_memory()
    if torch.distributed.is_initialized():                       # torchrun: leave the process group cleanly
        torch.distributed.destroy_process_group()


def one_process_only(script):
    """anss.py and evaluate.py run in one process (minutes even on ImageNet-LT): refuse torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail(f"{script} runs in one process: start it with plain `python {script} ...`, not torchrun")


def report_gpu_memory():
    """After a stage that used a GPU: one line on stderr with the most memory its tensors held at once (what a
    smaller GPU must have free) and what torch's caching allocator reserved (what nvidia-smi shows, less CUDA's own)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.max_memory_reserved() > 0:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved ({torch.cuda.get_device_name()})",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Precision


def autocast(device):
    """The training precision: bf16 autocast on CUDA, plain fp32 on CPU. Evaluation uses eval_precision."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextlib.contextmanager
def eval_precision(device, precision="fp32"):
    """The evaluation precision (docs/design.md §3): fp32 on every device, whatever the training ran in, so that an
    accuracy does not move with the training precision (bf16 changes predictions; evaluation is a small share
    of the time). Autocast is off for CPU and CUDA alike, also inside an enclosing training autocast; matmuls
    follow torch's float32 setting (TF32 on a GPU, set by run_stage). precision "fp16": fp16 autocast on
    CUDA, as the official evaluation runs (evaluate.py --released --eval-precision fp16); fp32 on a CPU."""
    fp16 = precision == "fp16" and str(device).startswith("cuda")
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        yield


def host_to_device(t, device):
    """A host tensor on `device` without the host waiting: copied from pinned (page-locked) memory, non_blocking (a
    copy from pageable memory waits for the work queued before it). t itself on a CPU."""
    if not str(device).startswith("cuda"):
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def values_to_host(values):
    """Logged values {name: tensor or number} on their way to the host without a wait: the tensors as fp32 in one
    non-blocking copy into pinned memory -> (the tensors' names, their (K,) values on the host, a CUDA event recorded
    after the copy, which the host can ask about without waiting; None off CUDA, where the values are there)."""
    names = [k for k, v in values.items() if torch.is_tensor(v)]
    numbers = torch.stack([values[k].detach().float().reshape(()) for k in names]) if names else torch.zeros(0)
    if not numbers.is_cuda:
        return names, numbers, None
    host = torch.empty(numbers.shape, pin_memory=True)
    host.copy_(numbers, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return names, host, event


def states_like_params(opt):
    """Each optimiser state of a parameter's shape in that parameter's memory layout. Fused AdamW steps a parameter
    and its states as flat arrays, so a state saved in another layout (a checkpoint of an RN50 trained in
    channels_last on a GPU, resumed where it is not, or the reverse) would be read in the wrong order."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def skip_if_not_finite(opt, losses):
    """Have the optimiser's next step() leave the weights and its state as they are when any of `losses` (device
    scalars) is not finite, decided on the device, so that nothing waits for the losses: an optimiser that takes
    GradScaler's found_inf (fused AdamW) skips its update where found_inf is 1. True when it will; False when the
    optimiser cannot (the caller reads the losses before the step). Training.optimizer_step removes found_inf."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    opt.found_inf = (~torch.isfinite(torch.stack(losses).float())).any().float()
    return True


# ----------------------------------------------------------------------------------------------
# Files and checkpoints: plain dicts, written atomically, checked before use


def run_file(args, stem, ext=".pt"):
    """A file of the run folder: <out>/<stem><ext>, with '_clip' before the extension for a run from plain CLIP
    weights instead of cvlp.pt (--init clip: Table 4 #2, the baseline): lgr.pt, fc_clip.pt, anchor_embeds_clip.pt."""
    return os.path.join(args.out, f"{stem}{'_clip' if getattr(args, 'init', None) == 'clip' else ''}{ext}")


def save_checkpoint(path, ckpt):
    """Atomically torch.save a plain dict (tensors, numbers, strings, dicts): loadable with weights_only. It gets its
    "state_hash" (run_folder.state_hash), by which the files made from it name it."""
    ckpt = {**ckpt, "state_hash": state_hash(ckpt)}
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        raise DiskError(f"cannot write {path} ({e.strerror}); free disk space or pass another --out "
                        f"(the previous checkpoint there is intact)")


def load_checkpoint(path, stage, made_by):
    """Load <stage>.pt with weights_only=True, or say which command makes it."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found; run `{made_by}` first (or pass --out to the right run folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]}); "
                              f"delete it and rerun `{made_by}`")
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        found = ckpt.get("stage") if isinstance(ckpt, dict) else "?"
        raise CheckpointError(f"{path} is not a {stage} checkpoint (stage {found}); check --out")
    if "pretrained" not in ckpt:                                 # every checkpoint records its CLIP weights' tag
        raise CheckpointError(f"{path} was written by an older version of this code; delete it and rerun `{made_by}`")
    return ckpt


def prepare_out(args):
    """Create the run folder and make sure we can write there before any work is done; remove the temporary files
    that stopped processes of this machine left there (files.remove_stale_temporaries: one process per machine
    under torchrun, its LOCAL_RANK 0)."""
    try:
        os.makedirs(args.out, exist_ok=True)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            remove_stale_temporaries(args.out)
        test = temporary_name(os.path.join(args.out, ".write_test"))    # per process: torchrun ranks share --out
        with open(test, "wb") as f:
            f.write(b"ok")
        os.remove(test)
    except OSError as e:
        raise DiskError(f"cannot write to --out {args.out} ({e.strerror}); choose a writable folder with free space")


def checkpoint_meta(args, stage, num_classes):
    """What made a checkpoint: refused on --resume or by the next stage when it does not match. "pretrained": the
    CLIP weights' tag, from which a later stage rebuilds the same model and image transforms."""
    return {"stage": stage, "data": args.data, "backbone": args.backbone, "pretrained": args.pretrained,
            "num_classes": num_classes, "variant": getattr(args, "variant", None), "version": CODE_VERSION}


def check_meta(ckpt, meta, path):
    for key in ("stage", "data", "backbone", "pretrained", "num_classes", "head"):
        if ckpt.get(key) != meta.get(key):
            fix = (f"pass --pretrained {ckpt[key]}, the tag it was made under" if key == "pretrained" and ckpt.get(key)
                   else "point --out at the matching run")
            raise CheckpointError(f"{path} is a {ckpt.get('stage')} checkpoint of {ckpt.get('data')}/"
                                  f"{ckpt.get('backbone')} with {ckpt.get('num_classes')} classes ({key} "
                                  f"{ckpt.get(key)!r}), but this run expects {key} {meta.get(key)!r}; {fix}, or rerun "
                                  f"the stage that writes it")


# ----------------------------------------------------------------------------------------------
# What both training stages share: flags, seeding, AdamW with the cosine schedule


def add_training_args(p, stage):
    """The training flags of cvlp.py and lgr.py. --epochs, --lr and --batch default to the dataset's row of
    data.DATASETS (data.fill_defaults(args, stage)). Each number's range is its type (util/flags.py)."""
    p.add_argument("--epochs", type=flags.count, default=None,
                   help="default: the dataset's (data.DATASETS; paper Sec. 4.3, 4.5)")
    p.add_argument("--batch", type=flags.count, default=None,
                   help="default: the dataset's (Sec. 4.3: CVLP 256, LGR 128); per "
                   "process under torchrun (global batch N x --batch)")
    p.add_argument("--lr", type=flags.positive, default=None, help="default: the dataset's (Sec. 4.3, 4.5)")
    p.add_argument("--wd", type=flags.non_negative, default=0.05, help="AdamW weight decay (Sec. 4.3) on weight matrices and kernels; "
                   "none on norms, biases (the official code's groups) and temperatures (parameter_groups)")
    p.add_argument("--warmup", type=flags.non_negative, default=None, help="warm-up epochs before the cosine decay (default: the "
                   "dataset's; the official code's: 5 in CVLP, 0 in fine-tuning)")
    p.add_argument("--min-lr", type=flags.non_negative, default=None, help="learning rate the cosine decay ends at (default: the "
                   "dataset's; the official code's: 0, 1e-5 in iNat's CVLP)")
    p.add_argument("--sampling", default="sqrt", choices=["sqrt", "instance"], help="Sec. 4.3: square-root")
    p.add_argument("--augment", default=None, choices=["randaug", "crop-flip"], help="training images (default: the "
                   "dataset's): randaug = crop, flip, RandAugment and random erasing, the official code's; crop-flip = "
                   "crop and flip alone (shapes_lt's; --loader gpu needs it)")
    p.add_argument("--loader", default="pil", choices=["pil", "gpu"],
                   help="gpu: workers only read the files; decoding and augmentation run batched on --device")
    p.add_argument("--resume", action="store_true", help=f"continue this stage from its checkpoint in --out ({stage})")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out with a new run (its "
                   "record moves to <out>/replaced/); without it a stage never trains over a checkpoint: finished with "
                   "the same settings it says so and stops, else it asks for --resume, another --out or --overwrite")
    p.add_argument("--save-every", type=flags.non_negative, default=0, metavar="MINUTES",
                   help="also save the checkpoint every this "
                   "many minutes mid-epoch (0: after each epoch only): a run killed without warning loses at most that "
                   "much (with torchrun --max-restarts and --resume it goes on from there); the training is unchanged")
    p.add_argument("--accum", type=flags.count, default=1,
                   help="optimiser step every N batches (effective batch N x --batch)")
    p.add_argument("--clip-grad", type=flags.non_negative, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--stop-after-steps", type=flags.count_or_zero, default=0, help="debug: stop (and save) after this "
                   "many steps (0: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the step: cvlp.py the whole loss (under "
                   "torchrun the image encoders), lgr.py the image encoder (faster steps on a GPU after a minute or two "
                   "of compiling; the same maths, checkpoints unchanged)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True, help="also write every "
                   "epoch's scalars as TensorBoard events under <out>/tb/ (the JSON lines beside the checkpoint: always)")


def global_rng_states():
    """The random states a training step draws from besides its own generators, for the checkpoint: torch's, and
    Python's and numpy's (the official augmentation, timm's RandAugment and random erasing, draws from these), as
    plain tensors and tuples that weights_only loading reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_global_rng_states(rng):
    """global_rng_states, put back (a checkpoint of an older version holds torch's alone)."""
    torch.set_rng_state(rng["torch"])
    if "python" in rng:
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The official code's warm-up starts from this learning rate (its main.py --warmup-lr default).
WARMUP_LR = 1e-6


def parameter_groups(model, wd, variant="paper", slow=(), slow_lr=None):
    """AdamW's parameter groups of the trainable parameters of `model`: weight decay `wd` on the weight matrices and
    kernels (2-D and up); none on 1-D parameters (norms' scales and shifts, biases, ViT's class embedding), as the
    official optimiser (timm's rule: 1-D or named *.bias) and nanoGPT keep them; none on the learnable temperatures
    either (the 0-dim log(1/tau) of CVLP and of the LGR head), the project's own choice: decay pulls log(1/tau) to 0,
    that is tau to 1, which regularises nothing. --variant official decays them as its rule does (0-dim is not 1-D).
    `slow`: names of parameters trained at slow_lr instead (the official fine-tuning's text_lr on the LGR attention).
    -> [{"params", "weight_decay"(, "lr")}] with the empty groups left out, and {name: "decay" | "no_decay"} (tests)."""
    groups, kinds = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 or (variant == "official" and p.ndim == 0)
        kinds[name] = "decay" if decay else "no_decay"
        groups.setdefault((decay, name in slow), []).append(p)
    out = [{"params": ps, "weight_decay": wd if decay else 0.0, **({"lr": slow_lr} if is_slow else {})}
           for (decay, is_slow), ps in sorted(groups.items(), key=lambda kv: kv[0][1])]   # the logged lr: group 0's
    return out, kinds


def cosine_schedule(optimizer, total_steps, warmup_steps, lr, min_lr=0.0, warmup_lr=WARMUP_LR):
    """The learning rate of every step (SGDR's cosine annealing without restarts, the paper's [30], stepped every
    optimiser step as SGDR steps it): a linear warm-up from warmup_lr to lr over warmup_steps, then a cosine from
    lr down to min_lr at the last step. As a factor of each group's own lr (LambdaLR)."""
    def factor(step):
        if step < warmup_steps:
            return (warmup_lr + (lr - warmup_lr) * step / warmup_steps) / lr
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def official_schedule(optimizer, steps_per_epoch, epochs, warmup_epochs, lr, min_lr=0.0, warmup_lr=WARMUP_LR):
    """--variant official: the official code's schedule (timm's CosineLRScheduler as its main.py drives it): one lr
    per epoch, a linear warm-up from warmup_lr over warmup_epochs, then lr_t = min_lr + (lr - min_lr) (1 + cos(pi t /
    epochs)) / 2 counted from epoch 0 (no warm-up prefix). main.py steps it after each epoch with that epoch's index,
    so epoch e trains at the value of t = e - 1 (epoch 0 at t = 0 too): the last epoch at t = epochs - 2, never 0."""
    def value(t):
        if t < warmup_epochs:
            return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: value(max(step // steps_per_epoch - 1, 0)) / lr)


def optimizer_and_schedule(groups, loader, args):
    """AdamW (Sec. 4.3: betas 0.9, 0.999 (beta2 and eps 1e-8: the official code's, torch's defaults); fused: the whole
    step in one kernel, on a CPU too, where it is ten times faster than the loop over parameters on the tiny CLIP)
    over parameter_groups and its schedule, one optimiser step every --accum batches of `loader` -> (optimiser,
    schedule, steps per epoch). The schedule: cosine_schedule with --warmup epochs and --min-lr; --variant official:
    official_schedule."""
    if len(loader) < args.accum:
        raise DataError(f"--batch {args.batch} x --accum {args.accum} is larger than the training set "
                        f"({len(loader.sampler.sampler)} images); lower --batch")
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)   # one kernel (CPU or CUDA)
    steps = len(loader) // args.accum
    if getattr(args, "variant", "paper") == "official":
        return opt, official_schedule(opt, steps, args.epochs, args.warmup, args.lr, args.min_lr), steps
    return opt, cosine_schedule(opt, args.epochs * steps, round(args.warmup * steps), args.lr, args.min_lr), steps


# ----------------------------------------------------------------------------------------------
# The training loop


def fit(model, batch_loss, loader, opt, sched, args, path, meta, rngs, validate=None):
    """The training loop of both stages; True when every epoch ran, False when it stopped early (saved).
    batch_loss(x, y) -> (loss, {name: value}); rngs: {"sampler": the sampler's generator, ...other generators
    batch_loss draws from}; validate() -> ({"overall", "many", "medium", "few"} top-1 in %, text) after each
    epoch, or None. The parts are Training's: restore (--resume), the records (util/records.py), one epoch of
    steps, the end of an epoch (log line, record, history, best, checkpoint)."""
    run = Training(model, opt, sched, args, path, meta, rngs)
    run.restore()
    with run_records(path, args, meta["stage"], run.resumed_at) as run.record, run.signals_caught(), \
            gpu_memory_errors(args):
        for epoch in range(run.pos["epoch"], args.epochs):
            means = run.one_epoch(epoch, loader, batch_loss)
            if means is None:                                    # --stop-after-steps: saved mid-epoch
                return False
            run.end_epoch(epoch, means, validate)
    return True


@contextlib.contextmanager
def gpu_memory_errors(args):
    """A GPU out of memory in training: one line with the batch to use instead."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise GPUMemoryError(f"GPU out of memory with --batch {args.batch}; pass a smaller --batch, or --batch "
                             f"{args.batch // 2} --accum {2 * args.accum} to keep the effective batch")


class Training:
    """The state of one training run and the parts of fit. What long runs need:
    - after every epoch its record (util/records.py: <name>.jsonl, TensorBoard), then an atomic checkpoint (plus
      <name>_best.pt when validate() improves) whose position["history"] lists every finished epoch's mean losses
      and val top-1;
    - Ctrl-C (SIGINT), SIGTERM (a scheduler's warning before preemption; torchrun's agent stopping its workers)
      or --stop-after-steps saves the state of the last optimiser step, also mid-epoch; a signal then exits
      with 128 + its number (130, 143), as a process killed by it would;
    - --save-every M also saves mid-epoch every M minutes (with a record of the epoch so far), so a kill without
      warning (SIGKILL: the out-of-memory killer, a lost node) costs at most M minutes; torchrun --max-restarts
      with --resume continues from there;
    - --resume restores weights, optimiser, schedule, the epoch's sample order and position and every random
      state (and the epoch's loss sums so far), so it ends with the same weights and records as an uninterrupted
      run (bitwise on CPU, --workers 0);
    - a non-finite loss stops the run before it reaches the weights or the checkpoint.
    torchrun: every rank runs this loop on its share of each global batch, in step; rank 0 alone validates and
    writes checkpoints and records (the random states it saves are every rank's: all draw the global batch's
    randomness); a signal on any rank stops every rank at the same step (distributed.agree)."""

    def __init__(self, model, opt, sched, args, path, meta, rngs):
        self.model, self.opt, self.sched, self.args, self.path, self.meta, self.rngs = (
            model, opt, sched, args, path, meta, rngs)
        self.rank, self.world_size = rank_world()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pos = {"epoch": 0, "batch": 0, "best": None, "history": [], "sampler_epoch": rngs["sampler"].get_state(),
                    "sums": {}, "n": 0, "wall_s": 0.0}       # sums, n: this epoch's so far; wall_s: at `started`
        self.global_rng = None                                    # the global random states to restore (--resume)
        self.received = []                                       # signals so far: finish the step, save, stop
        self.saved_at = self.started = time.time()               # --save-every and wall_s count from here
        self.resumed_at, self.record = None, None                # --resume: (epoch, batch); rank 0's RunRecord

    def restore(self):
        """--resume: weights, optimiser, schedule, position, and every random state from the checkpoint."""
        args, path, meta = self.args, self.path, self.meta
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))   # torchrun --max-restarts: attempt number
        if restart and not args.resume:
            warn(f"torchrun restarted this run (restart {restart}) without --resume: it starts again from the first "
                 f"step; pass --resume to continue from {path}")
        if not (args.resume and os.path.exists(path)):
            return
        ckpt = load_checkpoint(path, meta["stage"], f"python {meta['stage']}.py")
        check_meta(ckpt, meta, path)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        states_like_params(self.opt)
        self.sched.load_state_dict(ckpt["scheduler"])
        for k, g in self.rngs.items():
            g.set_state(ckpt["rng"][k])
        self.pos, self.global_rng, self.started = ckpt["position"], ckpt["rng"], time.time()
        self.resumed_at = (self.pos["epoch"], self.pos["batch"])
        print(f"resumed from {path} at epoch {self.pos['epoch'] + 1}, batch {self.pos['batch']}"
              + (f" (torchrun restart {restart})" if restart else ""))

    def save(self, target, position):
        ckpt = {**self.meta, "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "args": vars(self.args), "epoch": position["epoch"], "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "position": position,
                "rng": {**{k: g.get_state() for k, g in self.rngs.items()}, **global_rng_states()}}
        save_checkpoint(target, ckpt)

    @contextlib.contextmanager
    def signals_caught(self):
        """Ctrl-C and SIGTERM are noted and acted on after the current step (a second Ctrl-C aborts)."""
        def on_signal(signum, _frame):
            self.received.append(signum)
            if signum == signal.SIGINT and self.world_size == 1:   # torchrun forwards the first Ctrl-C again: its
                signal.signal(signal.SIGINT, previous[signal.SIGINT])   # agent SIGKILLs after 30 s
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def start_epoch(self, loader):
        """This epoch's sample order, position and loss sums: its first batch, or where a resumed run stopped."""
        pos = self.pos
        if pos["batch"] == 0:
            pos["sampler_epoch"] = self.rngs["sampler"].get_state()   # this epoch's sample order comes from here
        self.sums, self.n = (dict(pos.get("sums", {})), pos.get("n", 0)) if pos["batch"] else ({}, 0)
        self.rngs["sampler"].set_state(pos["sampler_epoch"])
        loader.sampler.skip = pos["batch"] * self.args.batch * self.world_size   # samples of the global stream
        if self.global_rng is not None and pos["batch"] == 0:         # resumed between epochs: iter() below draws
            set_global_rng_states(self.global_rng)                     # from torch's generator too
            self.global_rng = None
        batches = iter(loader)
        if self.global_rng is not None:                               # resumed mid-epoch: the saved augmentation
            set_global_rng_states(self.global_rng)                     # randomness is past this epoch's iter() draw
            self.global_rng = None
        return batches

    def one_epoch(self, epoch, loader, batch_loss):
        """The epoch's steps -> {name: mean over its batches}, "img_s"; None when --stop-after-steps stopped it.
        batch_loss(x, y) gets x on the device and y as the loader gives it, on the host. In one process no step
        waits for the device: the logged values are read once the device has them (read_later, settle), and a
        non-finite loss is kept from the weights by the optimiser itself (skip_if_not_finite), or read before the
        optimiser step where the optimiser cannot skip one."""
        args, self.t0, self.done = self.args, time.time(), 0
        self.bar = progress(self.start_epoch(loader), total=len(loader),
                            desc=f"{self.meta['stage']} {epoch + 1}/{args.epochs}", unit="batch")
        stop, self.pending, window = None, [], []
        for i, (x, y) in enumerate(self.bar, start=self.pos["batch"]):
            with autocast(args.device):
                loss, stats = batch_loss(x.to(args.device, non_blocking=True), y)
            (loss / args.accum).backward()
            self.done, window = self.done + 1, window + [loss.detach()]
            if self.world_size == 1:
                self.read_later(epoch, i, {"loss": loss, **stats})
            else:                                                      # torchrun: global loss; a signal on any rank
                value, stop = agree(loss, self.received)
                self.read_later(epoch, i, {"loss": value, **stats})
                self.settle(wait=True)
            if (i + 1) % args.accum == 0:
                if not skip_if_not_finite(self.opt, window):           # this optimiser cannot skip a step itself:
                    self.settle(wait=True)                             # the losses are read before it
                self.optimizer_step()
                window = []
                if self.world_size == 1:
                    stop = stop_signal(self.received)
                if self.stopped(stop, epoch, i):
                    return None
            self.settle()
        self.opt.zero_grad(set_to_none=True)                           # drop a partial accumulation
        self.settle(wait=True)
        return self.means()

    def read_later(self, epoch, i, values):
        """Queue batch i's logged values {name: tensor or number} for settle(), on their way to the host."""
        names, numbers, event = values_to_host(values)
        self.pending.append((epoch, i, list(values), names, numbers, event,
                             {k: v for k, v in values.items() if not torch.is_tensor(v)}))

    def settle(self, wait=False):
        """Account the queued batches, in order, whose values the device has finished (wait: all of them): the
        epoch's sums and the progress line. A non-finite loss stops the run here (DivergedError), before anything
        later is saved (every save settles first); the optimiser has left the weights as they were (one_epoch)."""
        while self.pending:
            epoch, i, order, names, numbers, event, known = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            values = {**known, **dict(zip(names, numbers.tolist()))}
            value = values["loss"]
            if not math.isfinite(value):
                raise DivergedError(f"loss is {value} at epoch {epoch + 1}, batch {i + 1}; stopped before it reached "
                                    f"the weights ({self.path} holds the last good state); lower --lr or set --clip-grad")
            for k in order:
                self.sums[k] = self.sums.get(k, 0.0) + float(values[k])
            self.n += 1
            self.bar.set_postfix(loss=f"{value:.3f}", img_s=f"{self.done * self.args.batch / (time.time() - self.t0):.0f}")

    def means(self):
        """The epoch's mean losses so far, {name: mean}, and the images per second of this process's batches."""
        img_s = self.done * self.args.batch * self.world_size / max(time.time() - self.t0, 1e-9)
        return {**{k: v / max(self.n, 1) for k, v in self.sums.items()}, "img_s": img_s}

    def wall_s(self):
        """Seconds of training so far, over every resume (the position keeps the earlier processes' share)."""
        return self.pos.get("wall_s", 0.0) + time.time() - self.started

    def optimizer_step(self):
        if self.args.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad)
        self.opt.step()
        self.opt.__dict__.pop("found_inf", None)                      # skip_if_not_finite's, for this step only
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def stopped(self, stop, epoch, i):
        """After an optimiser step: on a signal or at --stop-after-steps, save this step's state and stop (a signal
        exits); every --save-every minutes, save it (and a record of the epoch so far) and go on. True when the
        run stops here."""
        args = self.args
        stops = stop or (args.stop_after_steps and self.sched.last_epoch >= args.stop_after_steps)
        # Rank 0 alone decides and writes, so the ranks need not agree on the clock; nothing here draws from a
        # generator, so the training is the same with or without --save-every.
        saves = args.save_every and self.rank == 0 and time.time() - self.saved_at >= 60 * args.save_every
        if not (stops or saves):
            return False
        self.settle(wait=True)                                         # the losses so far read before a save
        here = {**self.pos, "epoch": epoch, "batch": i + 1, "sums": dict(self.sums), "n": self.n,   # mid-epoch
                "wall_s": self.wall_s()}
        if stops:
            if self.rank == 0:
                self.save(self.path, here)
            why = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}.get(
                stop, f"stopped after {self.sched.last_epoch} steps (--stop-after-steps)")
            print(f"{why}: saved {self.path} at epoch {epoch + 1}, batch {i + 1}; continue with --resume")
            if stop:
                sys.exit(128 + stop)                                   # 130 Ctrl-C, 143 SIGTERM, as the shell reports
            return True
        if self.record is not None:
            self.record.add({"epoch": epoch + 1, "batch": i + 1}, self.sched, self.means(), here["wall_s"])
        self.save(self.path, here)
        self.saved_at = time.time()
        return False

    def end_epoch(self, epoch, means, validate):
        """The epoch's line, record and history entry, <name>_best.pt when validate() improved, the checkpoint."""
        losses = {k: v for k, v in means.items() if k != "img_s"}
        line = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
        line += f"  lr {self.sched.get_last_lr()[0]:.2e}  {means['img_s']:.0f} img/s"
        val = None
        if validate is not None and self.rank == 0:
            scores, text = validate()
            val = {k: scores[k] for k in ("overall", "many", "medium", "few")}
            line += "  " + text
        print(f"epoch {epoch + 1:3d}/{self.args.epochs}  {line}")
        wall, self.started = self.wall_s(), time.time()
        pos = self.pos = {**self.pos, "epoch": epoch + 1, "batch": 0, "sums": {}, "n": 0, "wall_s": wall}
        if self.record is not None:                                    # before the checkpoint: see RunRecord
            self.record.add({"epoch": epoch + 1}, self.sched, means, wall, val)
        pos["history"] = pos.get("history", []) + [{"epoch": epoch + 1, **losses,
                                                    **({"val": val["overall"]} if val is not None else {})}]
        if val is not None and (pos["best"] is None or val["overall"] > pos["best"]):
            pos["best"] = val["overall"]
            self.save(best_path(self.path), pos)
        if self.rank == 0:
            self.save(self.path, pos)
            self.saved_at = time.time()
