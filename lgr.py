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
from cvlp import temperature
from data import DATASETS, accuracy_by_shot, add_common_args, fill_defaults, load_data, make_loader
from util.clip_models import create_clip, embed_dim
from util.distributed import distribute, init_distributed, rank_world
from util.engine import (add_training_args, best_path, checkpoint_meta, eval_precision, fit, host_to_device,
                         optimizer_and_schedule, prepare_out, run_file, run_stage, seed_everything)
from util.errors import DataError
from util.images import clip_transform
from util.progress import progress


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VL-LTR stage 2b: language-guided recognition fine-tuning")
    add_common_args(p)
    add_training_args(p, "<head>.pt: lgr.pt, fc.pt, fc_clip.pt")
    p.add_argument("--init", default="cvlp", choices=["cvlp", "clip"],
                   help="visual encoder: CVLP's (cvlp.pt) or plain CLIP weights (Table 4 #2; the baseline)")
    p.add_argument("--head", default="lgr", choices=["lgr", "fc"], help="LGR (Eq. 4-7) or the vision-only FC baseline")
    p.add_argument("--variant", default="paper", choices=["paper", "official"], help="SPEC.md §3")
    p.add_argument("--freeze-visual", action="store_true", help="keep the visual encoder fixed (official RN50 setting)")
    p.add_argument("--tau", type=float, default=0.07, help="Eq. (7) temperature, learnable from this value")
    args = p.parse_args(argv)
    baseline_epochs = args.epochs is None and (args.head, args.init) == ("fc", "clip")
    args = fill_defaults(args, "lgr")
    if baseline_epochs:      # plain CLIP + FC, no CVLP stage: as many epochs as CVLP and LGR together (Sec. 4.3)
        args.epochs *= 2
    return args


# ----------------------------------------------------------------------------------------------
# The LGR head


class LGRHead(nn.Module):
    """Language-guided recognition head, Eq. (4)-(7). E^I (B, D) image embeddings; E^T (C, M, D) frozen
    anchor-sentence embeddings with mask (C, M), True for real sentences -> logits of P^I and P^T (B, C) each
    and the attention A (B, C, M).

    forward computes the attention and the text branch in one of two exact forms, chosen by `form` (as nanoGPT
    keeps its manual attention beside the fused one):
      "paper": the equations as written: K = W_k LN(E^T) (C, M, D) and G = A V (B, C, D) in every call, C M D^2
               multiply-adds for K and O(B C D) memory for G (iNat, RN50, batch 128: 32 GiB);
      "gram":  (the default, what training and evaluation run) the same values and gradients from the anchor side
               made once (anchor_side: LayerNorm's mean and std, the Gram matrices V V^T) without K or G: one
               (2B, D) x (D, C M) product and O(B C M) memory. Why it is exact: gram_form; the proof that it is:
               test_equations.py (hand-worked values and gradients, padded anchors, float64 against "paper") and
               tests/test_cuda.py (the same on a GPU).
    Both run in fp32 also under the training's bf16 autocast (TF32 matmuls on a GPU): in bf16, <E^I, V> and the
    Gram quadratic form moved logits_T by up to 0.07 on logits of 11, against 8e-4 in fp32 (C 200, D 512)."""

    def __init__(self, D, C, tau=0.07, variant="paper", form="gram"):
        super().__init__()
        self.form = form
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
    def forward(self, E_I, E_T, mask, side=None):
        Q = self.W_q(self.ln_q(E_I))                             # Eq. (4)  (B, D)
        tau = temperature(self.log_inv_tau, self.max_inv_tau)
        if self.form == "paper":
            K, V = self.W_k(self.ln_k(E_T)), E_T                 # Eq. (5)  (C, M, D), (C, M, D)
            A = language_guided_attention(Q, K, mask)            # Eq. (6)  (B, C, M)
            G = torch.einsum("bcm,cmd->bcd", A, V)               # Eq. (6)  (B, C, D)
            logits_T = class_text_logits(E_I, G, tau)            # Eq. (7)  (B, C), before the softmax
        else:
            A, logits_T = self.gram_form(Q, E_I, E_T, mask, side if side is not None else self.anchor_side(E_T), tau)
        return self.mlp(E_I), logits_T, A                        # Eq. (7): the logits of P^I and P^T

    def gram_form(self, Q, E_I, E_T, mask, side, tau):
        """A (B, C, M) and logits_T (B, C) of Eq. (5)-(7), exactly, without K or G.
        Q.K_cm without K: LayerNorm is LN_k(V_cm) = gamma_k * (V_cm - mean_cm) / std_cm + beta_k and W_k(x) =
        W_k x + b_k, so by associativity
            Q.K_cm = (q.V_cm - mean_cm sum_d q_d) / std_cm + Q.W_k(beta_k),   q = (W_k^T Q) * gamma_k.
        The last term is one number per image, the same for every anchor: the softmax over M ignores it (b_k and
        beta_k get zero gradient in both forms). It is kept, at B D multiply-adds, so that the scores are Q K^T
        itself and every parameter stays in the graph (DistributedDataParallel needs that).
        cos(E^I, G_c) without G: by bilinearity, from A, <E^I, V> and V V^T (class_text_logits_via_gram)."""
        mean, std, VVt = side
        C, M, D = E_T.shape
        q = (Q @ self.W_k.weight) * self.ln_k.weight             # (B, D) the query folded through W_k and gamma_k
        shift = Q @ self.W_k(self.ln_k.bias)                     # (B,)   Q.(W_k beta_k + b_k)
        qV, EV = (torch.cat([q, E_I]) @ E_T.reshape(C * M, D).T).view(2, -1, C, M)   # (B, C, M) q.V_cm, E^I.V_cm
        QK = (qV - mean * q.sum(-1)[:, None, None]) / std + shift[:, None, None]      # (B, C, M) Q.K_cm
        A = attention_weights(QK, mask, D)                       # (B, C, M) softmax over the M anchors
        return A, class_text_logits_via_gram(E_I, A, EV, VVt, tau)

    @torch.autocast("cuda", enabled=False)
    def anchor_side(self, E_T):
        """What the gram form needs of the anchors E^T (C, M, D), which stay fixed while the head learns: the mean
        and standard deviation over D that LayerNorm divides by (C, M) each (ln_k's eps), and the Gram
        matrices V V^T (C, M, M) of V = E^T. In E^T's precision also under the training's bf16 autocast."""
        var, mean = torch.var_mean(E_T, dim=-1, unbiased=False)    # (C, M) as LayerNorm computes them
        return mean, (var + self.ln_k.eps).sqrt(), E_T @ E_T.transpose(1, 2)


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


def lgr_loss(model, x, y):
    """The loss of one fine-tuning batch: Eq. (9) for the LGR head, plain cross-entropy for the FC baseline. For the
    log, Eq. (9)'s two terms CE_I (P^I) and CE_T (P^T) (under torchrun this rank's share of the batch) and the
    head's tau (Eq. 7)."""
    logits_I, logits_T, _ = model(x)
    if logits_T is None:
        return F.cross_entropy(logits_I.float(), y), {}
    with torch.no_grad():                                        # the terms again, for the log only
        terms = {"CE_I": F.cross_entropy(logits_I.float(), y), "CE_T": F.cross_entropy(logits_T.float(), y)}
        head = getattr(model, "module", model).head             # torchrun: the head inside DistributedDataParallel
        terms["tau"] = temperature(head.log_inv_tau, head.max_inv_tau)
    return recognition_loss(logits_I.float(), logits_T.float(), y), terms


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
    if args.freeze_visual:
        model.visual.requires_grad_(False)
    if args.compile:                       # in place (nn.Module.compile): parameter names, checkpoints unchanged
        model.visual.compile()

    train_transform = clip_transform(args, train=True, crop_scale=DATASETS[args.data]["crop_scale"])
    loader = make_loader(data.train, train_transform, args, sampling=args.sampling, generator=rngs["sampler"])
    val_loader = make_loader(data.val, clip_transform(args, train=False), args)
    opt, sched, steps = optimizer_and_schedule([p for p in model.parameters() if p.requires_grad], loader, args)

    def train_mode():
        model.train()
        if args.freeze_visual:
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
          f"lr {args.lr}, visual {'frozen' if args.freeze_visual else 'fine-tuned'}, device {args.device}")
    train_mode()
    meta = {**checkpoint_meta(args, "lgr", data.num_classes), "head": args.head, "init": args.init}
    batch_loss = lambda x, y: lgr_loss(train_model, x, host_to_device(y, args.device))   # y: the loader's, on the host
    if fit(model, batch_loss, loader, opt, sched, args, path, meta, rngs, validate):
        print(f"wrote {path} (last) and {os.path.basename(best_path(path))} (best val)")


if __name__ == "__main__":
    main()
