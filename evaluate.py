"""Evaluation of VL-LTR: top-1 accuracy overall / many / medium / few (paper Sec. 4.2, Tables 1, 4, 8).

    python evaluate.py --data shapes_lt            # every head whose files exist in runs/<data>/<backbone>
    python evaluate.py --data shapes_lt --split val

Heads, each evaluated when its file is there:
  zero-shot   CLIP with the 80 prompt templates per class (Table 8)          CLIP weights
  baseline    CLIP-initialised visual encoder + linear classifier (Table 1)  fc_clip.pt
  FC head     CVLP visual encoder + linear classifier (Table 4 #5)           fc.pt
  KNN head    CVLP image embedding vs every corpus sentence's, k = 5 (#6)   cvlp.pt
  LGR         VL-LTR, P of Eq. (7), and its branches P^I and P^T alone      lgr.pt
  LGR, no CVLP  CLIP weights straight into LGR (Table 4 #2)                 lgr_clip.pt
Prints the table and writes eval.json (accuracies per head and split, per-class accuracy, confusions).

    python evaluate.py --data imagenet_lt --backbone RN50 --released checkpoint.pth

evaluates a fine-tuned model released with the official code (docs/design.md §8) with its inference rules, beside
the paper's number (run_released). The official evaluation takes the overall top-1 from the alpha mix of Eq. (7)
and the many / medium / few columns from the logit sum (docs/design.md §3): --released and LGR heads trained with
--variant official report both. Shot splits are the paper's (Sec. 4.2, data.shot_split): many >= 100 training
images, few <= 20. Every evaluation runs in fp32 (engine.eval_precision), whatever the training precision.

The results tables over several seeds (every row trained, then evaluated here) and the learning curves are
experiments.py's.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import re

import torch
import torch.nn.functional as F

from anss import load_anchor_embeds, load_encoder
from cvlp import load_clip
from data import (DATASETS, accuracy_by_shot, add_common_args, corpus_tokens, fill_defaults, image_transform, load_data,
                  make_loader, official_accuracy, prompt_only, prompt_sentences)
from lgr import Recognizer, build_recognizer, predict
from util import flags
from util.clip_models import (context_length, create_clip, default_tag, embed_dim, encode_images, encode_texts,
                              tokenize_exact)
from util.engine import (best_path, check_meta, checkpoint_meta, load_checkpoint, one_process_only,
                         prepare_out, run_file, run_stage)
from util.errors import CheckpointError, DataError, StageError, fail, out_of_memory, warn
from util.files import atomic_write
from util.images import clip_transform
from util.progress import progress
from util.records import run_header
from util.run_folder import check_folder, states

# --variant official: the row of the prediction behind the official code's many / medium / few columns.
LOGIT_SUM = "logit sum"
LOGIT_SUM_NOTE = ("logit sum: argmax of logits_I + logits_T, the prediction the official code takes its many / medium /"
                  " few columns from (its overall: the alpha mix; docs/design.md §3)")

def get_parser(add_help=True):
    """The evaluation options (experiments.py's `table` reuses them)."""
    p = flags.Parser(description="VL-LTR evaluation: top-1 overall / many / medium / few", add_help=add_help)
    add_common_args(p)
    p.add_argument("--split", default="test", choices=["val", "test"], help="Sec. 4.1: report test, tune on val")
    p.add_argument("--knn-k", type=flags.count, default=5, help="KNN head (Table 4 #6): the nearest sentences that vote (the "
                   "official evaluation's 5; the paper does not say)")
    p.add_argument("--knn-sentences", default="corpus", choices=["corpus", "anchors"], help="KNN head: vote over every "
                   "sentence of the class corpora (the official evaluation's; Table 4 #6 has no sentence selection) or "
                   "over the AnSS anchors alone")
    p.add_argument("--batch", type=flags.count, default=256, help="images evaluated at once")
    p.add_argument("--head-form", default=None, choices=["paper", "gram"], help="how the LGR head computes Eq. (4)-(7) "
                   "(the same predictions; default: the dataset's, DATASETS head_form; gram is faster at batch 1)")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"],
                   help="which checkpoint of each lgr.py run: last (<head>.pt, the default: the model the cosine "
                        "schedule ends with; the paper does not say it reported another epoch) or "
                        "best (<head>_best.pt, its best val top-1 epoch); named in eval.json and the table's title")
    p.add_argument("--released", default=None, metavar="CHECKPOINT",
                   help="evaluate a released VL-LTR checkpoint.pth of the official code (docs/design.md §8) with its "
                        "inference rules (overall: alpha mix, alpha 0.2, iNat 0.7; many / medium / few: logit sum) and "
                        "evaluation crop (256 -> 224)")
    p.add_argument("--eval-precision", default="fp32", choices=["fp32", "fp16"],
                   help="--released: fp32 (every evaluation here) or fp16 autocast on CUDA, as the official "
                        "evaluation runs (docs/design.md §3)")
    return p


def get_args(argv=None):
    args = fill_defaults(get_parser().parse_args(argv))
    if args.eval_precision != "fp32" and not args.released:
        fail(f"--eval-precision {args.eval_precision} is for --released checkpoints; every other evaluation runs in fp32")
    return args


@torch.no_grad()
def zero_shot_classifier(model, classnames, device, classes_at_once=256):
    """CLIP's zero-shot classifier: per class the normalised mean of its 80 prompt embeddings (C, D).
    The classes' prompts are tokenised and embedded a group of classes at a time (256 x 80 sentences), so
    memory does not grow with C."""
    weights = []
    for i in progress(range(0, len(classnames), classes_at_once), desc="zero-shot classes", unit="group"):
        names = classnames[i:i + classes_at_once]
        prompts = [s for name in names for s in prompt_sentences(name)]                     # (c * 80) sentences
        E = encode_texts(model, tokenize_exact(prompts, context_length(model))[0], device)  # (c * 80, D)
        weights.append(F.normalize(E.view(len(names), -1, E.shape[1]).mean(1), dim=-1))     # (c, D)
    return torch.cat(weights)


def knn_predict(E_I, E_T, t, k, num_classes, chunk=4096):
    """KNN head (Table 4 #6) as the official evaluation computes it: each image's k most similar sentences vote for
    their classes; the most votes wins, and a tie goes to the tied class met first in order of similarity (the
    official code counts the votes with Python's Counter.most_common, which keeps that order).
    E_I (N, D) and E_T (S, D) normalised, t (S,) each sentence's class -> (N,) predicted classes.
    The (N, S) similarities are never held at once: blocks of `chunk` images x `chunk` sentences, each image's
    running top k merged block by block (iNat: 24K images x 270K sentences, 26 GB as one matrix)."""
    k = min(k, len(E_T))
    pred = torch.empty(len(E_I), dtype=torch.long, device=E_I.device)
    for i in progress(range(0, len(E_I), chunk), desc="KNN", unit="block"):
        top = E_I.new_full((len(E_I[i:i + chunk]), k), float("-inf"))                    # (n, k) running best
        idx = torch.zeros(top.shape, dtype=torch.long, device=E_I.device)
        for j in range(0, len(E_T), chunk):
            sim = E_I[i:i + chunk] @ E_T[j:j + chunk].T                                   # (n, s) cosine
            best, at = sim.topk(min(k, sim.shape[1]), dim=1)                              # this block's best
            top, pick = torch.cat([top, best], 1).topk(k, dim=1)                          # merged, most similar first
            idx = torch.cat([idx, j + at], 1).gather(1, pick)
        voters = t[idx]                                                                   # (n, k) nearest first
        votes = torch.zeros(len(top), num_classes, device=E_I.device).scatter_add_(1, voters, torch.ones_like(top))
        rank = torch.arange(k, device=E_I.device).expand_as(voters).float()               # 0 = the nearest
        first = torch.full_like(votes, k).scatter_reduce_(1, voters, rank, "amin")        # (n, C) each class's first
        pred[i:i + chunk] = (votes * (k + 1) + (k - first)).argmax(1)                     # votes, then the earliest
    return pred


def confusions(pred, y, classnames, n=10):
    """The n most frequent (true, predicted) mistakes."""
    wrong = pred != y
    pairs = torch.stack([y[wrong], pred[wrong]], 1)
    if len(pairs) == 0:
        return []
    uniq, counts = pairs.unique(dim=0, return_counts=True)
    order = counts.argsort(descending=True)[:n]
    return [{"true": classnames[int(uniq[i, 0])], "predicted": classnames[int(uniq[i, 1])], "count": int(counts[i])}
            for i in order]


def format_table(results, title):
    """The paper's Table 8 layout: method, overall / many / medium / few ("-": a group without test classes)."""
    lines = [title, f"{'method':<26}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}", "-" * 59]
    for name, r in results.items():
        lines.append(f"{name:<26}{percent(r['overall']):>9}{percent(r['many']):>8}{percent(r['medium']):>8}"
                     f"{percent(r['few']):>8}")
    return "\n".join(lines)


def table_title(report):
    """The title line of eval.json's table: the run, the split, which checkpoint of each lgr.py run was read and
    its epoch ("shapes_lt shapes-tiny, test split, top-1 (%), checkpoint last: fc_clip.pt epoch 20/20, ...")."""
    read = [f"{os.path.basename(c['path'])} epoch {c['epoch']}/{c['epochs']}" +
            (f" and {c['batch']} batch{'es' * (c['batch'] > 1)}" if c["batch"] else "")
            for c in report.get("checkpoints", []) if isinstance(c, dict)]     # (older eval.json: a list of paths)
    title = f"{report['data']} {report['backbone']}, {report['split']} split, top-1 (%)"
    if "checkpoint" in report:
        title += f", checkpoint {report['checkpoint']}" + (": " + ", ".join(read) if read else "")
    return title


def percent(value):
    """One table cell: 70.1, or "-" for NaN (accuracy_by_shot's value for a group with no classes)."""
    return "-" if math.isnan(value) else f"{value:.1f}"


# ----------------------------------------------------------------------------------------------
# The released VL-LTR checkpoints of the official code (docs/design.md §8): read with our Recognizer

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


def recognizer_from_released(path, backbone, image_size, form="paper"):
    """A released VL-LTR checkpoint (docs/design.md §8) as our Recognizer, --variant
    official: its visual encoder, its anchor embeddings "text_embeddings" (C, M, D) with the zero rows (padding)
    masked, and its head mapped onto LGRHead (RELEASED_HEAD; W_q, W_k without bias in both), its tau the fixed
    exp(-logit_scale) as stored, above 1/100 or not. The image embedding reaches both branches as it is (Eq. 4, 7).
    form: LGRHead's ("gram" for iNat's 8,142 classes, DATASETS head_form)."""
    sd = read_released(path)
    missing = [k for k in ["text_embeddings", *RELEASED_HEAD.values()] if k not in sd]
    unknown = [k for k in sd if k.startswith("text_block.") and k not in RELEASED_HEAD.values()]
    if missing or unknown or not any(k.startswith("visual.") for k in sd):
        what = f"no {missing[0]}" if missing else f"an unknown head weight {unknown[0]}" if unknown else "no visual.*"
        raise DataError(f"--released {path} is not in the released VL-LTR format ({what}, docs/design.md §8)")
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
    model = Recognizer(encoder.visual, D, C, "lgr", E_T, mask, variant="official", form=form)   # 1/tau: no clamp
    state = {k: v for k, v in sd.items() if k.startswith("visual.")}
    state.update({f"head.{ours}": sd[theirs] for ours, theirs in RELEASED_HEAD.items()})
    try:
        model.load_state_dict(state)                             # strict: every key, every shape
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise DataError(f"--released {path} does not fit --backbone {backbone} at --image-size {image_size}: "
                        f"{detail[:200]}")
    return model


def main(argv=None):
    one_process_only("evaluate.py")
    args = get_args(argv)
    run_stage(run_released if args.released else run, args)


def evaluate_folder(args, data, zero_shot=True, on_result=None):
    """Every head whose file is in args.out, on args.split -> ({method: accuracy_by_shot}, {method: (pred, y)},
    [{"path", "epoch", "batch", "epochs"} of each lgr.py checkpoint read (--checkpoint last or best)], {head: why it
    failed}). A head that fails (out of memory, a bad file) is reported in
    one line and skipped, and the others still run; on_result(results, preds, found) is called after every head
    (run() rewrites eval.json then, so a long evaluation keeps what it has computed)."""
    check_folder(args.out)                                       # no head read beside files of another state
    counts, split = data.counts, getattr(data, args.split)
    loader = make_loader(split, image_transform(args, train=False), args)
    results, preds, found, failed = {}, {}, [], {}

    def record(name, pred, y):
        preds[name] = (pred.cpu(), y.cpu())
        results[name] = accuracy_by_shot(pred.cpu(), y.cpu(), counts)

    def zero_shot_head():                                        # CLIP with the 80 templates
        args.init = "clip"
        clip = load_clip(args, args.device)
        E_I, y = encode_images(clip.encode_image, loader, args.device, desc="zero-shot")
        record("Zero-Shot CLIP", (E_I @ zero_shot_classifier(clip, data.classnames, args.device).T).argmax(1), y)

    def recognizer_head(head, init, name, path):                 # lgr.py's heads: FC or LGR, on CLIP or CVLP
        args.head, args.init = head, init
        if args.checkpoint == "best":
            if not os.path.exists(best_path(path)):
                raise CheckpointError(f"{best_path(path)} not found: no epoch of {os.path.basename(path)}'s run has "
                                      f"finished with a val score yet; finish it (--resume), or pass --checkpoint last")
            path = best_path(path)
        ckpt = load_checkpoint(path, "lgr", f"python lgr.py --head {head} --init {init}")
        check_meta(ckpt, {**checkpoint_meta(args, "lgr", data.num_classes), "head": head}, path)
        args.variant = ckpt["args"]["variant"]
        model = build_recognizer(args, args.device, ckpt)
        p, y = predict(model, loader, args, desc=name)
        record(name, p["P"], y)
        if "logit_sum" in p:                 # --variant official: the official many / medium / few rule (docs/design.md §3)
            record(f"{name}: {LOGIT_SUM}", p["logit_sum"], y)
        if head == "lgr":
            record(f"{name}: P^I only", p["P_I"], y)
            record(f"{name}: P^T only", p["P_T"], y)
        found.append({"path": path, "epoch": ckpt["position"]["epoch"], "batch": ckpt["position"]["batch"],
                      "epochs": ckpt["args"]["epochs"]})

    knn_name = f"KNN head (k={args.knn_k}" + (", anchors)" if args.knn_sentences == "anchors" else ")")

    def knn_head():                                              # CVLP's embeddings: each image's nearest sentences
        args.init = "cvlp"
        encoder, ckpt = load_encoder(args, args.device)
        E_I, y = encode_images(encoder.encode_image, loader, args.device, desc="KNN")
        if args.knn_sentences == "anchors":
            anchors, mask = load_anchor_embeds(args)
            real = mask.flatten().nonzero().squeeze(1)                                    # padded anchors never vote
            E_T, t = F.normalize(anchors.flatten(0, 1)[real], dim=-1), real // anchors.shape[1]
        else:                                                    # every sentence of the corpus CVLP trained on
            corpus = prompt_only(data.corpus) if ckpt["args"].get("text") == "prompt" else data.corpus
            text = corpus_tokens(dataclasses.replace(data, corpus=corpus), encoder, args)
            E_T, t = encode_texts(encoder, text["tokens"], args.device, desc="KNN sentences"), text["label"]
        record(knn_name, knn_predict(E_I, E_T.to(args.device), t.to(args.device), args.knn_k, data.num_classes), y)

    heads = [("Zero-Shot CLIP", zero_shot_head)] if zero_shot else []
    for head, init, name in (("fc", "clip", "Baseline (CLIP + FC)"), ("fc", "cvlp", "FC head (CVLP)"),
                             ("lgr", "clip", "LGR without CVLP"), ("lgr", "cvlp", "VL-LTR (LGR)")):
        args.init = init
        path = run_file(args, head)
        if os.path.exists(path):
            heads.append((name, functools.partial(recognizer_head, head, init, name, path)))
    needs = ("cvlp.pt", "anchor_embeds.pt") if args.knn_sentences == "anchors" else ("cvlp.pt",)
    if all(os.path.exists(os.path.join(args.out, f)) for f in needs):
        heads.append((knn_name, knn_head))
    for name, compute in heads:
        try:
            compute()
        except (StageError, MemoryError, RuntimeError) as e:     # RuntimeError: torch's out of memory, CPU or GPU
            if not isinstance(e, StageError) and not out_of_memory(e):
                raise
            line = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            failed[name] = (line if isinstance(e, StageError) else
                            f"out of memory ({line}); lower --batch, or evaluate on a larger machine")
            warn(f"{name} failed: {failed[name]}; the other heads go on")
        if on_result is not None:
            on_result(results, preds, found)
    return results, preds, found, failed


def run(args):
    prepare_out(args)
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    path = os.path.join(args.out, "eval.json")

    header = run_header(args, "evaluate")
    report = {}

    def save(results, preds, found):                             # after every head: a later failure loses nothing
        read = [os.path.basename(c["path"]) for c in found]     # eval.json names the state of every file it read
        read += [f for f in ("cvlp.pt", "anchor_embeds.pt", "anchor_embeds_clip.pt") if os.path.exists(
            os.path.join(args.out, f))]
        report.update({"header": header, "made_from": states(args.out, read), "data": args.data,
                       "backbone": args.backbone, "split": args.split,
                       "checkpoint": args.checkpoint, "checkpoints": found,
                       "results": {k: {**v, "confusions": confusions(*preds[k], data.classnames)}
                                   for k, v in results.items()},
                       "classes": data.classnames, "train_counts": data.counts.tolist()})
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))

    results, preds, found, failed = evaluate_folder(args, data, on_result=save)
    if "VL-LTR (LGR)" not in results and "VL-LTR (LGR)" not in failed:
        print(f"note: no {args.out}/lgr.pt yet: run `python cvlp.py && python anss.py && python lgr.py` for VL-LTR")
    print(format_table(results, table_title(report)))
    if any(name.endswith(LOGIT_SUM) for name in results):
        print(LOGIT_SUM_NOTE)
    print(f"wrote {path}")
    if failed:
        name, why = next(iter(failed.items()))
        raise DataError(f"{len(failed)} head(s) failed, first {name}: {why}; {path} holds the other heads")


# ----------------------------------------------------------------------------------------------
# The released VL-LTR checkpoints: python evaluate.py --data imagenet_lt --released checkpoint.pth

# The paper's VL-LTR rows (Table 1-3; docs/design.md §6), test top-1 %, overall / many / medium / few where given.
PAPER_VLLTR = {("imagenet_lt", "RN50"): "70.1 / 77.8 / 67.0 / 50.8", ("imagenet_lt", "ViT-B-16"): "77.2",
               ("places_lt", "RN50"): "48.0 / 51.9 / 47.2 / 38.4", ("places_lt", "ViT-B-16"): "50.1",
               ("inat2018", "RN50"): "74.6", ("inat2018", "ViT-B-16"): "76.8 (81.0 at --image-size 384)"}


def run_released(args):
    """A released checkpoint.pth (docs/design.md §8) on args.split with the official code's inference rules and
    evaluation images (short side to 256, centre crop 224), beside the paper's number: the row the official
    evaluation reports (overall of the alpha mix, many / medium / few of the logit sum), then every column of
    each of the two predictions and of each branch. Writes eval_released.json."""
    if args.pretrained != default_tag(args.backbone):
        raise DataError(f"the released VL-LTR models were fine-tuned from OpenAI's CLIP weights; drop --pretrained "
                        f"{args.pretrained}")
    model = recognizer_from_released(args.released, args.backbone, args.image_size,
                                     args.head_form or DATASETS[args.data]["head_form"]).to(args.device)
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    if len(model.anchors) != data.num_classes:
        raise DataError(f"--released {args.released} has {len(model.anchors)} classes, {args.data} has "
                        f"{data.num_classes}; pass the --data it was trained on")
    args.variant, alpha = "official", DATASETS[args.data]["alpha"]
    transform = clip_transform(args, train=False, crop_pct=0.875)
    p, y = predict(model, make_loader(getattr(data, args.split), transform, args), args, desc="released")
    # The official evaluation takes its overall top-1 and its many / medium / few columns from two predictions
    # (docs/design.md §3): the first row is what it reports, the next two give every column of each prediction.
    results = {"as the official evaluation": official_accuracy(p["P"], p["logit_sum"], y, data.counts),
               f"  alpha mix, alpha {alpha}": accuracy_by_shot(p["P"], y, data.counts),
               f"  {LOGIT_SUM}": accuracy_by_shot(p["logit_sum"], y, data.counts),
               "  P^I only": accuracy_by_shot(p["P_I"], y, data.counts),
               "  P^T only": accuracy_by_shot(p["P_T"], y, data.counts)}
    paper = PAPER_VLLTR.get((args.data, args.backbone))
    shown = dict(results)
    if paper:                                # the paper's row beside the first, the one computed by its rules
        values = [float(v) for v in paper.split(" (")[0].split(" / ")] + [float("nan")] * 3
        shown = {"as the official evaluation": results["as the official evaluation"],
                 "paper (test split)": dict(zip(("overall", "many", "medium", "few"), values)), **results}
    print(format_table(shown, f"{args.released}: {args.data} {args.backbone}, {args.split} split, top-1 (%), "
                              f"{args.eval_precision}"))
    print("as the official evaluation: overall of the alpha mix, many / medium / few of the logit sum (docs/design.md §3); "
          "the paper's tables were computed this way")
    print(LOGIT_SUM_NOTE)
    path = os.path.join(args.out, "eval_released.json")
    report = {"header": run_header(args, "evaluate"), "data": args.data, "backbone": args.backbone,
              "split": args.split, "checkpoint": args.released,
              "alpha": alpha, "eval_precision": args.eval_precision, "results": results, "paper": paper}
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
