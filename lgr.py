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

import torch
import torch.nn as nn
import torch.nn.functional as F

from anss import load_anchor_embeds, load_encoder
from cvlp import inverse_tau_limit, temperature
from data import (DATASETS, accuracy_by_shot, add_common_args, fill_defaults, image_transform, load_data, make_loader,
                  official_setting)
from util import flags
from util.clip_models import create_clip, embed_dim
from util.distributed import distribute, init_distributed, rank_world
from util.engine import (add_training_args, best_path, checkpoint_meta, eval_precision, fit, host_to_device,
                         optimizer_and_schedule, parameter_groups, prepare_out, run_file, run_stage, seed_everything)
from util.errors import CheckpointError, DataError
from util.progress import progress
from util.run_folder import already_finished, check_file, states

# --variant official: the learning rate of the LGR attention's parameters (its fine-tuning configs' text_lr; its
# optimiser gives every parameter without "visual" in its name this rate, the MLP ("visual_fc") the lr).
OFFICIAL_TEXT_LR = 1e-6


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR stage 2b: language-guided recognition fine-tuning")
    add_common_args(p)
    add_training_args(p, "<head>.pt: lgr.pt, fc.pt, fc_clip.pt")
    p.add_argument("--init", default="cvlp", choices=["cvlp", "clip"],
                   help="visual encoder: CVLP's (cvlp.pt) or plain CLIP weights (Table 4 #2; the baseline)")
    p.add_argument("--head", default="lgr", choices=["lgr", "fc"], help="LGR (Eq. 4-7) or the vision-only FC baseline")
    p.add_argument("--variant", default="paper", choices=["paper", "official"],
                   help="the paper's equations and settings, or the official code's where they differ "
                   "(docs/design.md §3)")
    p.add_argument("--freeze-visual", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the visual encoder fixed (default: fine-tuned, Sec. 3.1; --variant official: frozen on "
                   "ImageNet-LT and Places-LT, fine-tuned on iNat, as its configs)")
    p.add_argument("--tau", type=flags.positive, default=None, help="Eq. (7)'s tau (default: the encoder's own learned "
                   "temperature, CVLP's, or CLIP's with --init clip, fixed, as the official code loads it; the paper "
                   "does not say)")
    p.add_argument("--learn-tau", action="store_true", help="let Eq. (7)'s tau learn from there (the project's option; "
                   "the official code keeps it fixed)")
    p.add_argument("--head-form", default=None, choices=["paper", "gram"], help="how LGRHead computes Eq. (4)-(7): "
                   "paper = K and G as written, gram = the same values and gradients without them, far less memory "
                   "at iNat's 8,142 classes (default: the dataset's, DATASETS head_form: gram on iNat)")
    p.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=None,
                   help="Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 on both branches' targets (default: off, the "
                   "paper's Eq. 9 on the labels; --variant official: on, as its fine-tuning runs)")
    args = p.parse_args(argv)
    baseline = args.epochs is None and (args.head, args.init) == ("fc", "clip")
    args = fill_defaults(args, "lgr")
    if baseline:             # the CLIP + FC baseline: Sec. 4.3, 100 epochs; Sec. 4.5, iNat: LGR's 360 (DATASETS)
        args.epochs = DATASETS[args.data]["baseline_epochs"]
    official = args.variant == "official"
    if args.freeze_visual is None:
        args.freeze_visual = official and official_setting(args.data, "freeze_visual")
    if args.mixup is None:
        args.mixup = official
    args.head_form = args.head_form or DATASETS[args.data]["head_form"]
    return args


# ----------------------------------------------------------------------------------------------
# The LGR head


class LGRHead(nn.Module):
    """Language-guided recognition head, Eq. (4)-(7). E^I (B, D) image embeddings; E^T (C, M, D) frozen
    anchor-sentence embeddings with mask (C, M), True for real sentences -> logits of P^I and P^T (B, C) each
    and the attention A (B, C, M).

    What the paper leaves open is the official code's (docs/design.md): W_q and W_k without bias, starting as the
    identity; the MLP's layers initialised truncated-normal (std 0.02) with zero bias; tau fixed at the encoder's
    learned value (`tau`; learn_tau: learnable, the project's option, with CLIP's clamp 1/tau <= 100).
    variant "official": no clamp on 1/tau (its head has none). detach_norm: the norm |G_c| of the text branch's
    cosine is a constant to the gradient (the official iNat models' v_detach; the values are the same).

    forward computes the attention and the text branch in one of two exact forms, chosen by `form` (as nanoGPT
    keeps its manual attention beside the fused one):
      "paper": the equations as written: K = W_k LN(E^T) (C, M, D) and G = A V (B, C, D) in every call, C M D^2
               multiply-adds for K and O(B C D) memory for G (iNat, RN50, batch 128: 32 GiB). The default up to a
               thousand classes (DATASETS head_form);
      "gram":  the same values and gradients from the anchor side made once (anchor_side: LayerNorm's mean and std,
               the Gram matrices V V^T) without K or G: one (2B, D) x (D, C M) product and O(B C M) memory; iNat's
               default. Why it is exact: gram_form; the proof that it is: tests/test_exact_forms.py (values and
               gradients, padded anchors, float64 against "paper") and tests/test_cuda.py (the same on a GPU).
    Both run in fp32 also under the training's bf16 autocast (TF32 matmuls on a GPU): in bf16, <E^I, V> and the
    Gram quadratic form moved logits_T by up to 0.07 on logits of 11, against 8e-4 in fp32 (C 200, D 512)."""

    def __init__(self, D, C, tau=0.07, variant="paper", form="paper", learn_tau=False, detach_norm=False):
        super().__init__()
        self.form, self.detach_norm = form, detach_norm
        self.ln_q, self.W_q = nn.LayerNorm(D), nn.Linear(D, D, bias=False)
        self.ln_k, self.W_k = nn.LayerNorm(D), nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, C))   # 4D hidden: official code
        for W in (self.W_q, self.W_k):                           # official code: identity, so Q K^T = LN(E^I) LN(E^T)^T
            nn.init.eye_(W.weight)
        for layer in (self.mlp[0], self.mlp[2]):                 # official code: truncated normal, std 0.02
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1 / tau)), requires_grad=learn_tau)
        self.max_inv_tau = inverse_tau_limit(variant)            # cvlp.inverse_tau_limit: 100, or none (official)

    @torch.autocast("cuda", enabled=False)
    def forward(self, E_I, E_T, mask, side=None):
        Q = self.W_q(self.ln_q(E_I))                             # Eq. (4)  (B, D)
        tau = temperature(self.log_inv_tau, self.max_inv_tau)
        if self.form == "paper":
            K, V = self.W_k(self.ln_k(E_T)), E_T                 # Eq. (5)  (C, M, D), (C, M, D)
            A = language_guided_attention(Q, K, mask)            # Eq. (6)  (B, C, M)
            G = torch.einsum("bcm,cmd->bcd", A, V)               # Eq. (6)  (B, C, D)
            logits_T = class_text_logits(E_I, G, tau, self.detach_norm)   # Eq. (7)  (B, C), before the softmax
        else:
            A, logits_T = self.gram_form(Q, E_I, E_T, mask, side if side is not None else self.anchor_side(E_T), tau)
        return self.mlp(E_I), logits_T, A                        # Eq. (7): the logits of P^I and P^T

    def gram_form(self, Q, E_I, E_T, mask, side, tau):
        """A (B, C, M) and logits_T (B, C) of Eq. (5)-(7), exactly, without K or G.
        Q.K_cm without K: LayerNorm is LN_k(V_cm) = gamma_k * (V_cm - mean_cm) / std_cm + beta_k and W_k(x) = W_k x,
        so by associativity
            Q.K_cm = (q.V_cm - mean_cm sum_d q_d) / std_cm + Q.W_k(beta_k),   q = (W_k^T Q) * gamma_k.
        The last term is one number per image, the same for every anchor: the softmax over M ignores it (beta_k gets
        zero gradient in both forms). It is kept, at B D multiply-adds, so that the scores are Q K^T itself and every
        parameter stays in the graph (DistributedDataParallel needs that).
        cos(E^I, G_c) without G: by bilinearity, from A, <E^I, V> and V V^T (class_text_logits_via_gram)."""
        mean, std, VVt = side
        C, M, D = E_T.shape
        q = (Q @ self.W_k.weight) * self.ln_k.weight             # (B, D) the query folded through W_k and gamma_k
        shift = Q @ self.W_k(self.ln_k.bias)                     # (B,)   Q.(W_k beta_k)
        qV, EV = (torch.cat([q, E_I]) @ E_T.reshape(C * M, D).T).view(2, -1, C, M)   # (B, C, M) q.V_cm, E^I.V_cm
        QK = (qV - mean * q.sum(-1)[:, None, None]) / std + shift[:, None, None]      # (B, C, M) Q.K_cm
        A = attention_weights(QK, mask, D)                       # (B, C, M) softmax over the M anchors
        return A, class_text_logits_via_gram(E_I, A, EV, VVt, tau, self.detach_norm)

    @torch.autocast("cuda", enabled=False)
    def anchor_side(self, E_T):
        """What the gram form needs of the anchors E^T (C, M, D), which stay fixed while the head learns: the mean
        and standard deviation over D that LayerNorm divides by (C, M) each (ln_k's eps), and the Gram
        matrices V V^T (C, M, M) of V = E^T. In E^T's precision also under the training's bf16 autocast."""
        var, mean = torch.var_mean(E_T, dim=-1, unbiased=False)    # (C, M) as LayerNorm computes them
        return mean, (var + self.ln_k.eps).sqrt(), E_T @ E_T.transpose(1, 2)

    def attention_parameters(self):
        """The names (in this head) of what computes the attention, Eq. (4)-(6): LayerNorms, W_q, W_k. The official
        fine-tuning trains these at its text_lr (1e-6) and the MLP at the lr (its optimiser's groups by name)."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] in ("ln_q", "W_q", "ln_k", "W_k")]


def language_guided_attention(Q, K, mask):
    """Eq. (6) weights: A = softmax over the M anchors of Q K^T / sqrt(D), padded anchors at -inf.
    Q (B, D), K (C, M, D), mask (C, M) -> A (B, C, M), each row sums to 1 over the real anchors."""
    return attention_weights(torch.einsum("bd,cmd->bcm", Q, K), mask, Q.shape[-1])   # (B, C, M)


def attention_weights(QK, mask, D):
    """softmax over the M anchors of Q K^T / sqrt(D) (B, C, M), padded anchors (mask False) at -inf: weight 0."""
    return (QK / math.sqrt(D)).masked_fill(~mask, float("-inf")).softmax(dim=-1)


def class_text_logits(E_I, G, tau, detach_norm=False, eps=1e-8):
    """Eq. (7) text branch before the softmax: <E^I, G> / tau, the cosine similarity of E^I (B, D) with each class's
    gathered embedding G (B, C, D) -> (B, C): <E^I, G_c> / (|E^I| |G_c|), each norm at least eps (F.cosine_similarity's
    eps; its own broadcast form costs three times as much in the backward). detach_norm: |G_c| a constant to the
    gradient (the official iNat models' v_detach; the values are the same)."""
    dot = torch.einsum("bd,bcd->bc", E_I, G)                     # (B, C)    <E^I, G_c>
    G_norm = G.norm(dim=-1).clamp_min(eps)                       # (B, C)    |G_c|
    norms = E_I.norm(dim=-1, keepdim=True).clamp_min(eps) * (G_norm.detach() if detach_norm else G_norm)
    return dot / norms / tau


def class_text_logits_via_gram(E_I, A, EV, VVt, tau, detach_norm=False, eps=1e-8):
    """class_text_logits(E_I, G, tau) for G_c = sum_m A_cm V_cm without forming G (B, C, D). By bilinearity:
        <E^I, G_c> = sum_m A_cm <E^I, V_cm>,   |G_c|^2 = A_c^T (V_c V_c^T) A_c,
    exact, with V V^T (C, M, M) fixed. E^I (B, D), A (B, C, M), EV (B, C, M) = <E^I, V_cm>, VVt (C, M, M) -> (B, C).
    Padded anchors have A = 0 and drop out of both. eps as in class_text_logits: each norm at least eps."""
    dot = (A * EV).sum(-1)                                       # (B, C)    <E^I, G_c>
    G_sq = (torch.einsum("bcm,cmn->bcn", A, VVt) * A).sum(-1)    # (B, C)    |G_c|^2
    G_norm = G_sq.clamp_min(eps ** 2).sqrt()                     # (B, C)    |G_c|, at least eps
    norms = E_I.norm(dim=-1, keepdim=True).clamp_min(eps) * (G_norm.detach() if detach_norm else G_norm)   # (B, C)
    return dot / norms / tau


def lgr_probabilities(logits_I, logits_T, variant="paper", alpha=0.2):
    """Eq. (7): P = P^I + P^T = softmax(MLP(E^I)) + softmax(<E^I, G> / tau).
    official (docs/design.md §3): alpha P^I + (1 - alpha) P^T (alpha 0.2 ImageNet-LT / Places-LT, 0.7 iNat)."""
    P_I, P_T = logits_I.softmax(dim=-1), logits_T.softmax(dim=-1)
    return alpha * P_I + (1 - alpha) * P_T if variant == "official" else P_I + P_T


def logit_sum_prediction(logits_I, logits_T):
    """The prediction behind the official evaluation's many / medium / few columns (docs/design.md §3): argmax of the
    raw logit sum logits_I + logits_T, not of the alpha mix that gives its overall top-1. (B, C) x 2 -> (B,)."""
    return (logits_I + logits_T).argmax(1)


def recognition_loss(logits_I, logits_T, y):
    """Eq. (9): L_rec = CE(P^I, y) + CE(P^T, y), on the logits before each softmax of Eq. (7). y (B,) labels, or (B, C)
    class probabilities (--mixup: the mixed, smoothed targets) -> (L_rec, {"CE_I", "CE_T"}: its two terms)."""
    CE_I, CE_T = F.cross_entropy(logits_I, y), F.cross_entropy(logits_T, y)
    return CE_I + CE_T, {"CE_I": CE_I, "CE_T": CE_T}


# ----------------------------------------------------------------------------------------------
# Model: visual encoder + head


class Recognizer(nn.Module):
    """The fine-tuned model: CLIP's visual encoder (E^I = E_vis(I), Eq. 1) and the LGR head (keywords `head_args`:
    LGRHead's) or the FC head (a linear classifier, initialised as the official code initialises its linear layers:
    truncated normal, std 0.02, zero bias)."""

    def __init__(self, visual, D, C, head="lgr", anchors=None, mask=None, **head_args):
        super().__init__()
        self.visual = visual
        self.head_kind = head
        if head == "lgr":
            self.head = LGRHead(D, C, **head_args)
        else:
            self.head = nn.Linear(D, C)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
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


def inputs(args):
    """The files of the run folder a fine-tuning run starts from: cvlp.pt (--init cvlp) and the anchors (--head lgr)."""
    return ((["cvlp.pt"] if args.init == "cvlp" else []) +
            ([os.path.basename(run_file(args, "anchor_embeds"))] if args.head == "lgr" else []))


def build_recognizer(args, device, ckpt=None):
    """Visual encoder from cvlp.pt (or CLIP) and a fresh head, or both from a saved lgr.py checkpoint;
    anchors from anchor_embeds.pt (frozen buffers, not part of the checkpoint). A fresh LGR head's tau: --tau, else
    the encoder's own learned temperature (cvlp.pt's logit scale; CLIP's with --init clip), as the official code
    loads it with the visual encoder."""
    if ckpt is not None:
        encoder = create_clip(args.backbone, args.image_size, args.pretrained)
    else:
        encoder = load_encoder(args, device)[0]
    D = embed_dim(encoder)
    anchors = mask = None
    head_args = {}
    if args.head == "lgr":
        anchors, mask = load_anchor_embeds(args)
        check_file(run_file(args, "anchor_embeds"))              # made from the cvlp.pt there now (run_folder.py)
        if anchors.shape[-1] != D:
            raise DataError(f"anchor_embeds.pt has D = {anchors.shape[-1]}, the encoder D = {D}; rerun anss.py")
        official = args.variant == "official"
        tau = getattr(args, "tau", None)                         # a saved head's own tau is in its state dict
        if tau is None:
            tau = temperature(encoder.logit_scale.detach(), inverse_tau_limit(args.variant)).item()
        head_args = dict(tau=tau, variant=args.variant, learn_tau=getattr(args, "learn_tau", False),
                         form=getattr(args, "head_form", None) or DATASETS[args.data]["head_form"],
                         detach_norm=official and official_setting(args.data, "v_detach"))
    C = len(anchors) if anchors is not None else args.num_classes
    model = Recognizer(encoder.visual, D, C, args.head, anchors, mask, **head_args).to(device)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"the {args.head} checkpoint does not fit this code's head ({str(e).splitlines()[1:2]}); "
                                  f"it was written by an older version: rerun lgr.py --head {args.head}")
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
            P = lgr_probabilities(logits_I, logits_T.float(), args.variant, DATASETS[args.data]["alpha"])
            preds["P"].append(P.argmax(1).cpu())
            preds["P_I"].append(logits_I.argmax(1).cpu())
            preds["P_T"].append(logits_T.argmax(1).cpu())
            if args.variant == "official":
                preds["logit_sum"].append(logit_sum_prediction(logits_I, logits_T.float()).cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in preds.items() if v}, torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# Training


def mixup_cutmix(x, y, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1):
    """--mixup (--variant official's default): the official fine-tuning's batch augmentation, timm's Mixup as its
    main.py sets it up (mixup 0.8, cutmix 1.0, probability 1, switch probability 0.5, per batch, label smoothing
    0.1). Each batch is mixed with itself reversed: with probability 1/2 CutMix (a box of area fraction 1 - lam,
    lam ~ Beta(1, 1), pasted from the reversed batch; lam then the exact unpasted fraction), else Mixup
    (lam ~ Beta(0.8, 0.8), x lam + x_reversed (1 - lam)). The targets: the smoothed one-hot rows (0.1 / C off, 1 - 0.1
    + 0.1 / C on) mixed in the same proportion. Drawn from torch's generator, so --resume continues it exactly.
    x (B, 3, H, W), y (B,) -> (x mixed, (B, C) target probabilities)."""
    cutmix = bool(torch.rand(()) < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    reversed_x = x.flip(0)
    if cutmix:
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))          # the box's centre
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[..., top:bottom, left:right] = reversed_x[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)
    else:
        x = x * lam + reversed_x * (1 - lam)
    off = smoothing / num_classes
    one_hot = torch.full((len(y), num_classes), off, device=x.device).scatter_(1, y[:, None], 1 - smoothing + off)
    return x, one_hot * lam + one_hot.flip(0) * (1 - lam)


def lgr_loss(model, x, y, mixup=False):
    """The loss of one fine-tuning batch: Eq. (9) for the LGR head, plain cross-entropy for the FC baseline (both on
    mixup_cutmix's targets with --mixup). For the log, Eq. (9)'s two terms CE_I (P^I) and CE_T (P^T) (under torchrun
    this rank's share of the batch) and the head's tau (Eq. 7)."""
    core = getattr(model, "module", model)                       # torchrun: the model inside DistributedDataParallel
    target = y
    if mixup:
        x, target = mixup_cutmix(x, y, core.head.out_features if core.head_kind == "fc" else len(core.anchors))
    logits_I, logits_T, _ = model(x)
    if logits_T is None:
        return F.cross_entropy(logits_I.float(), target), {}
    loss, terms = recognition_loss(logits_I.float(), logits_T.float(), target)   # Eq. (9)
    terms["tau"] = temperature(core.head.log_inv_tau, core.head.max_inv_tau)
    return loss, terms


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    init_distributed(args)                                       # torchrun: join the other ranks (else nothing)
    seed_everything(args.seed)
    rngs = {"sampler": torch.Generator().manual_seed(args.seed)}
    prepare_out(args)
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    path = run_file(args, args.head)                             # lgr.pt, fc.pt; fc_clip.pt = the baseline
    model = build_recognizer(args, args.device)
    made_from = states(args.out, inputs(args))
    if already_finished(path, args, made_from):                  # never trains over a checkpoint by accident
        return
    if args.freeze_visual:
        model.visual.requires_grad_(False)
    if args.compile:                       # in place (nn.Module.compile): parameter names, checkpoints unchanged
        model.visual.compile()

    loader = make_loader(data.train, image_transform(args, train=True), args, sampling=args.sampling,
                         generator=rngs["sampler"])
    val_loader = make_loader(data.val, image_transform(args, train=False), args)
    slow = ([f"head.{n}" for n in model.head.attention_parameters()]     # the official text_lr on the attention
            if args.variant == "official" and args.head == "lgr" else [])
    opt, sched, steps = optimizer_and_schedule(
        parameter_groups(model, args.wd, args.variant, slow, OFFICIAL_TEXT_LR)[0], loader, args)

    def train_mode():
        # The visual encoder stays in eval mode, trained or frozen: RN50's BatchNorm keeps its running statistics, as
        # the official code's encode_image sets it (the paper does not say). ViTs have no BatchNorm.
        model.train()
        model.visual.eval()

    def validate():
        preds, y = predict(model, val_loader, args, desc="val")
        acc = accuracy_by_shot(preds["P"], y, data.counts)
        train_mode()
        return acc, (f"val top-1 {acc['overall']:.1f} (many {acc['many']:.1f} / medium {acc['medium']:.1f}"
                     f" / few {acc['few']:.1f})")

    # torchrun: DDP averages the ranks' gradients of their mean losses over b images: the mean over N b images
    train_model = distribute(model, args) if rank_world()[1] > 1 else model
    print(f"{args.head}: {args.data} {args.backbone} init {args.init}, {args.epochs} epochs x {steps} steps, "
          f"lr {args.lr}, visual {'frozen' if args.freeze_visual else 'fine-tuned'}, variant {args.variant}"
          + (", mixup" if args.mixup else "") + f", device {args.device}")
    train_mode()
    meta = {**checkpoint_meta(args, "lgr", data.num_classes), "head": args.head, "init": args.init,
            "made_from": made_from}
    batch_loss = lambda x, y: lgr_loss(train_model, x, host_to_device(y, args.device), args.mixup)   # y: the loader's
    if fit(model, batch_loss, loader, opt, sched, args, path, meta, rngs, validate):
        print(f"wrote {path} (last) and {os.path.basename(best_path(path))} (best val)")


if __name__ == "__main__":
    main()
