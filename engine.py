"""The training machinery every VL-LTR stage shares: one-line errors and atomic files, checkpoints, and the
training loop with exact resume (cvlp.py and lgr.py both train through `fit`), and torchrun.

Nothing here is in the paper's equations; the stage scripts (cvlp.py, anss.py, lgr.py, evaluate.py) are.
Like MAE's engine_*.py: the stages import from this file, it imports from none of them. CLIP models, their
weights, tokens and embeddings are clip_models.py's.
"""
import contextlib
import itertools
import math
import os
import random
import re
import signal
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

CODE_VERSION = "0.1.0"   # recorded in every checkpoint


# ----------------------------------------------------------------------------------------------
# Errors, progress, files

class DataError(Exception):
    """Bad input. The message is one line: what is wrong and how to fix it."""


def out_of_memory(e):
    """True for torch's out-of-memory errors: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "alloc" in str(e).lower()


def fail(message):
    """Print a one-line error (no traceback) and exit with status 2. Used by every stage's main().
    A DataError raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its last line."""
    message = str(message).strip().splitlines()[-1] if str(message).strip() else "unknown error"
    message = re.sub(r"^(engine\.)?DataError: ", "", message)
    sys.stderr.write(f"error: {message}\n")                    # write, not print: under torchrun every rank's errors show
    sys.exit(2)


def run_stage(run, args):
    """Run a stage's run(args): bad input ends in the one-line error of fail(), never a traceback. On a GPU, fp32
    matmuls run as TF32 (evaluation is fp32, SPEC.md §3; training's bf16 autocast is unaffected)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        run(args)
    except DataError as e:
        fail(e)
    except torch.cuda.OutOfMemoryError:                          # fit() says this with the batch to use; elsewhere
        fail(f"GPU out of memory on {args.device}; lower --batch, or run with fewer other processes on that GPU")
    finally:
        report_gpu_memory()
    if torch.distributed.is_initialized():                       # torchrun: leave the process group cleanly
        torch.distributed.destroy_process_group()


def report_gpu_memory():
    """After a stage that used a GPU: one line on stderr with the most memory its tensors held at once (what a
    smaller GPU must have free) and what torch's caching allocator reserved (what nvidia-smi shows, less CUDA's own)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.max_memory_reserved() > 0:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved ({torch.cuda.get_device_name()})",
              file=sys.stderr, flush=True)


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


def warn(message):
    """One "warning: ..." line on stderr (no warnings-module source line)."""
    print(f"warning: {message}", file=sys.stderr)


def autocast(device):
    """The training precision: bf16 autocast on CUDA, plain fp32 on CPU. Evaluation uses eval_precision."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextlib.contextmanager
def eval_precision(device, precision="fp32"):
    """The evaluation precision (SPEC.md §3): fp32 on every device, whatever the training ran in, so that an
    accuracy does not move with the training precision (bf16 changes predictions; evaluation is a small share
    of the time). Autocast is off for CPU and CUDA alike, also inside an enclosing training autocast; matmuls
    follow torch's float32 setting (TF32 on a GPU, set by run_stage). precision "fp16": fp16 autocast on
    CUDA, as the official evaluation runs (evaluate.py --released --eval-precision fp16); fp32 on a CPU."""
    fp16 = precision == "fp16" and str(device).startswith("cuda")
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
        yield


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, checked before use


def save_checkpoint(path, ckpt):
    """Atomically torch.save a plain dict (tensors, numbers, strings, dicts): loadable with weights_only."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, stage, made_by):
    """Load <stage>.pt with weights_only=True, or say which command makes it."""
    if not os.path.exists(path):
        raise DataError(f"{path} not found; run `{made_by}` first (or pass --out to the right run folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]}); "
                        f"delete it and rerun `{made_by}`")
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        found = ckpt.get("stage") if isinstance(ckpt, dict) else "?"
        raise DataError(f"{path} is not a {stage} checkpoint (stage {found}); check --out")
    return ckpt


def prepare_out(args):
    """Create the run folder and make sure we can write there before any work is done."""
    try:
        os.makedirs(args.out, exist_ok=True)
        test = os.path.join(args.out, f".write_test{os.getpid()}")        # per process: torchrun ranks share --out
        atomic_write(test, lambda f: f.write(b"ok"))
        os.remove(test)
    except OSError as e:
        raise DataError(f"cannot write to --out {args.out} ({e.strerror}); choose a writable folder with free space")


def checkpoint_meta(args, stage, num_classes):
    """What made a checkpoint: refused on --resume or by the next stage when it does not match. "pretrained": the
    CLIP weights' tag, from which a later stage rebuilds the same model and image transforms."""
    return {"stage": stage, "data": args.data, "backbone": args.backbone, "pretrained": args.pretrained,
            "num_classes": num_classes, "variant": getattr(args, "variant", None), "version": CODE_VERSION}


def checkpoint_tag(ckpt):
    """The --pretrained tag a checkpoint was made under. Checkpoints written before the tag was recorded were
    made from OpenAI's weights, the only ones loaded right then ("openai"; on shapes-tiny the world's stand-in,
    "standin")."""
    return ckpt.get("pretrained") or ("standin" if ckpt.get("backbone") == "shapes-tiny" else "openai")


def check_meta(ckpt, meta, path):
    found = {**ckpt, "pretrained": checkpoint_tag(ckpt)}
    for key in ("stage", "data", "backbone", "pretrained", "num_classes", "head"):
        if found.get(key) != meta.get(key):
            fix = (f"pass --pretrained {found[key]}, the tag it was made under" if key == "pretrained" else
                   "point --out at the matching run")
            raise DataError(f"{path} is a {ckpt.get('stage')} checkpoint of {ckpt.get('data')}/{ckpt.get('backbone')} "
                            f"with {ckpt.get('num_classes')} classes ({key} {found.get(key)!r}), but this run expects "
                            f"{key} {meta.get(key)!r}; {fix}, or rerun the stage that writes it")


# ----------------------------------------------------------------------------------------------
# Training: seeding, schedule, resumable sampling and the loop both stages share


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, total_steps, warmup_steps):
    """Linear warm-up, then cosine decay to 0 (SGDR without restarts, paper Sec. 4.3)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler so that an epoch can start part-way through, for exact resume: the first `skip`
    indices of the epoch's draw are consumed without loading their images. The caller restores the
    draw's random state and sets `skip`; the training loop resets it to 0 after that epoch.
    torchrun (world_size N > 1): every rank draws the same global stream (same seed) and takes its share of
    each global batch of N * batch indices, rank r the r-th run of `batch`, so the N ranks' batches, in rank
    order, are one process's batch of N * batch; an incomplete last global batch is dropped."""

    def __init__(self, sampler, batch=1, rank=0, world_size=1):
        self.sampler, self.skip = sampler, 0
        self.batch, self.rank, self.world_size = batch, rank, world_size

    def __len__(self):
        if self.world_size > 1:                                  # torchrun
            return (len(self.sampler) - self.skip) // (self.batch * self.world_size) * self.batch
        return len(self.sampler) - self.skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        if self.world_size == 1:
            yield from it
            return
        for _ in range(len(self) // self.batch):                 # torchrun: this rank's share of each global batch
            global_batch = list(itertools.islice(it, self.batch * self.world_size))
            yield from global_batch[self.rank * self.batch:(self.rank + 1) * self.batch]


def fit(model, batch_loss, loader, opt, sched, args, path, meta, rngs, validate=None):
    """The training loop of both stages; True when all epochs ran. batch_loss(x, y) -> (loss, {name: value}); every --accum
    batches one optimiser step, gradients clipped to --clip-grad. What long runs need:
    - after every epoch an atomic checkpoint (plus <name>_best.pt when validate() improves); its
      position["history"] lists every finished epoch's mean losses and validate() score (the learning curve);
    - Ctrl-C (SIGINT), SIGTERM (a scheduler's warning before preemption; torchrun's agent stopping its workers)
      or --stop-after-steps saves the state of the last optimiser step, also mid-epoch; a signal then exits
      with 128 + its number (130, 143), as a process killed by it would;
    - --save-every M also saves mid-epoch every M minutes, so a kill without warning (SIGKILL: the
      out-of-memory killer, a lost node) costs at most M minutes; torchrun --max-restarts with --resume then
      continues from there;
    - --resume restores weights, optimiser, schedule, the epoch's sample order and position and every
      random state, so it ends with the same weights as an uninterrupted run (bitwise on CPU, --workers 0);
    - a non-finite loss stops the run before it reaches the weights or the checkpoint.
    rngs: {"sampler": generator of the sampler, ...other generators the batch_loss draws from}.
    torchrun: every rank runs this loop on its share of each global batch, in step; rank 0 alone validates and
    writes checkpoints (the random states it saves are every rank's: all draw the global batch's randomness);
    a signal on any rank stops every rank at the same step (agree)."""
    rank, world_size = rank_world()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))    # torchrun --max-restarts: attempt number
    if restart and not args.resume:
        warn(f"torchrun restarted this run (restart {restart}) without --resume: it starts again from the first "
             f"step; pass --resume to continue from {path}")
    pos = {"epoch": 0, "batch": 0, "best": None, "history": [], "sampler_epoch": rngs["sampler"].get_state()}
    torch_rng = None
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path, meta["stage"], f"python {meta['stage']}.py")
        check_meta(ckpt, meta, path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        for k, g in rngs.items():
            g.set_state(ckpt["rng"][k])
        pos, torch_rng = ckpt["position"], ckpt["rng"]["torch"]
        print(f"resumed from {path} at epoch {pos['epoch'] + 1}, batch {pos['batch']}"
              + (f" (torchrun restart {restart})" if restart else ""))

    def save(target, position, rng_states):
        ckpt = {**meta, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "args": vars(args),
                "epoch": position["epoch"], "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "position": position, "rng": rng_states}
        try:
            save_checkpoint(target, ckpt)
        except OSError as e:
            raise DataError(f"cannot write {target} ({e.strerror}); free disk space or pass another --out "
                            f"(the previous checkpoint there is intact)")

    def rng_states():
        return {**{k: g.get_state() for k, g in rngs.items()}, "torch": torch.get_rng_state()}

    received = []                                                # signals so far: finish the step, save, stop

    def on_signal(signum, _frame):
        received.append(signum)
        if signum == signal.SIGINT and world_size == 1:          # a second Ctrl-C aborts (torchrun forwards the
            signal.signal(signal.SIGINT, previous[signal.SIGINT])   # first one again: its agent SIGKILLs after 30 s)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_at = time.time()                                       # --save-every counts from here
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for epoch in range(pos["epoch"], args.epochs):
            if pos["batch"] == 0:
                pos["sampler_epoch"] = rngs["sampler"].get_state()     # this epoch's sample order comes from here
            rngs["sampler"].set_state(pos["sampler_epoch"])
            loader.sampler.skip = pos["batch"] * args.batch * world_size   # samples of the global stream
            if torch_rng is not None and pos["batch"] == 0:             # resumed between epochs: iter() below
                torch.set_rng_state(torch_rng)                         # draws from torch's generator too
                torch_rng = None
            batches = iter(loader)
            if torch_rng is not None:                                  # resumed mid-epoch: the saved augmentation
                torch.set_rng_state(torch_rng)                         # randomness is past this epoch's iter() draw
                torch_rng = None
            sums, n, t0 = {}, 0, time.time()
            bar = progress(batches, total=len(loader), desc=f"{meta['stage']} {epoch + 1}/{args.epochs}", unit="batch")
            for i, (x, y) in enumerate(bar, start=pos["batch"]):
                x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
                with autocast(args.device):
                    loss, stats = batch_loss(x, y)
                if world_size == 1:
                    value = loss.item()                                # one host sync per batch, for the log
                else:                                                  # torchrun: global loss; a signal on any rank
                    value, stop = agree(loss, received)
                if not math.isfinite(value):
                    raise DataError(f"loss is {value} at epoch {epoch + 1}, batch {i + 1}; stopped before it reached the "
                                    f"weights ({path} holds the last good state); lower --lr or set --clip-grad")
                (loss / args.accum).backward()
                for k, v in {"loss": value, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                n += 1
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{n * len(y) / (time.time() - t0):.0f}")
                if (i + 1) % args.accum:
                    continue
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if world_size == 1:
                    stop = stop_signal(received)
                if stop or (args.stop_after_steps and sched.last_epoch >= args.stop_after_steps):
                    if rank == 0:
                        save(path, {**pos, "epoch": epoch, "batch": i + 1}, rng_states())   # mid-epoch position
                    why = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}.get(
                        stop, f"stopped after {sched.last_epoch} steps (--stop-after-steps)")
                    print(f"{why}: saved {path} at epoch {epoch + 1}, batch {i + 1}; continue with --resume")
                    if stop:
                        sys.exit(128 + stop)                           # 130 Ctrl-C, 143 SIGTERM, as the shell reports them
                    return False
                # Rank 0 alone decides and writes, so the ranks need not agree on the clock; nothing here draws
                # from a generator, so the training is the same with or without --save-every.
                if args.save_every and rank == 0 and time.time() - saved_at >= 60 * args.save_every:
                    save(path, {**pos, "epoch": epoch, "batch": i + 1}, rng_states())
                    saved_at = time.time()
            opt.zero_grad(set_to_none=True)                            # drop a partial accumulation
            pos = {**pos, "epoch": epoch + 1, "batch": 0}
            line = "  ".join(f"{k} {v / max(n, 1):.4f}" for k, v in sums.items())
            line += f"  lr {sched.get_last_lr()[0]:.2e}  {n * args.batch * world_size / (time.time() - t0):.0f} img/s"
            score = None
            if validate is not None and rank == 0:
                score, text = validate()
                line += "  " + text
            print(f"epoch {epoch + 1:3d}/{args.epochs}  {line}")
            pos["history"] = pos.get("history", []) + [{"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()},
                                                        **({"val": score} if score is not None else {})}]
            if score is not None and (pos["best"] is None or score > pos["best"]):
                pos["best"] = score
                save(path.replace(".pt", "_best.pt"), pos, rng_states())
            if rank == 0:
                save(path, pos, rng_states())
                saved_at = time.time()
    except torch.cuda.OutOfMemoryError:
        raise DataError(f"GPU out of memory with --batch {args.batch}; pass a smaller --batch, or --batch "
                        f"{args.batch // 2} --accum {2 * args.accum} to keep the effective batch")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return True


def stop_signal(received):
    """The signal a run stops on: SIGTERM if one came (the scheduler's kill follows it), else SIGINT, else None."""
    if signal.SIGTERM in received:
        return signal.SIGTERM
    return signal.SIGINT if received else None


# ----------------------------------------------------------------------------------------------
# Many processes: torchrun (`torchrun --nproc-per-node N cvlp.py ...`). Without torchrun none of this runs.


def init_distributed(args):
    """torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK: join the process group
    (NCCL on CUDA, gloo on CPU) and put this process on cuda:LOCAL_RANK. Under plain `python` a no-op.
    Ranks other than 0 print nothing (their logs would repeat rank 0's); errors still reach stderr (fail)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    store = attempt_store()
    if store is None:
        torch.distributed.init_process_group(backend)                # env://: MASTER_ADDR, MASTER_PORT
    else:
        torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                             world_size=int(os.environ["WORLD_SIZE"]))
    if torch.distributed.get_rank() != 0:
        import builtins
        builtins.print = lambda *a, **k: None
    if (store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
        warn("torchrun --max-restarts on several machines: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, "
             "so that a restarted run's ranks find each other (else they may try the killed ranks' addresses)")


def attempt_store():
    """torchrun on one machine: the key-value store the ranks meet in, private to this attempt; otherwise None
    (init_process_group opens the one in MASTER_ADDR:MASTER_PORT). torchrun's agent keeps one store for all
    attempts of a run (TORCHELASTIC_USE_AGENT_STORE), so after a restart a rank can read the address that a
    killed rank of the last attempt left there and fail to connect (pytorch/pytorch#135712); a prefix per
    attempt keeps the attempts apart. TORCHELASTIC_RESTART_COUNT is the same for every rank of one machine,
    not always across machines: there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a new store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        return None
    from torch.distributed.constants import default_pg_timeout
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=default_pg_timeout)      # the agent serves it; every rank a client
    return torch.distributed.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def one_process_only(script):
    """anss.py and evaluate.py run in one process (minutes even on ImageNet-LT): refuse torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail(f"{script} runs in one process: start it with plain `python {script} ...`, not torchrun")


def rank_world():
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def distribute(module, args):
    """torchrun: `module` wrapped in DistributedDataParallel, which averages the gradients over the ranks
    during backward (call the wrapper, not the module, so it knows a backward follows). BatchNorm (RN50)
    becomes SyncBatchNorm on CUDA, so batch statistics span the global batch as in one process.
    Buffers are not re-broadcast each step: they are equal on all ranks (LGR's anchors are large)."""
    if str(args.device).startswith("cuda"):
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [torch.device(args.device).index] if str(args.device).startswith("cuda") else None
    with warnings.catch_warnings():          # torch 2.14 renames broadcast_buffers; requirements.txt: torch >= 2.2
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def gather(t):
    """torchrun: the (N * B, ...) concatenation in rank order of every rank's (B, ...) tensor t, with
    gradients flowing back to each rank's share; one process: t itself. Backward sums the gradients that
    all ranks send to a share (the reduce-scatter of all_gather's backward)."""
    if not torch.distributed.is_initialized():
        return t
    if not t.requires_grad:
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    with warnings.catch_warnings():          # torch 2.14 deprecates it for a private API; the same autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(t))


def agree(loss, received):
    """torchrun: (the mean of the ranks' losses, the signal to stop on: SIGTERM if any rank has had one so far,
    else SIGINT if any has had a Ctrl-C, else None), in one all_reduce. Equal shares of the global batch make the
    mean the global batch's loss. Every rank then takes the same branch (stop on a non-finite loss; save and
    stop, with the same exit status), so none is left waiting in a collective."""
    flags = [float(signal.SIGINT in received), float(signal.SIGTERM in received)]
    t = torch.cat([loss.detach().float().reshape(1), torch.tensor(flags, device=loss.device)])   # (3,)
    torch.distributed.all_reduce(t)
    value, ctrl_c, term = t.tolist()
    return value / rank_world()[1], stop_signal([signal.SIGINT] * (ctrl_c > 0) + [signal.SIGTERM] * (term > 0))
