"""Stage 1 of VL-LTR: class-wise visual-linguistic pre-training (CVLP), paper Sec. 3.2 and Eq. (1)-(3), (8).

    python cvlp.py --data shapes_lt                 # writes runs/shapes_lt/shapes-tiny/cvlp.pt
    python cvlp.py --data imagenet_lt --backbone RN50 --clip-weights RN50.pt

An image and a sentence of the same class are a positive pair. A batch holds N images and, for
each image, one sentence drawn uniformly from its class's corpus; the loss pulls every image
towards all sentences of its class (Eq. 2), and a frozen CLIP teacher's similarities are distilled
into the student (Eq. 3). Later stages import `load_clip`, `encode_texts` and the checkpoint helpers.
"""
import argparse
import math
import os
import random
import signal
import sys
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from data import (CODE_VERSION, DATASETS, SHAPES_VERSION, DataError, ImageDataset, ResumableSampler, atomic_write,
                  fail, load_data, make_sampler, make_transform, progress, run_stage, shapes_caption_pairs,
                  tokenize_corpus, tokenize_exact)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VL-LTR stage 1: class-wise visual-linguistic pre-training")
    p.add_argument("--data", default="shapes_lt", help="shapes_lt | imagenet_lt | places_lt | inat2018")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data.DATASETS[data]['root'])")
    p.add_argument("--backbone", default=None, help="RN50 | ViT-B-16 | shapes-tiny (default: per dataset)")
    p.add_argument("--clip-weights", default=None, help="local CLIP state dict; default: open_clip's 'openai' "
                   "weights (needs internet once); on shapes_lt the small CLIP stand-in, trained on first use")
    p.add_argument("--init", default="clip", choices=["clip", "scratch"],
                   help="student initialisation: CLIP weights (paper) or random (Table 4 #3)")
    p.add_argument("--variant", default="paper", choices=["paper", "official"],
                   help="paper equations, or the official code's differences (SPEC.md §3)")
    p.add_argument("--lam", type=float, default=0.5, help="Eq. (8) weight of L_ccl; 1 turns L_dis off (Table 4 #4)")
    p.add_argument("--tau", type=float, default=0.07, help="initial temperature, learnable (Sec. 3.2)")
    p.add_argument("--text", default="wiki+prompt", choices=["wiki+prompt", "prompt"],
                   help="text source (Table 10: 'prompt only' keeps the 80 templates)")
    p.add_argument("--epochs", type=int, default=None, help="default 50 (Sec. 4.3); 100 iNat; 10 shapes_lt")
    p.add_argument("--batch", type=int, default=256, help="Sec. 4.3: 256")
    p.add_argument("--lr", type=float, default=None, help="default 5e-5 (Sec. 4.3); 5e-4 iNat (Sec. 4.5)")
    p.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (Sec. 4.3)")
    p.add_argument("--warmup", type=float, default=1.0, help="linear warm-up epochs before the cosine decay")
    p.add_argument("--sampling", default="sqrt", choices=["sqrt", "instance"], help="Sec. 4.3: square-root")
    p.add_argument("--image-size", type=int, default=None, help="input size; 224 (384 for the iNat ViT row)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted, one warning) instead of stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>/<backbone>)")
    p.add_argument("--resume", action="store_true", help="continue this stage from <out>/cvlp.pt")
    p.add_argument("--seed", type=int, default=0, help="seeds training and the shapes_lt world")
    p.add_argument("--accum", type=int, default=1, help="optimiser step every N batches (effective batch N x --batch; "
                   "cvlp's contrastive softmax still spans one --batch)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--stop-after-steps", type=int, default=0, help="debug: stop (and save) after this many steps")
    args = p.parse_args(argv)
    args = fill_defaults(args)
    args.epochs = args.epochs or {"shapes_lt": 10, "inat2018": 100}.get(args.data, 50)
    args.lr = args.lr or {"shapes_lt": 5e-4, "inat2018": 5e-4}.get(args.data, 5e-5)
    return args


def fill_defaults(args):
    """Per-dataset defaults shared by all stages (data.DATASETS); the run folder runs/<data>/<backbone>."""
    if args.data not in DATASETS:
        fail(f"unknown --data {args.data!r}; choose one of: {', '.join(DATASETS)}")
    d = DATASETS[args.data]
    args.backbone = args.backbone or d["backbone"]
    args.image_size = args.image_size or d["image_size"]
    args.data_root = args.data_root or d["root"]
    args.workers = args.workers if args.workers is not None else (0 if args.data == "shapes_lt" else 8)
    args.out = args.out or os.path.join("runs", args.data, args.backbone)
    return args


# ----------------------------------------------------------------------------------------------
# The equations


def cosine_similarity_matrix(E_I, E_T):
    """S_ij = cos(E^I_i, E^T_j) (Sec. 3.2). E_I (N, D), E_T (M, D) -> S (N, M)."""
    return F.normalize(E_I, dim=-1) @ F.normalize(E_T, dim=-1).T


def class_wise_contrastive_loss(S, y, t, tau, variant="paper"):
    """Eq. (2): L_ccl = L_vis + L_lin with every same-class pair a positive.

    S (N, N) cosine similarities of images (rows) and sentences (columns); y (N,) image labels,
    t (N,) sentence labels; tau scalar temperature. L_vis averages -log p over the positives of each
    image's row softmax; L_lin over the positives of each sentence's column softmax. That is a
    cross-entropy against the multi-hot row (column) normalised to sum 1: with all labels distinct it
    is CLIP's loss (times 2). official variant: label smoothing 0.1 on those targets, (L_vis + L_lin) / 2.
    """
    logits = S / tau                                             # (N, N)
    pos = (y[:, None] == t[None, :]).to(S.dtype)                 # (N, N) positives T_i^+ / I_j^+
    target_vis = pos / pos.sum(dim=1, keepdim=True)              # rows sum to 1: 1/|T_i^+| on positives
    target_lin = pos / pos.sum(dim=0, keepdim=True)              # columns sum to 1: 1/|I_j^+|
    if variant == "official":                                    # SPEC.md §3: smoothing 0.1
        eps, N = 0.1, S.shape[0]
        target_vis, target_lin = (1 - eps) * target_vis + eps / N, (1 - eps) * target_lin + eps / N
    L_vis = -(target_vis * logits.log_softmax(dim=1)).sum(dim=1).mean()
    L_lin = -(target_lin * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (L_vis + L_lin) / 2 if variant == "official" else L_vis + L_lin


def distillation_loss(S, S_teacher, tau, variant="paper"):
    """Eq. (3): the frozen CLIP teacher's matching probabilities as soft targets.

    paper: the diagonal terms only, -p'_ii log p_ii for the row (image -> text) and the column
    (text -> image) softmax, both at the student's tau (detached), averaged over the batch.
    official (SPEC.md §3): the full soft-target cross-entropy over every j, both directions, / 2,
    with the teacher at its own CLIP temperature (1/100).
    """
    logits = S / tau                                             # (N, N)
    if variant == "paper":
        logits_t = S_teacher / tau.detach()
        p_row, p_col = logits_t.softmax(dim=1).diagonal(), logits_t.softmax(dim=0).diagonal()   # (N,)
        logp_row, logp_col = logits.log_softmax(dim=1).diagonal(), logits.log_softmax(dim=0).diagonal()
        return -(p_row * logp_row + p_col * logp_col).mean()
    logits_t = S_teacher * 100.0
    row = -(logits_t.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    col = -(logits_t.softmax(dim=0) * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (row + col) / 2


def pretraining_loss(L_ccl, L_dis, lam):
    """Eq. (8): L_pre = lam L_ccl + (1 - lam) L_dis."""
    return lam * L_ccl + (1 - lam) * L_dis


# ----------------------------------------------------------------------------------------------
# Encoders: open_clip CLIP models (Eq. 1)

# The small CLIP stand-in for shapes_lt (SPEC §4): a ViT on 32 px images and a 2-layer text transformer.
TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2, head_width=32),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))
STANDIN_VERSION = 3   # bump when the stand-in's recipe changes: cached weights are keyed by it and the world's


def create_clip(backbone, image_size):
    """A randomly initialised open_clip CLIP: RN50, ViT-B-16, ... or the shapes-tiny stand-in."""
    if backbone == "shapes-tiny":
        cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": image_size}}
        return open_clip.CLIP(**cfg)
    if backbone not in open_clip.list_models():
        raise DataError(f"unknown --backbone {backbone!r}; use RN50, ViT-B-16 or another open_clip model name")
    # OpenAI's CLIP weights (the paper's) were trained with QuickGELU; open_clip's plain configs use nn.GELU,
    # which would load the same weights without complaint and compute something else.
    return open_clip.create_model(backbone, pretrained=None, force_image_size=image_size, force_quick_gelu=True)


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
    """Load a local CLIP state dict (plain, {'state_dict': ...}, 'module.'-prefixed) into model."""
    try:
        sd = open_clip.factory.load_state_dict(path)              # weights_only=True inside
    except Exception as e:
        raise DataError(f"cannot read CLIP weights {path}: {str(e).splitlines()[0]}; pass a state dict file")
    sd = interpolate_pos_embed(dict(sd), model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DataError(f"CLIP weights {path} do not fit this backbone ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[0]}); check --backbone")
    return model


def load_clip(args, device="cpu"):
    """The CLIP model with pre-trained weights: the student's init (--init clip) and the frozen teacher.

    --clip-weights PATH: a local file. shapes_lt: the stand-in, trained and cached on first use.
    Otherwise open_clip's 'openai' weights (downloaded once, then cached by open_clip)."""
    model = create_clip(args.backbone, args.image_size)
    if args.clip_weights:
        if not os.path.exists(args.clip_weights):
            raise DataError(f"--clip-weights {args.clip_weights} not found")
        return load_clip_file(model, args.clip_weights).to(device)
    if args.backbone == "shapes-tiny":
        path = os.path.join(args.data_root, f"clip_standin_v{SHAPES_VERSION}.{STANDIN_VERSION}_seed{args.seed}.pt")
        if not os.path.exists(path):
            train_clip_standin(model, args, path, device)
        return load_clip_file(model, path).to(device)
    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(args.backbone, "openai"))
    except Exception as e:
        raise DataError(f"no OpenAI CLIP weights for {args.backbone} ({type(e).__name__}): run once with internet "
                        f"so open_clip caches them, or pass --clip-weights PATH to a local state dict")
    return load_clip_file(model, path).to(device)


def train_clip_standin(model, args, path, device, n_pairs=20000, steps=450, batch=256):
    """Train the small CLIP stand-in on image-caption pairs of the shapes world (SPEC §4).

    Instance-wise CLIP training is Eq. (2) with one class per pair (labels 0..N-1 all distinct).
    Deliberately short: 450 steps give about 60% zero-shot top-1 on shapes_lt, as OpenAI CLIP RN50 gets
    on ImageNet-LT (59.8%, Table 8). 300 steps gave about 40%; a longer schedule passes 80% (seed 0).
    No augmentation: every pair is already a fresh random rendering."""
    print(f"training the shapes_lt CLIP stand-in ({steps} steps), cached at {path}")
    g = torch.Generator().manual_seed(args.seed)
    images, captions = shapes_caption_pairs(n_pairs, args.seed, args.image_size)
    tokens = tokenize_exact(captions, context_length(model))[0]                                  # (n, L)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in clip_mean_std())
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)                                       # (n, 3, H, W) uint8
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for step in progress(range(steps), desc="stand-in CLIP", unit="step"):
        idx = torch.randint(len(captions), (batch,), generator=g)
        x = ((pixels[idx].float() / 255 - mean) / std).to(device)
        S = cosine_similarity_matrix(model.encode_image(x), model.encode_text(tokens[idx].to(device)))
        loss = class_wise_contrastive_loss(S, idx.to(device), idx.to(device), 0.07) / 2   # = CLIP loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"  stand-in step {step + 1}/{steps}  CLIP loss {loss.item():.3f}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))


def clip_mean_std():
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


@torch.no_grad()
def encode_texts(model, tokens, device, batch=1024, desc="text"):
    """(S, L) tokens -> (S, D) L2-normalised text embeddings, in chunks (eval mode, no grad)."""
    model.eval()
    out = []
    for i in progress(range(0, len(tokens), batch), desc=desc, unit="batch"):
        with autocast(device):
            out.append(F.normalize(model.encode_text(tokens[i:i + batch].long().to(device)).float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1], device=device)


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


# ----------------------------------------------------------------------------------------------
# Checkpoints and run plumbing, shared by all stages


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


def make_loader(split, transform, args, sampling=None, generator=None, batch=None):
    """A DataLoader over one Split. With sampling="sqrt"|"instance" (training): data.make_sampler, wrapped
    so an epoch can resume part-way, and drop_last; without: in order (evaluation)."""
    sampler = ResumableSampler(make_sampler(split.labels, sampling, generator)) if sampling else None
    return torch.utils.data.DataLoader(
        ImageDataset(split, transform), batch_size=batch or args.batch, sampler=sampler,
        num_workers=args.workers, pin_memory=str(args.device).startswith("cuda"), drop_last=bool(sampling),
        persistent_workers=args.workers > 0)


# ----------------------------------------------------------------------------------------------
# Training


def corpus_tokens(data, model, args):
    """The class corpora tokenised at the model's context length (cached beside the shapes_lt world, or in
    the run folder); every class needs at least one sentence."""
    text = tokenize_corpus(data.corpus, context_length(model),
                           cache_dir=args.data_root if args.data == "shapes_lt" else args.out)
    require_sentences(data, text)
    return text


def require_sentences(data, text):
    """Every class needs at least one sentence: CVLP draws one per image, LGR attends over them."""
    empty = torch.nonzero(text["offsets"][1:] == text["offsets"][:-1]).flatten().tolist()
    if empty:
        names = ", ".join(data.classnames[c] for c in empty[:3])
        raise DataError(f"{len(empty)} classes have no sentences (e.g. {names}); keep the prompt templates "
                        f"(--text wiki+prompt or prompt) or add description files")


def sample_sentences(offsets, y, generator):
    """For each image label y_i, the index of one sentence of class y_i, drawn uniformly (Sec. 3.2)."""
    sizes = offsets[1:] - offsets[:-1]                           # (C,)
    u = torch.rand(len(y), generator=generator)
    return offsets[y] + (u * sizes[y]).long()                     # (N,)


def cvlp_loss(student, teacher, x, y, T, args):
    """The loss of one CVLP batch: images x (N, 3, H, W) with labels y (N,), one sentence T (N, L) of each
    image's class, so the sentence labels are t = y. Returns L_pre and its parts for the log."""
    E_I, E_T = student.encode_image(x), student.encode_text(T)          # Eq. (1)
    S = cosine_similarity_matrix(E_I.float(), E_T.float())              # (N, N)
    tau = 1 / student.logit_scale.exp().clamp(max=100)                 # learnable; 1/tau <= 100 as in CLIP
    L_ccl = class_wise_contrastive_loss(S, y, y, tau, args.variant)      # Eq. (2)
    if args.lam < 1:
        with torch.no_grad():                                           # frozen CLIP teacher, same inputs
            S_t = cosine_similarity_matrix(teacher.encode_image(x).float(), teacher.encode_text(T).float())
        L_dis = distillation_loss(S, S_t, tau, args.variant)            # Eq. (3)
    else:
        L_dis = torch.zeros((), device=S.device)
    return pretraining_loss(L_ccl, L_dis, args.lam), {"L_ccl": L_ccl, "L_dis": L_dis, "tau": tau}   # Eq. (8)


def prepare_out(args):
    """Create the run folder and make sure we can write there before any work is done."""
    try:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, ".write_test"), lambda f: f.write(b"ok"))
        os.remove(os.path.join(args.out, ".write_test"))
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


def fit(model, batch_loss, loader, opt, sched, args, path, meta, rngs, validate=None):
    """The training loop of both stages; True when all epochs ran. batch_loss(x, y) -> (loss, {name: value}); every --accum
    batches one optimiser step, gradients clipped to --clip-grad. What long runs need:
    - after every epoch an atomic checkpoint (plus <name>_best.pt when validate() improves);
    - Ctrl-C or --stop-after-steps saves the state of the last optimiser step, also mid-epoch;
    - --resume restores weights, optimiser, schedule, the epoch's sample order and position and every
      random state, so it ends with the same weights as an uninterrupted run (bitwise on CPU, --workers 0);
    - a non-finite loss stops the run before it reaches the weights or the checkpoint.
    rngs: {"sampler": generator of the sampler, ...other generators the batch_loss draws from}."""
    pos = {"epoch": 0, "batch": 0, "best": None, "sampler_epoch": rngs["sampler"].get_state()}
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
        print(f"resumed from {path} at epoch {pos['epoch'] + 1}, batch {pos['batch']}")

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

    interrupted = []                                             # Ctrl-C: finish the step, save, stop
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1) or signal.signal(signal.SIGINT, previous))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for epoch in range(pos["epoch"], args.epochs):
            if pos["batch"] == 0:
                pos["sampler_epoch"] = rngs["sampler"].get_state()     # this epoch's sample order comes from here
            rngs["sampler"].set_state(pos["sampler_epoch"])
            loader.sampler.skip = pos["batch"] * args.batch
            batches = iter(loader)
            if torch_rng is not None:                                  # augmentation randomness, mid-epoch resume
                torch.set_rng_state(torch_rng)
                torch_rng = None
            sums, n, t0 = {}, 0, time.time()
            bar = progress(batches, total=len(loader), desc=f"{meta['stage']} {epoch + 1}/{args.epochs}", unit="batch")
            for i, (x, y) in enumerate(bar, start=pos["batch"]):
                x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
                with autocast(args.device):
                    loss, stats = batch_loss(x, y)
                value = loss.item()                                    # one host sync per batch, for the log
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
                if interrupted or (args.stop_after_steps and sched.last_epoch >= args.stop_after_steps):
                    save(path, {**pos, "epoch": epoch, "batch": i + 1}, rng_states())   # mid-epoch position
                    why = "interrupted" if interrupted else f"stopped after {sched.last_epoch} steps (--stop-after-steps)"
                    print(f"{why}: saved {path} at epoch {epoch + 1}, batch {i + 1}; continue with --resume")
                    if interrupted:
                        sys.exit(130)
                    return False
            opt.zero_grad(set_to_none=True)                            # drop a partial accumulation
            pos = {**pos, "epoch": epoch + 1, "batch": 0}
            line = "  ".join(f"{k} {v / max(n, 1):.4f}" for k, v in sums.items())
            line += f"  lr {sched.get_last_lr()[0]:.2e}  {n * args.batch / (time.time() - t0):.0f} img/s"
            score = None
            if validate is not None:
                score, text = validate()
                line += "  " + text
            print(f"epoch {epoch + 1:3d}/{args.epochs}  {line}")
            if score is not None and (pos["best"] is None or score > pos["best"]):
                pos["best"] = score
                save(path.replace(".pt", "_best.pt"), pos, rng_states())
            save(path, pos, rng_states())
    except torch.cuda.OutOfMemoryError:
        raise DataError(f"GPU out of memory with --batch {args.batch}; pass a smaller --batch, or --batch "
                        f"{args.batch // 2} --accum {2 * args.accum} to keep the effective batch")
    finally:
        signal.signal(signal.SIGINT, previous)
    return True


@torch.no_grad()
def class_prototype_accuracy(model, data, text, args):
    """Val top-1 with each class represented by the mean embedding of its sentences (progress check)."""
    E_T = encode_texts(model, text["tokens"], args.device)
    protos = torch.zeros(data.num_classes, E_T.shape[1], device=args.device).index_add_(
        0, text["label"].to(args.device), E_T)
    protos = F.normalize(protos, dim=-1)
    loader = make_loader(data.val, make_transform(args.image_size, *clip_mean_std(), train=False), args)
    E_I, y = encode_images(model.encode_image, loader, args.device, desc="val")
    return (E_I @ protos.T).argmax(1).eq(y).float().mean().item()


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    seed_everything(args.seed)
    rngs = {"sampler": torch.Generator().manual_seed(args.seed), "text": torch.Generator().manual_seed(args.seed + 1)}
    torch.backends.cuda.matmul.allow_tf32 = True
    prepare_out(args)
    data = load_data(args.data, args.data_root, args.seed, text=args.text, skip_bad_images=args.skip_bad_images)
    path = os.path.join(args.out, "cvlp.pt")

    teacher = load_clip(args, args.device) if (args.init == "clip" or args.lam < 1) else None
    if args.init == "clip":
        student = load_clip(args, args.device)
    else:
        student = create_clip(args.backbone, args.image_size).to(args.device)
    with torch.no_grad():
        student.logit_scale.fill_(math.log(1 / args.tau))         # tau learnable, init 0.07 (Sec. 3.2)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    text = corpus_tokens(data, student, args)

    transform = make_transform(args.image_size, *clip_mean_std(), train=True, crop_scale=DATASETS[args.data]["crop_scale"])
    loader = make_loader(data.train, transform, args, sampling=args.sampling, generator=rngs["sampler"])
    if len(loader) < args.accum:
        raise DataError(f"--batch {args.batch} x --accum {args.accum} is larger than the training set "
                        f"({len(data.train.labels)} images); lower --batch")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.wd,
                            fused=str(args.device).startswith("cuda"))
    steps = len(loader) // args.accum
    sched = cosine_schedule(opt, args.epochs * steps, int(args.warmup * steps))

    def batch_loss(x, y):
        T = text["tokens"][sample_sentences(text["offsets"], y.cpu(), rngs["text"])]   # (N, L) one sentence per image
        return cvlp_loss(student, teacher, x, y, T.long().to(args.device, non_blocking=True), args)

    print(f"cvlp: {args.data} {args.backbone} {len(data.train.labels)} images, {len(text['tokens'])} sentences, "
          f"{args.epochs} epochs x {steps} steps, lam {args.lam}, variant {args.variant}, device {args.device}")
    student.train()
    if not fit(student, batch_loss, loader, opt, sched, args, path, checkpoint_meta(args, "cvlp", data.num_classes), rngs):
        return                                                   # stopped early: the checkpoint is written
    acc = class_prototype_accuracy(student, data, text, args)
    print(f"cvlp done: val top-1 with sentence-mean class prototypes {acc:.1%}; wrote {path}")


if __name__ == "__main__":
    main()
