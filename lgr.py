"""Stage 2b of VL-LTR: the language-guided recognition (LGR) head and fine-tuning, paper Sec. 3.3-3.4,
Eq. (4)-(7) and (9).

    python lgr.py --data shapes_lt              # reads cvlp.pt + anchor_embeds.pt, writes lgr.pt
    python lgr.py --data shapes_lt --head fc    # the vision-only baseline head, writes fc.pt

Each image embedding E^I attends over the M frozen anchor-sentence embeddings of every class
(Eq. 4-6); the gathered text embedding G of class c is compared with E^I by cosine similarity, and
added to a plain MLP classifier on E^I (Eq. 7). Both branches are trained with cross-entropy (Eq. 9).
"""
import argparse
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from anss import load_anchor_embeds, load_encoder, suffix
from clip_models import create_clip, embed_dim
from data import DATASETS, SHAPES_WORLDS, add_common_args, fill_defaults, load_data, make_loader, shot_split
from engine import (DataError, checkpoint_meta, cosine_schedule, distribute, eval_precision, fit, init_distributed,
                    prepare_out, progress, rank_world, run_stage, seed_everything)
from images import clip_transform


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VL-LTR stage 2b: language-guided recognition fine-tuning")
    add_common_args(p)
    p.add_argument("--init", default="cvlp", choices=["cvlp", "clip"],
                   help="visual encoder: CVLP's (cvlp.pt) or plain CLIP weights (Table 4 #2; the baseline)")
    p.add_argument("--head", default="lgr", choices=["lgr", "fc"], help="LGR (Eq. 4-7) or the vision-only FC baseline")
    p.add_argument("--variant", default="paper", choices=["paper", "official"], help="SPEC.md §3")
    p.add_argument("--freeze-visual", action="store_true", help="keep the visual encoder fixed (official RN50 setting)")
    p.add_argument("--epochs", type=int, default=None, help="default 50 (Sec. 4.3), fc baseline 100; iNat 360")
    p.add_argument("--batch", type=int, default=None, help="Sec. 4.3: 128; shapes_lt 64 (a tenth of ImageNet-LT's "
                   "images); per process under torchrun (global batch N x --batch)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (Sec. 4.3); 2e-5 iNat (Sec. 4.5)")
    p.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (Sec. 4.3)")
    p.add_argument("--warmup", type=float, default=1.0, help="linear warm-up epochs before the cosine decay")
    p.add_argument("--tau", type=float, default=0.07, help="Eq. (7) temperature, learnable from this value")
    p.add_argument("--sampling", default="sqrt", choices=["sqrt", "instance"], help="Sec. 4.3: square-root")
    p.add_argument("--loader", default="pil", choices=["pil", "gpu"],
                   help="gpu: workers only read the files; decoding and augmentation run batched on --device")
    p.add_argument("--resume", action="store_true", help="continue this stage from <out>/<head>.pt")
    p.add_argument("--save-every", type=float, default=0, metavar="MINUTES", help="also save <out>/<head>.pt every "
                   "this many minutes mid-epoch (0: after each epoch only): a run killed without warning loses at most that "
                   "much (with torchrun --max-restarts and --resume it goes on from there); the training is unchanged")
    p.add_argument("--accum", type=int, default=1, help="optimiser step every N batches (effective batch N x --batch)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--stop-after-steps", type=int, default=0, help="debug: stop (and save) after this many steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (faster steps on a GPU "
                   "after a minute or so of compiling; the same maths, checkpoints unchanged)")
    args = fill_defaults(p.parse_args(argv))
    # The paper's baseline (plain CLIP + FC, no CVLP stage) is fine-tuned for as many epochs as CVLP and
    # LGR together: 100 vs 50 + 50 (Sec. 4.3). Heads on a CVLP encoder get the LGR epochs (Table 4 #5).
    epochs = 10 if args.data in SHAPES_WORLDS else 360 if args.data == "inat2018" else 50
    args.epochs = args.epochs or (2 * epochs if (args.head, args.init) == ("fc", "clip") else epochs)
    args.lr = args.lr or {"inat2018": 2e-5}.get(args.data, 1e-3)
    args.batch = args.batch or (64 if args.data in SHAPES_WORLDS else 128)
    return args


# ----------------------------------------------------------------------------------------------
# The LGR head


class LGRHead(nn.Module):
    """Language-guided recognition head, Eq. (4)-(7). E^I (B, D) image embeddings; E^T (C, M, D)
    frozen anchor-sentence embeddings with mask (C, M), True for real sentences.

    forward computes what lgr_head_plain (the equations as written) computes, values and gradients, without
    its two costs that follow the data: K = W_k LN(E^T) (C M D^2 multiply-adds in every step) and the gathered
    G (B, C, D). It reads the anchors in one (2B, D) x (D, C M) product and keeps O(B C M) memory, with the
    anchor side that anchor_side(E^T) makes once (Recognizer keeps it as buffers). It runs in fp32 also under
    bf16 autocast (TF32 matmuls on a GPU): in bf16, <E^I, V> and the Gram quadratic form of the cosine moved
    logits_T by up to 0.07 on logits of 11, against 8e-4 in fp32 (C 200, D 512, CPU bf16 emulation)."""

    def __init__(self, D, C, tau=0.07, variant="paper"):
        super().__init__()
        self.ln_q, self.W_q = nn.LayerNorm(D), nn.Linear(D, D)
        self.ln_k, self.W_k = nn.LayerNorm(D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, C))   # 4D hidden: official code
        if variant == "official":        # SPEC.md §3: W_q, W_k start as identity; tau fixed at 0.07
            for W in (self.W_q, self.W_k):
                nn.init.eye_(W.weight)
                nn.init.zeros_(W.bias)
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1 / tau)), requires_grad=variant == "paper")
        # Training keeps 1/tau <= 100, CLIP's clamp on its learnable scale (SPEC.md §2): a learnable tau that runs
        # to 0 would make the text logits of Eq. 7 explode. A released head is read without it (its fixed scale).
        self.max_inv_tau = 100.0

    @torch.autocast("cuda", enabled=False)
    def anchor_side(self, E_T):
        """What the head needs of the anchors E^T (C, M, D), which stay fixed while the head learns: the mean
        and standard deviation over D that LayerNorm divides by (C, M) each (ln_k's eps), and the Gram
        matrices V V^T (C, M, M) of V = E^T. In E^T's precision also under the training's bf16 autocast."""
        var, mean = torch.var_mean(E_T, dim=-1, unbiased=False)    # (C, M) as LayerNorm computes them
        return mean, (var + self.ln_k.eps).sqrt(), E_T @ E_T.transpose(1, 2)

    @torch.autocast("cuda", enabled=False)
    def forward(self, E_I, E_T, mask, side=None):
        mean, std, VVt = side if side is not None else self.anchor_side(E_T)
        C, M, D = E_T.shape
        Q = self.W_q(self.ln_q(E_I))                             # Eq. (4)  (B, D)
        # Eq. (5)-(6) scores Q.K_cm without K. LayerNorm is LN_k(V_cm) = gamma_k * (V_cm - mean_cm) / std_cm + beta_k
        # and W_k(x) = W_k x + b_k, so by associativity
        #   Q.K_cm = (q.V_cm - mean_cm sum_d q_d) / std_cm + Q.W_k(beta_k),   q = (W_k^T Q) * gamma_k.
        # The last term is one number per image, the same for every anchor: the softmax over M ignores it (b_k and
        # beta_k get zero gradient in both forms). It is kept, at B D multiply-adds, so that the scores are Q K^T
        # itself and every parameter stays in the graph (DistributedDataParallel needs that).
        q = (Q @ self.W_k.weight) * self.ln_k.weight             # (B, D) the query folded through W_k and gamma_k
        shift = Q @ self.W_k(self.ln_k.bias)                     # (B,)   Q.(W_k beta_k + b_k)
        qV, EV = (torch.cat([q, E_I]) @ E_T.reshape(C * M, D).T).view(2, -1, C, M)   # (B, C, M) q.V_cm, E^I.V_cm
        QK = (qV - mean * q.sum(-1)[:, None, None]) / std + shift[:, None, None]      # (B, C, M) Q.K_cm
        A = attention_weights(QK, mask, D)                       # Eq. (6)  (B, C, M)
        tau = 1 / self.log_inv_tau.exp().clamp(max=self.max_inv_tau)
        # Eq. (6)-(7): cos(E^I, G) from A, <E^I, V> and V V^T; G = A V (B, C, D) is never built
        logits_I, logits_T = self.mlp(E_I), class_text_logits_via_gram(E_I, A, EV, VVt, tau)   # Eq. (7), before softmax
        return logits_I, logits_T, A


def lgr_head_plain(head, E_I, E_T, mask):
    """Eq. (4)-(7) as the paper writes them, with the weights of `head` (an LGRHead): the reference its forward
    equals, values and gradients (test_equations.py), and the "plain" row of bench.py. It builds K (C, M, D),
    C M D^2 multiply-adds, and G (B, C, D) in every call."""
    Q = head.W_q(head.ln_q(E_I))                                 # Eq. (4)  (B, D)
    K, V = head.W_k(head.ln_k(E_T)), E_T                         # Eq. (5)  (C, M, D), (C, M, D)
    A = language_guided_attention(Q, K, mask)                    # (B, C, M)
    G = torch.einsum("bcm,cmd->bcd", A, V)                       # Eq. (6)  (B, C, D)
    tau = 1 / head.log_inv_tau.exp().clamp(max=head.max_inv_tau)   # as in LGRHead.forward
    logits_I, logits_T = head.mlp(E_I), class_text_logits(E_I, G, tau)   # Eq. (7), before softmax
    return logits_I, logits_T, A


def language_guided_attention(Q, K, mask):
    """Eq. (6) weights: A = softmax over the M anchors of Q K^T / sqrt(D), padded anchors at -inf.
    Q (B, D), K (C, M, D), mask (C, M) -> A (B, C, M), each row sums to 1 over the real anchors."""
    return attention_weights(torch.einsum("bd,cmd->bcm", Q, K), mask, Q.shape[-1])   # (B, C, M)


def attention_weights(QK, mask, D):
    """softmax over the M anchors of Q K^T / sqrt(D) (B, C, M), padded anchors (mask False) at -inf: weight 0."""
    return (QK / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(dim=-1)


def class_text_logits(E_I, G, tau):
    """Eq. (7) text branch before the softmax: <E^I, G> / tau, cosine similarity of E^I (B, D) with each
    class's gathered embedding G (B, C, D) -> (B, C)."""
    return F.cosine_similarity(E_I[:, None, :], G, dim=-1) / tau


def class_text_logits_via_gram(E_I, A, EV, VVt, tau, eps=1e-8):
    """class_text_logits(E_I, G, tau) for G_c = sum_m A_cm V_cm without forming G (B, C, D). By bilinearity:
        <E^I, G_c> = sum_m A_cm <E^I, V_cm>,   |G_c|^2 = A_c^T (V_c V_c^T) A_c,
    exact, with V V^T (C, M, M) fixed. E^I (B, D), A (B, C, M), EV (B, C, M) = <E^I, V_cm>, VVt (C, M, M) -> (B, C).
    Padded anchors have A = 0 and drop out of both. eps as in F.cosine_similarity: each norm at least eps."""
    dot = (A * EV).sum(-1)                                       # (B, C)    <E^I, G_c>
    G_sq = (torch.einsum("bcm,cmn->bcn", A, VVt) * A).sum(-1)    # (B, C)    |G_c|^2
    norms = E_I.norm(dim=-1, keepdim=True).clamp_min(eps) * G_sq.clamp_min(eps ** 2).sqrt()   # (B, C)
    return dot / norms / tau


def lgr_probabilities(logits_I, logits_T, variant="paper", alpha=0.2):
    """Eq. (7): P = P^I + P^T = softmax(MLP(E^I)) + softmax(<E^I, G> / tau).
    official (SPEC.md §3): alpha P^I + (1 - alpha) P^T (alpha 0.2 ImageNet-LT / Places-LT, 0.7 iNat)."""
    P_I, P_T = logits_I.softmax(dim=-1), logits_T.softmax(dim=-1)
    return alpha * P_I + (1 - alpha) * P_T if variant == "official" else P_I + P_T


def logit_sum_prediction(logits_I, logits_T):
    """The prediction behind the official evaluation's many / medium / few columns (SPEC.md §3): argmax of the
    raw logit sum logits_I + logits_T, not of the alpha mix that gives its overall top-1. (B, C) x 2 -> (B,)."""
    return (logits_I + logits_T).argmax(1)


def recognition_loss(logits_I, logits_T, y):
    """Eq. (9): L_rec = CE(P^I, y) + CE(P^T, y), on the logits before each softmax of Eq. (7)."""
    return F.cross_entropy(logits_I, y) + F.cross_entropy(logits_T, y)


def official_alpha(data_name):
    return 0.7 if data_name == "inat2018" else 0.2


# ----------------------------------------------------------------------------------------------
# Model: visual encoder + head


class Recognizer(nn.Module):
    """The fine-tuned model: CLIP's visual encoder (E^I = E_vis(I), Eq. 1) and the LGR or FC head."""

    def __init__(self, visual, D, C, head="lgr", tau=0.07, variant="paper", anchors=None, mask=None):
        super().__init__()
        self.visual = visual
        self.head_kind = head
        self.head = LGRHead(D, C, tau, variant) if head == "lgr" else nn.Linear(D, C)
        if head == "lgr":                                        # frozen anchor embeddings: buffers, not weights
            self.register_buffer("anchors", anchors.float(), persistent=False)   # (C, M, D)
            self.register_buffer("mask", mask, persistent=False)                  # (C, M)
            mean, std, VVt = self.head.anchor_side(self.anchors)  # made once: the anchors stay fixed
            self.register_buffer("anchors_mean", mean, persistent=False)         # (C, M) LayerNorm's mean
            self.register_buffer("anchors_std", std, persistent=False)           # (C, M) and standard deviation
            self.register_buffer("anchors_gram", VVt, persistent=False)          # (C, M, M) V V^T

    def forward(self, x):
        E_I = self.visual(x).float()                             # (B, D)
        if self.head_kind == "fc":
            return self.head(E_I), None, None
        return self.head(E_I, self.anchors, self.mask, self.anchor_side())

    def anchor_side(self):
        """LGRHead.anchor_side(self.anchors), kept as buffers: (mean, std, Gram matrices)."""
        return self.anchors_mean, self.anchors_std, self.anchors_gram


def build_recognizer(args, device, ckpt=None):
    """Visual encoder from cvlp.pt (or CLIP) and a fresh head, or both from a saved lgr.py checkpoint;
    anchors from anchor_embeds.pt (frozen buffers, not part of the checkpoint)."""
    if ckpt is not None:
        encoder = create_clip(args.backbone, args.image_size, args.pretrained)
    else:
        encoder = load_encoder(args, device)[0]
    D = embed_dim(encoder)
    anchors = mask = None
    if args.head == "lgr":
        anchors, mask = load_anchor_embeds(args)
        if anchors.shape[-1] != D:
            raise DataError(f"anchor_embeds.pt has D = {anchors.shape[-1]}, the encoder D = {D}; rerun anss.py")
    C = len(anchors) if anchors is not None else args.num_classes
    model = Recognizer(encoder.visual, D, C, args.head, args.tau, args.variant, anchors, mask).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------------------------
# The released VL-LTR checkpoints of the official code (SPEC.md §8): read with our Recognizer

# Our LGRHead's parameters and the official head's (its "text_block"), one to one.
RELEASED_HEAD = {"ln_q.weight": "text_block.attn.norm1q.weight", "ln_q.bias": "text_block.attn.norm1q.bias",
                 "W_q.weight": "text_block.attn.wq.weight",
                 "ln_k.weight": "text_block.attn.norm1k.weight", "ln_k.bias": "text_block.attn.norm1k.bias",
                 "W_k.weight": "text_block.attn.wk.weight",
                 "mlp.0.weight": "text_block.visual_fc.0.weight", "mlp.0.bias": "text_block.visual_fc.0.bias",
                 "mlp.2.weight": "text_block.visual_fc.2.weight", "mlp.2.bias": "text_block.visual_fc.2.bias",
                 "log_inv_tau": "logit_scale"}


def read_released(path):
    """The "model" state dict of a released checkpoint.pth, read with weights_only=True. The file also holds
    the training run's argparse.Namespace under "args": that one class is allowed, nothing else."""
    if not os.path.isfile(path):
        raise DataError(f"--released {path} not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it holds a {found.group(1)} object, refused without running it" if found else str(e).splitlines()[0][:120]
        raise DataError(f"--released {path} is not a VL-LTR checkpoint.pth that can be read safely ({why})")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DataError(f"--released {path} has no \"model\" state dict; pass the checkpoint.pth of a released VL-LTR run")
    return ckpt["model"]


def recognizer_from_released(path, backbone, image_size):
    """A released VL-LTR checkpoint (SPEC.md §8) as our Recognizer, --variant official: its visual encoder,
    its anchor embeddings "text_embeddings" (C, M, D) with the zero rows (padding) masked, and its head
    mapped onto LGRHead (RELEASED_HEAD): the official W_q, W_k have no bias (ours are set to zero), its tau
    is the fixed exp(-logit_scale) as stored, above 1/100 or not. The image embedding reaches both branches as
    it is (Eq. 4, 7)."""
    sd = read_released(path)
    missing = [k for k in ["text_embeddings", *RELEASED_HEAD.values()] if k not in sd]
    unknown = [k for k in sd if k.startswith("text_block.") and k not in RELEASED_HEAD.values()]
    if missing or unknown or not any(k.startswith("visual.") for k in sd):
        what = f"no {missing[0]}" if missing else f"an unknown head weight {unknown[0]}" if unknown else "no visual.*"
        raise DataError(f"--released {path} is not in the released VL-LTR format ({what}, SPEC.md §8)")
    E_T = sd["text_embeddings"].float()                          # (C, M, D) anchors, zero rows = padding
    if E_T.dim() != 3:
        raise DataError(f"--released {path}: text_embeddings has shape {tuple(E_T.shape)}, expected (C, M, D)")
    C, M, D = E_T.shape
    mask = E_T.ne(0).any(dim=-1)                                 # (C, M) True for real anchor sentences
    if not mask.any(dim=1).all():
        raise DataError(f"--released {path}: class {int((~mask.any(dim=1)).nonzero()[0])} has no anchor sentence")
    encoder = create_clip(backbone, image_size)                  # OpenAI's weights: the official code fine-tuned those
    if embed_dim(encoder) != D:
        raise DataError(f"--released {path} has D = {D}, --backbone {backbone} D = {embed_dim(encoder)}; "
                        f"pass the backbone it was trained with (RN50: 1024, ViT-B-16: 512)")
    model = Recognizer(encoder.visual, D, C, "lgr", variant="official", anchors=E_T, mask=mask)
    model.head.max_inv_tau = math.inf                            # the official head: exp(logit_scale), no clamp
    state = {k: v for k, v in sd.items() if k.startswith("visual.")}
    state.update({f"head.{ours}": sd[theirs] for ours, theirs in RELEASED_HEAD.items()})
    state["head.W_q.bias"] = state["head.W_k.bias"] = torch.zeros(D)   # the official W_q, W_k: no bias
    try:
        model.load_state_dict(state)                             # strict: every key, every shape
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise DataError(f"--released {path} does not fit --backbone {backbone} at --image-size {image_size}: "
                        f"{detail[:200]}")
    return model


@torch.no_grad()
def predict(model, loader, args, desc="eval"):
    """All predictions of a loader: {"P": Eq. 7, "P_I": visual branch, "P_T": text branch} argmaxes, with
    --variant official also "logit_sum" (the official many / medium / few rule), and labels. In the evaluation
    precision (fp32; --eval-precision fp16 on CUDA for a released model), whatever the training precision."""
    model.eval()
    preds, labels = {"P": [], "P_I": [], "P_T": [], "logit_sum": []}, []
    for x, y in progress(loader, desc=desc, unit="batch"):
        with eval_precision(args.device, getattr(args, "eval_precision", "fp32")):
            logits_I, logits_T, _ = model(x.to(args.device, non_blocking=True))
        logits_I = logits_I.float()
        if logits_T is None:
            preds["P"].append(logits_I.argmax(1).cpu())
        else:
            P = lgr_probabilities(logits_I, logits_T.float(), args.variant, official_alpha(args.data))
            preds["P"].append(P.argmax(1).cpu())
            preds["P_I"].append(logits_I.argmax(1).cpu())
            preds["P_T"].append(logits_T.argmax(1).cpu())
            if args.variant == "official":
                preds["logit_sum"].append(logit_sum_prediction(logits_I, logits_T.float()).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in preds.items() if v}, torch.cat(labels)


def accuracy_by_shot(pred, y, counts):
    """Top-1 overall / many / medium / few (Sec. 4.2) and per class, in %. pred, y (N,); counts (C,) train images."""
    correct = (pred == y).float()                                # (N,)
    shot = shot_split(counts)[y.numpy()]                         # (N,) the split of each image's class
    per_class = torch.zeros(len(counts)).index_add_(0, y, correct) / torch.bincount(y, minlength=len(counts)).clamp(min=1)
    out = {"overall": 100 * correct.mean().item()}
    for name in ("many", "medium", "few"):
        sel = torch.from_numpy(shot == name)
        out[name] = 100 * correct[sel].mean().item() if sel.any() else float("nan")
    out["per_class"] = [round(100 * v, 2) for v in per_class.tolist()]
    return out


def official_accuracy(pred_mix, pred_logit_sum, y, counts):
    """The numbers as the official evaluation reports them, and as the paper's tables print them (SPEC.md §3):
    overall top-1 of the alpha mix, many / medium / few of the logit sum (logit_sum_prediction), two predictions.
    So the columns need not average to the overall: ImageNet-LT RN50 77.8 / 67.0 / 50.8 give ~69.0, not 70.1."""
    mix, logit_sum = accuracy_by_shot(pred_mix, y, counts), accuracy_by_shot(pred_logit_sum, y, counts)
    return {"overall": mix["overall"], **{k: logit_sum[k] for k in ("many", "medium", "few")}}


# ----------------------------------------------------------------------------------------------
# Training


def lgr_loss(model, x, y):
    """The loss of one fine-tuning batch: Eq. (9) for the LGR head, plain cross-entropy for the FC baseline."""
    logits_I, logits_T, _ = model(x)
    if logits_T is None:
        return F.cross_entropy(logits_I.float(), y), {}
    return recognition_loss(logits_I.float(), logits_T.float(), y), {}


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    init_distributed(args)                                       # torchrun: join the other ranks (else nothing)
    seed_everything(args.seed)
    rngs = {"sampler": torch.Generator().manual_seed(args.seed)}
    prepare_out(args)
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    path = os.path.join(args.out, f"{args.head}{suffix(args)}.pt")   # lgr.pt, fc.pt; fc_clip.pt = the baseline
    model = build_recognizer(args, args.device)
    if args.freeze_visual:
        model.visual.requires_grad_(False)
    if args.compile:                       # in place (nn.Module.compile): parameter names, checkpoints unchanged
        model.visual.compile()

    train_transform = clip_transform(args, train=True, crop_scale=DATASETS[args.data]["crop_scale"])
    loader = make_loader(data.train, train_transform, args, sampling=args.sampling, generator=rngs["sampler"])
    if len(loader) < args.accum:
        raise DataError(f"--batch {args.batch} x --accum {args.accum} is larger than the training set "
                        f"({len(data.train.labels)} images); lower --batch")
    val_loader = make_loader(data.val, clip_transform(args, train=False), args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.wd, fused=str(args.device).startswith("cuda"))
    steps = len(loader) // args.accum
    sched = cosine_schedule(opt, args.epochs * steps, int(args.warmup * steps))

    def train_mode():
        model.train()
        if args.freeze_visual:
            model.visual.eval()

    def validate():
        preds, y = predict(model, val_loader, args, desc="val")
        acc = accuracy_by_shot(preds["P"], y, data.counts)
        train_mode()
        return acc["overall"], (f"val top-1 {acc['overall']:.1f} (many {acc['many']:.1f} / medium {acc['medium']:.1f}"
                                f" / few {acc['few']:.1f})")

    # torchrun: DDP averages the ranks' gradients of their mean losses over b images: the mean over N b images
    train_model = distribute(model, args) if rank_world()[1] > 1 else model
    print(f"{args.head}: {args.data} {args.backbone} init {args.init}, {args.epochs} epochs x {steps} steps, "
          f"lr {args.lr}, visual {'frozen' if args.freeze_visual else 'fine-tuned'}, device {args.device}")
    train_mode()
    meta = {**checkpoint_meta(args, "lgr", data.num_classes), "head": args.head, "init": args.init}
    if fit(model, lambda x, y: lgr_loss(train_model, x, y), loader, opt, sched, args, path, meta, rngs, validate):
        print(f"wrote {path} (last) and {os.path.basename(path).replace('.pt', '_best.pt')} (best val)")


if __name__ == "__main__":
    main()
