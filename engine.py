"""The machinery every VL-LTR stage shares: one-line errors and atomic files, CLIP models, checkpoints, and the
training loop with exact resume (cvlp.py and lgr.py both train through `fit`).

Nothing here is in the paper's equations; the stage scripts (cvlp.py, anss.py, lgr.py, evaluate.py) are.
Like MAE's engine_*.py: the stages import from this file, it imports from none of them.
"""
import contextlib
import itertools
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import urllib.parse
import urllib.request
import warnings
import zipfile

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from tqdm import tqdm

CODE_VERSION = "0.1.0"   # recorded in every checkpoint


# ----------------------------------------------------------------------------------------------
# Errors, progress, files

class DataError(Exception):
    """Bad input. The message is one line: what is wrong and how to fix it."""


def fail(message):
    """Print a one-line error (no traceback) and exit with status 2. Used by every stage's main().
    A DataError raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its last line."""
    message = str(message).strip().splitlines()[-1] if str(message).strip() else "unknown error"
    message = re.sub(r"^(engine\.)?DataError: ", "", message)
    sys.stderr.write(f"error: {message}\n")                    # write, not print: under torchrun every rank's errors show
    sys.exit(2)


def run_stage(run, args):
    """Run a stage's run(args): bad input ends in the one-line error of fail(), never a traceback."""
    try:
        run(args)
    except DataError as e:
        fail(e)
    if torch.distributed.is_initialized():                       # torchrun: leave the process group cleanly
        torch.distributed.destroy_process_group()


def progress(iterable, **kwargs):
    """tqdm progress bar on a terminal; silent in logs and CI, where each stage prints one line per epoch."""
    disable = None if os.environ.get("RANK", "0") == "0" else True          # torchrun: rank 0's bars only
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=False, **kwargs)


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


# ----------------------------------------------------------------------------------------------
# CLIP models: open_clip encoders (Eq. 1), their weights, tokens and embeddings

# The small CLIP of the shapes_lt world (SPEC §4, trained in shapes_lt.py): a ViT on 32 px images and a
# 2-layer text transformer.
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))


def create_clip(backbone, image_size):
    """A randomly initialised open_clip CLIP: RN50, ViT-B-16, ... or the shapes-tiny stand-in."""
    if backbone == "shapes-tiny":
        cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": image_size}}
        return open_clip.CLIP(**cfg)
    if backbone not in open_clip.list_models():
        raise DataError(f"unknown --backbone {backbone!r}; use RN50, ViT-B-16 or another open_clip model name")
    # OpenAI's CLIP weights (the paper's) were trained with QuickGELU; open_clip's plain configs use nn.GELU,
    # which would load the same weights without complaint and compute something else.
    with without_log_line("No pretrained weights loaded"):   # the weights come next, from load_clip_file
        return open_clip.create_model(backbone, pretrained=None, force_image_size=image_size, force_quick_gelu=True)


@contextlib.contextmanager
def without_log_line(prefix):
    """Drop the root-logger lines starting with `prefix` inside the block (open_clip logs through the root
    logger; its "Model initialized randomly." reads as a failure when our weights are loaded right after)."""
    drop = lambda record: not record.getMessage().startswith(prefix)
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def context_length(model):
    return model.positional_embedding.shape[0]


def interpolate_pos_embed(state_dict, model):
    """Resize the visual positional-embedding grid of CLIP weights to the model's input size, e.g.
    224 -> 384 (paper Table 3, ViT-B/16-384). ViT: 'visual.positional_embedding' (1 + g*g, D); ResNet:
    'visual.attnpool.positional_embedding' (1 + g*g, D). Bicubic on the g x g grid, class token kept."""
    own = model.state_dict()
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key not in state_dict or key not in own or state_dict[key].shape == own[key].shape:
            continue
        old, new = state_dict[key], own[key]
        g_old, g_new = int(math.isqrt(old.shape[0] - 1)), int(math.isqrt(new.shape[0] - 1))
        grid = old[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()       # (1, D, g, g)
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1).to(old.dtype)
        state_dict[key] = torch.cat([old[:1], grid])
    return state_dict


def load_clip_file(model, path):
    """Load local CLIP weights into model: a state dict (plain, {'state_dict': ...}, 'module.'-prefixed, or
    .safetensors), or one of OpenAI's TorchScript archives (RN50.pt, ViT-B-16.pt, as the `clip` package and the
    official VL-LTR code keep them in pretrained/)."""
    if not os.path.exists(path):
        raise DataError(f"--clip-weights {path} not found")
    try:
        if is_torchscript_archive(path):
            sd = torchscript_state_dict(path, model)
        else:
            sd = open_clip.factory.load_state_dict(path)          # weights_only=True inside
    except Exception as e:
        raise DataError(f"cannot read CLIP weights {path}: {str(e).splitlines()[0]}; pass a state dict file "
                        f"or one of OpenAI's CLIP archives (RN50.pt, ViT-B-16.pt)")
    sd = interpolate_pos_embed(dict(sd), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)   # fp16 archive tensors are cast to the model's
    if missing or unexpected:
        raise DataError(f"CLIP weights {path} do not fit this backbone ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}); check --backbone")
    return model


def is_torchscript_archive(path):
    """True for a TorchScript archive (torch.jit.save): a zip holding <name>/code/... and <name>/constants.pkl,
    which torch.save's zip files never hold. Checked before torch.jit.load sees the file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in z.namelist())


def torchscript_state_dict(path, model):
    """The tensors of a TorchScript archive, read by the TorchScript loader (no Python pickle runs). OpenAI's
    archives name CLIP's weights as open_clip does (RN50, ViT-B/16) and add three numbers that are not weights;
    an archive traced from an open_clip model also holds its non-persistent buffers (attn_mask)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # "torch.jit.load is deprecated"
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    persistent = model.state_dict()
    not_weights = {"input_resolution", "context_length", "vocab_size"}
    not_weights |= {name for name, _ in model.named_buffers() if name not in persistent}
    return {k: v for k, v in sd.items() if k not in not_weights}


def openai_weights(backbone):
    """The path of OpenAI's CLIP weights for `backbone` (the paper's initialisation): open_clip's cached copy,
    else a download through open_clip when its server can be reached. Offline, one line at once (open_clip
    itself retries for about 46 s before failing, SPEC.md §7)."""
    cfg = open_clip.get_pretrained_cfg(backbone, "openai")
    if not cfg:
        raise DataError(f"open_clip has no OpenAI CLIP weights for --backbone {backbone}; pass --clip-weights PATH")
    path = cached_openai_weights(cfg)
    if path:
        return path
    how = (f"pass --clip-weights PATH to a local file ({backbone}.pt from OpenAI, as the official code keeps it "
           f"in pretrained/, or a state dict), or run once with internet so open_clip caches them")
    host = download_host(cfg)
    if not reachable(host):
        raise DataError(f"no OpenAI CLIP weights for {backbone} in open_clip's cache and {host} cannot be reached: {how}")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as e:
        raise DataError(f"downloading OpenAI CLIP weights for {backbone} failed ({type(e).__name__}): {how}")


def cached_openai_weights(cfg):
    """Where open_clip 3.3 keeps downloaded 'openai' weights, if they are there: the Hugging Face hub cache
    (cfg['hf_hub'], a safetensors or .bin state dict; used when huggingface_hub is installed), or
    ~/.cache/clip/<name>.pt (cfg['url'], OpenAI's TorchScript archive). None when neither is there."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        import huggingface_hub
        repo, filename = os.path.split(cfg["hf_hub"])
        for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
            path = huggingface_hub.try_to_load_from_cache(repo, name)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def download_host(cfg):
    """The server open_clip.download_pretrained(cfg) fetches from: the Hugging Face hub when it is installed."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        return urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urllib.parse.urlparse(cfg["url"]).hostname


def reachable(host, timeout=5):
    """True when a TCP connection to host:443 opens within `timeout` s (or an HTTPS proxy is set: then the
    download's own error speaks)."""
    if urllib.request.getproxies().get("https"):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def clip_mean_std():
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def encode_text_trimmed(model, tokens, groups=1):
    """model.encode_text on a batch's tokens cut to its longest sentence (up to the last EOT): the same
    embeddings, (N, L) tokens -> (N, D), for a fraction of the work (wiki sentences average ~29 tokens of 77).
    groups > 1: the sentences run shortest first in that many groups, each cut to its own longest, and come
    back in their order (a sentence's embedding depends on it alone). At batch 256 the longest sentence is
    nearly always 77 tokens long; in 4 groups the text tower sees ~39 positions per sentence on average.
    tokens may be on the CPU (then no host sync); they are moved to the model's device."""
    tower = getattr(model, "text", model)           # CustomTextCLIP keeps its text tower in .text; CLIP flattens it
    device = tower.positional_embedding.device
    if (getattr(tower, "text_pool_type", getattr(tower, "pool_type", None)) != "argmax" or tower.attn_mask is None
            or getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False)):
        return model.encode_text(tokens.long().to(device))   # another kind of text tower: the full forward
    if groups > 1:
        order = tokens.argmax(dim=-1).argsort()                  # (N,) by EOT position: shortest first
        out = torch.cat([encode_text_trimmed(model, tokens[rows]) for rows in order.chunk(groups)])
        return out[order.argsort().to(device)]                   # (N, D) back in the batch's order
    # Exact: under the causal mask no position sees a later one, and only the EOT (argmax) position is pooled,
    # so the positions after the longest sentence's EOT never reach the output.
    L = int(tokens.argmax(dim=-1).max()) + 1
    T = tokens[:, :L].long().to(device, non_blocking=True)                      # (N, L)
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(T).to(cast) + tower.positional_embedding[:L].to(cast)   # (N, L, W)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:L, :L]))
    x = x[torch.arange(len(T), device=device), T.argmax(dim=-1)]                 # (N, W) at each EOT
    proj = tower.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj           # (N, D)


@torch.no_grad()
def encode_texts(model, tokens, device, batch=1024, desc="text"):
    """(S, L) tokens -> (S, D) L2-normalised text embeddings, in chunks (eval mode, no grad). Sentences go
    shortest first, so that each chunk is trimmed to about its own length (encode_text_trimmed)."""
    model.eval()
    order = tokens.argmax(dim=-1).argsort()                      # (S,) by EOT position: shortest first
    out = []
    for i in progress(range(0, len(tokens), batch), desc=desc, unit="batch"):
        with autocast(device):
            out.append(F.normalize(encode_text_trimmed(model, tokens[order[i:i + batch]]).float(), dim=-1))
    if not out:
        return torch.zeros(0, model.text_projection.shape[1], device=device)
    return torch.cat(out)[order.argsort().to(device)]            # back in corpus order


@torch.no_grad()
def encode_images(encode_fn, loader, device, desc="images"):
    """All images of a loader -> ((N, D) L2-normalised embeddings, (N,) labels)."""
    feats, labels = [], []
    for x, y in progress(loader, desc=desc, unit="batch"):
        with autocast(device):
            feats.append(F.normalize(encode_fn(x.to(device, non_blocking=True)).float(), dim=-1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(device)


def autocast(device):
    """bf16 autocast on CUDA, plain fp32 on CPU."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def tokenize_exact(sentences, context_length):
    """[S] str -> ((S, L) int64 tokens cut like open_clip cuts them (EOT kept last), number of sentences
    longer than L). Tokenising to L + 1 and cutting gives the same tokens, and a token in slot L + 1 tells
    exactly which sentences did not fit (an EOT in slot L may also be a sentence that just fits)."""
    tokenizer = open_clip.get_tokenizer("RN50")
    tokens = [tokenizer(sentences[i:i + 4096], context_length=context_length + 1) for i in range(0, len(sentences), 4096)]
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, context_length + 1, dtype=torch.long)
    cut = tokens[:, -1] != 0                                     # (S,) longer than the context
    tokens = tokens[:, :context_length].clone()                  # (S, L)
    tokens[cut, -1] = tokenizer.eot_token_id
    return tokens, int(cut.sum())


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
    """What made a checkpoint: refused on --resume or by the next stage when it does not match."""
    return {"stage": stage, "data": args.data, "backbone": args.backbone, "num_classes": num_classes,
            "variant": getattr(args, "variant", None), "version": CODE_VERSION}


def check_meta(ckpt, meta, path):
    for key in ("stage", "data", "backbone", "num_classes", "head"):
        if ckpt.get(key) != meta.get(key):
            raise DataError(f"{path} is a {ckpt.get('stage')} checkpoint of {ckpt.get('data')}/{ckpt.get('backbone')} "
                            f"with {ckpt.get('num_classes')} classes ({key} {ckpt.get(key)!r}), but this run expects "
                            f"{key} {meta.get(key)!r}; point --out at the matching run, or rerun the stage that writes it")


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
