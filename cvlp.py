"""Stage 1 of VL-LTR: class-wise visual-linguistic pre-training (CVLP), paper Sec. 3.2 and Eq. (1)-(3), (8).

    python cvlp.py --data shapes_lt                 # writes runs/shapes_lt/shapes-tiny/cvlp.pt
    python cvlp.py --data imagenet_lt --backbone RN50 --clip-weights RN50.pt

An image and a sentence of the same class are a positive pair. A batch holds N images and, for
each image, one sentence drawn uniformly from its class's corpus; the loss pulls every image
towards all sentences of its class (Eq. 2), and a frozen CLIP teacher's similarities are distilled
into the student (Eq. 3). The training loop and checkpoints are engine.py's, the CLIP models clip_models.py's.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (DATASETS, accuracy_by_shot, add_common_args, corpus_tokens, fill_defaults, image_transform, load_data,
                  make_loader)
from util import flags, shapes_lt
from util.clip_models import (PackedText, cast_frozen_weights, channels_last, create_clip, encode_images,
                              encode_sentences, encode_texts, load_clip_file, pack_sentences, packable,
                              pretrained_weights)
from util.distributed import distribute, gather, init_distributed, rank_world
from util.engine import (add_training_args, autocast, checkpoint_meta, fit, host_to_device, optimizer_and_schedule,
                         parameter_groups, prepare_out, run_stage, seed_everything)
from util.run_folder import already_finished


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR stage 1: class-wise visual-linguistic pre-training")
    add_common_args(p)
    add_training_args(p, "cvlp.pt")
    p.add_argument("--init", default="clip", choices=["clip", "scratch"],
                   help="student initialisation: CLIP weights (paper) or random (Table 4 #3)")
    p.add_argument("--variant", default="paper", choices=["paper", "official"],
                   help="the paper's equations and settings, or the official code's where they differ "
                   "(docs/design.md §3)")
    p.add_argument("--lam", type=flags.unit_interval, default=0.5, help="Eq. (8) weight of L_ccl (Sec. 3.4 and Table 9: 0.5); 1 "
                   "turns L_dis off (Table 4 #4)")
    p.add_argument("--tau", type=flags.positive, default=None, help="initial temperature, learnable (Sec. 3.2: 0.07, the "
                   "default; --variant official: CLIP's own learned value, as the official code loads it)")
    p.add_argument("--text", default="wiki+prompt", choices=["wiki+prompt", "prompt"],
                   help="text source (Table 10: 'prompt only' keeps the 80 templates)")
    p.add_argument("--text-pass", default="packed", choices=["packed", "groups"], help="the student's text tower in a "
                   "step: packed, every sentence up to its EOT in one pass; groups, 4 length groups each cut to its "
                   "longest sentence (the readable form; the same embeddings, tests/test_fast_path.py)")
    p.add_argument("--val-every-epoch", action="store_true", help="print the val top-1 of sentence-mean class "
                   "prototypes after every epoch and keep the best epoch in cvlp_best.pt (the over-fitting check of "
                   "the README's L_dis experiment; the training itself is unchanged)")
    args = fill_defaults(p.parse_args(argv), "cvlp")
    if args.tau is None and args.variant == "paper":
        args.tau = 0.07
    return args


# ----------------------------------------------------------------------------------------------
# The equations


def cosine_similarity_matrix(E_I, E_T):
    """S_ij = cos(E^I_i, E^T_j) (Sec. 3.2). E_I (N, D), E_T (M, D) -> S (N, M)."""
    return F.normalize(E_I, dim=-1) @ F.normalize(E_T, dim=-1).T


def temperature(log_inv_tau, max_inv_tau=100.0):
    """The learnable temperature tau (Sec. 3.2), kept as log(1 / tau) as CLIP keeps its logit scale. CVLP's is CLIP's
    logit_scale, LGR's the head's own (Eq. 7). 1 / tau <= max_inv_tau: see inverse_tau_limit."""
    return 1 / log_inv_tau.exp().clamp(max=max_inv_tau)


def inverse_tau_limit(variant):
    """The clamp on 1 / tau: 100, CLIP's training rule, a safeguard of the project's own (a learnable tau running to 0
    would blow up the logits; at the paper's settings it never binds); --variant official: none, as its code has none."""
    return math.inf if variant == "official" else 100.0


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
    if variant == "official":                                    # docs/design.md §3: smoothing 0.1
        eps, N = 0.1, S.shape[0]
        target_vis, target_lin = (1 - eps) * target_vis + eps / N, (1 - eps) * target_lin + eps / N
    L_vis = -(target_vis * logits.log_softmax(dim=1)).sum(dim=1).mean()
    L_lin = -(target_lin * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (L_vis + L_lin) / 2 if variant == "official" else L_vis + L_lin


def distillation_loss(S, S_teacher, tau, variant="paper"):
    """Eq. (3): the frozen CLIP teacher's matching probabilities as soft targets.

    paper: the diagonal terms only, -p'_ii log p_ii for the row (image -> text) and the column
    (text -> image) softmax, both at the student's tau (detached), averaged over the batch.
    official (docs/design.md §3): the full soft-target cross-entropy over every j, both directions, / 2,
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
# The encoders (Eq. 1): CLIP's, pre-trained


def load_clip(args, device="cpu"):
    """The CLIP model with pre-trained weights: the student's init (--init clip) and the frozen teacher.

    --clip-weights PATH: a local file (of the weights --pretrained names). shapes_lt: the world's small stand-in
    (shapes_lt.ensure_standin: seed 0's from the repository, another seed's trained and cached on first use). Otherwise open_clip's weights of --pretrained (default
    'openai', the paper's; downloaded once, then cached by open_clip). The model is built as those weights were
    trained (QuickGELU or GELU, clip_models.create_clip)."""
    path = args.clip_weights
    if not path and args.backbone != "shapes-tiny":
        path = pretrained_weights(args.backbone, args.pretrained)   # before building the model: offline fails at once
    model = create_clip(args.backbone, args.image_size, args.pretrained)
    if not path:
        path = shapes_lt.ensure_standin(args.data_root, args.seed, model, device)
    return load_clip_file(model, path).to(device)


# ----------------------------------------------------------------------------------------------
# Training


def sample_sentences(offsets, y, generator):
    """For each image label y_i, the index of one sentence of class y_i, drawn uniformly (Sec. 3.2). y on the host."""
    sizes = offsets[1:] - offsets[:-1]                           # (C,)
    rank, world_size = rank_world()                              # torchrun: draw for the global batch, keep ours
    u = torch.rand(len(y) * world_size, generator=generator)[rank * len(y):(rank + 1) * len(y)]
    return offsets[y] + (u * sizes[y]).long()                     # (N,)


def batch_text(student, text, teacher_text, y, generator, args):
    """A batch's sentences, drawn from the loader's labels y (N,) on the host, and what the step reads with them:
    (T, the text tower's input on args.device: a PackedText for --text-pass packed (where the tower packs), else
    (N, L) tokens; y on args.device; E_T_teacher (N, D), the teacher's cached embeddings of the sentences, or None).
    Nothing here waits for the device: the draw reads host labels, the copies leave pinned memory without blocking."""
    k = sample_sentences(text["offsets"], y, generator)         # (N,) one sentence per image
    T = text["tokens"][k]                                        # (N, L) on the host
    if getattr(args, "text_pass", "packed") == "packed" and packable(student):
        T = pack_sentences(T, args.device)
    y, k = host_to_device(y, args.device), host_to_device(k, args.device)
    return T, y, (teacher_text[k] if teacher_text is not None else None)


class Encoders(nn.Module):
    """torchrun: the student's two encoders (Eq. 1) as one forward for DistributedDataParallel, which syncs
    the gradients of what runs through its forward (CLIP's own forward returns normalised features)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, x, T):
        return self.clip.encode_image(x), encode_sentences(self.clip, T)


def cvlp_loss(student, teacher, x, y, T, args, E_T_teacher=None, ddp=None):
    """The loss of one CVLP batch: images x (N, 3, H, W) with labels y (N,), one sentence of each image's class in T
    (the text tower's input: a clip_models.PackedText, or (N, L) tokens), so the sentence labels are t = y.
    E_T_teacher (N, D): the frozen teacher's embeddings of these sentences, from run()'s cache (computed here when
    None); ddp: torchrun's DistributedDataParallel of Encoders(student). Returns L_pre and its parts for the log."""
    E_I, E_T = ddp(x, T) if ddp else (student.encode_image(x), encode_sentences(student, T))   # Eq. (1)
    E_I, E_T, y = global_batch(E_I), global_batch(E_T), global_batch(y)   # torchrun: every rank's pairs
    S = cosine_similarity_matrix(E_I.float(), E_T.float())              # (N, N)
    tau = temperature(student.logit_scale, inverse_tau_limit(args.variant))   # learnable (Sec. 3.2)
    L_ccl = class_wise_contrastive_loss(S, y, y, tau, args.variant)      # Eq. (2)
    if args.lam < 1:
        L_dis = distillation_loss(S, teacher_similarities(teacher, x, T, E_T_teacher), tau, args.variant)   # Eq. (3)
    else:
        L_dis = torch.zeros((), device=S.device)
    return pretraining_loss(L_ccl, L_dis, args.lam), {"L_ccl": L_ccl, "L_dis": L_dis, "tau": tau}   # Eq. (8)


@torch.no_grad()
def teacher_similarities(teacher, x, T, E_T_teacher=None):
    """S' of Eq. (3): the frozen CLIP teacher's cosine similarities of the batch's images and sentences (N, N),
    over the global batch under torchrun. E_T_teacher (N, D): its text embeddings from the cache, else its forward."""
    if E_T_teacher is None:
        E_T_teacher = encode_sentences(teacher, T)
    return cosine_similarity_matrix(global_batch(teacher.encode_image(x).float()), global_batch(E_T_teacher.float()))


def global_batch(t):
    """torchrun: each rank's (b, ...) share of the global batch's N * b pairs, gathered in rank order, so that S is
    the global (N b, N b) matrix and every rank computes the one-process loss L; one process: t itself.
    Gradients: all_gather's backward sums the N ranks' (equal) dL/dE of this rank's share, N dL/dE, and DDP
    divides the sum of the ranks' gradients by N: the sum over ranks of dL/dtheta through each share, the
    one-process gradient. tau is used on every rank outside the gather: the mean of N equal gradients, again
    the one-process gradient."""
    return gather(t)


def prepare_step(student, teacher, args):
    """Once before training, what the device wants of the step; the same maths (tests/test_fast_path.py on the CPU,
    tests/test_cuda.py on a GPU). CUDA: cuDNN's autotuner (the step's image shapes never change: drop_last), RN50's
    convolutions in channels_last, the frozen teacher's weights cast once to the precision autocast computes them in.
    --compile: in one process, the whole loss (both encoders, the teacher, Eq. 2-8) as one compiled graph and its
    backward as another (fused AdamW is a handful of kernels already); under torchrun the image encoders, in place
    (DistributedDataParallel wraps a plain module). Returns the compiled loss, or None (the step calls cvlp_loss)."""
    models = (student, teacher) if args.lam < 1 else (student,)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        for model in models:
            channels_last(model)
        if args.lam < 1:
            probe = torch.zeros(2, 3, args.image_size, args.image_size, device=args.device)
            cast_frozen_weights(teacher, lambda: teacher.encode_image(probe), autocast(args.device))
    if not args.compile:
        return None
    if rank_world()[1] > 1:
        for model in models:
            model.visual.compile()
        return None
    return compiled_loss()


def compiled_loss():
    """torch.compile of cvlp_loss, called as it is. The sentences' total length P changes from batch to batch, so
    the packed rows are marked dynamic: one graph for every batch, not one per length."""
    step = torch.compile(cvlp_loss)

    def loss(student, teacher, x, y, T, *rest):
        if isinstance(T, PackedText):
            for t in (T.tokens, T.positions, T.rows):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return step(student, teacher, x, y, T, *rest)
    return loss


@torch.no_grad()
def class_prototype_accuracy(model, data, text, args):
    """Val top-1 (%, data.accuracy_by_shot: overall, many, medium, few) with each class represented by the mean
    embedding of its sentences (progress check).
    Runs in eval mode (RN50's batch norm) and leaves torch's random state as it found it: the val loader's
    seed draw must not move the training's augmentation, so a run with --val-every-epoch trains the same."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        E_T = encode_texts(model, text["tokens"], args.device)                          # (S, D)
        protos = torch.zeros(data.num_classes, E_T.shape[1], device=args.device).index_add_(
            0, text["label"].to(args.device), E_T)                                      # (C, D)
        protos = F.normalize(protos, dim=-1)
        loader = make_loader(data.val, image_transform(args, train=False), args)
        E_I, y = encode_images(model.encode_image, loader, args.device, desc="val")    # (V, D), (V,)
    model.train(was_training)
    return accuracy_by_shot((E_I @ protos.T).argmax(1).cpu(), y.cpu(), data.counts)


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    init_distributed(args)                                       # torchrun: join the other ranks (else nothing)
    seed_everything(args.seed)
    rngs = {"sampler": torch.Generator().manual_seed(args.seed), "text": torch.Generator().manual_seed(args.seed + 1)}
    prepare_out(args)
    path = os.path.join(args.out, "cvlp.pt")
    if already_finished(path, args):                             # never trains over a checkpoint by accident
        return
    rank, world_size = rank_world()
    if rank > 0:                          # torchrun: wait while rank 0 makes the caches (world, CLIP stand-in, tokens)
        torch.distributed.barrier()
    data = load_data(args.data, args.data_root, args.seed, text=args.text, skip_bad_images=args.skip_bad_images)

    teacher = load_clip(args, args.device).eval().requires_grad_(False) if args.lam < 1 else None   # L_dis's frozen CLIP
    if args.init == "clip":
        student = load_clip(args, args.device)
    else:
        student = create_clip(args.backbone, args.image_size, args.pretrained).to(args.device)
    if args.tau is not None:                                     # tau learnable, init 0.07 (Sec. 3.2)
        with torch.no_grad():
            student.logit_scale.fill_(math.log(1 / args.tau))
    text = corpus_tokens(data, student, args)
    if rank == 0 and world_size > 1:                             # torchrun: the caches are there
        torch.distributed.barrier()
    teacher_text = None
    if args.lam < 1:                       # the frozen teacher's embedding of a sentence never changes: once, here
        teacher_text = encode_texts(teacher, text["tokens"], args.device, desc="teacher text",   # (S, D), in the
                                    training_precision=True)     # precision the step's own teacher forward would use

    loader = make_loader(data.train, image_transform(args, train=True), args, sampling=args.sampling,
                         generator=rngs["sampler"])
    opt, sched, steps = optimizer_and_schedule(parameter_groups(student, args.wd, args.variant)[0], loader, args)

    compiled = prepare_step(student, teacher, args)             # layouts and casts the GPU wants; --compile
    ddp = distribute(Encoders(student), args) if world_size > 1 else None   # torchrun: gradients synced

    def batch_loss(x, y):                                        # y: the loader's labels, on the host
        T, y, E_T_teacher = batch_text(student, text, teacher_text, y, rngs["text"], args)
        return (compiled or cvlp_loss)(student, teacher, x, y, T, args, E_T_teacher, ddp)

    print(f"cvlp: {args.data} {args.backbone} {len(data.train.labels)} images, {len(text['tokens'])} sentences, "
          f"{args.epochs} epochs x {steps} steps, lam {args.lam}, variant {args.variant}, device {args.device}")

    scores = []

    def validate():                                              # --val-every-epoch: the over-fitting check
        scores.append(class_prototype_accuracy(student, data, text, args))
        return scores[-1], f"val proto top-1 {shot_line(scores[-1])}"

    if args.val_every_epoch and not args.resume:                 # where the curve starts: the CLIP weights
        print(f"before training: val proto top-1 {shot_line(class_prototype_accuracy(student, data, text, args))}")
    # train mode: BatchNorm's batch statistics (RN50); the official ImageNet-LT and Places-LT configs keep the running
    # ones (train_mode False), its iNat configs train mode: DATASETS' cvlp_train_mode. ViTs have no BatchNorm.
    student.train(DATASETS[args.data]["cvlp_train_mode"])
    if not fit(student, batch_loss, loader, opt, sched, args, path, checkpoint_meta(args, "cvlp", data.num_classes), rngs,
               validate if args.val_every_epoch else None):
        return                                                   # stopped early: the checkpoint is written
    acc = scores[-1] if scores else class_prototype_accuracy(student, data, text, args)   # the last epoch's, if measured
    print(f"cvlp done: val top-1 with sentence-mean class prototypes {shot_line(acc)}; wrote {path}")


def shot_line(acc):
    """"63.0 (many 70.1 / medium 61.2 / few 55.0)": a val top-1 by shot split (data.accuracy_by_shot), in %."""
    return f"{acc['overall']:.1f} (many {acc['many']:.1f} / medium {acc['medium']:.1f} / few {acc['few']:.1f})"


if __name__ == "__main__":
    main()
