"""Evaluation of VL-LTR: top-1 accuracy overall / many / medium / few (paper Sec. 4.2, Tables 1, 4, 8).

    python evaluate.py --data shapes_lt            # every head whose files exist in runs/<data>/<backbone>
    python evaluate.py --data shapes_lt --split val

Heads, each evaluated when its file is there:
  zero-shot   CLIP with the 80 prompt templates per class (Table 8)          CLIP weights
  baseline    CLIP-initialised visual encoder + linear classifier (Table 1)  fc_clip.pt
  FC head     CVLP visual encoder + linear classifier (Table 4 #5)           fc.pt
  KNN head    CVLP image embedding vs all anchor sentence embeddings (#6)    cvlp.pt + anchor_embeds.pt
  LGR         VL-LTR, P of Eq. (7), and its branches P^I and P^T alone      lgr.pt
  LGR, no CVLP  CLIP weights straight into LGR (Table 4 #2)                 lgr_clip.pt
Prints the table and writes eval.json (accuracies per head and split, per-class accuracy, confusions).

    python evaluate.py --data imagenet_lt --backbone RN50 --released checkpoint.pth

evaluates a fine-tuned model released with the official code (SPEC.md §8) with its inference rule, beside
the paper's number (run_released).

The results tables over several seeds (every row trained, then evaluated here) and the learning curves are
experiments.py's.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from anss import load_encoder, suffix
from clip_models import clip_preprocess, context_length, default_tag, encode_images, encode_texts, tokenize_exact
from cvlp import load_clip
from data import add_common_args, fill_defaults, load_data, make_loader, prompt_sentences
from engine import DataError, atomic_write, check_meta, checkpoint_meta, fail, load_checkpoint, one_process_only, run_stage
from images import make_transform
from lgr import accuracy_by_shot, build_recognizer, official_alpha, predict, recognizer_from_released

# The experiment runner used to live here: its old flags point to the new commands.
MOVED = {"--table": "python experiments.py table [--data D --seeds 0 1 2 ...]",
         "--curves": "python experiments.py curves CHECKPOINT [CHECKPOINT ...]"}


def get_parser(add_help=True):
    """The evaluation options (experiments.py's `table` reuses them)."""
    p = argparse.ArgumentParser(description="VL-LTR evaluation: top-1 overall / many / medium / few", add_help=add_help)
    add_common_args(p)
    p.add_argument("--split", default="test", choices=["val", "test"], help="Sec. 4.1: report test, tune on val")
    p.add_argument("--knn-k", type=int, default=10, help="KNN head: nearest anchor sentences that vote")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--released", default=None, metavar="CHECKPOINT",
                   help="evaluate a released VL-LTR checkpoint.pth of the official code (SPEC.md §8) with its "
                        "inference rule (alpha 0.2, iNat 0.7) and evaluation crop (256 -> 224)")
    return p


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    moved = [flag for flag in MOVED if flag in argv]
    if moved:
        fail(f"evaluate.py {moved[0]} moved to experiments.py: run `{MOVED[moved[0]]}`")
    return fill_defaults(get_parser().parse_args(argv))


@torch.no_grad()
def zero_shot_classifier(model, classnames, device):
    """CLIP's zero-shot classifier: per class the normalised mean of its 80 prompt embeddings (C, D)."""
    weights = [F.normalize(encode_texts(model, tokenize_exact(prompt_sentences(n), context_length(model))[0],
                                        device).mean(0), dim=-1) for n in classnames]
    return torch.stack(weights)


def knn_predict(E_I, anchors, mask, k):
    """KNN head (Table 4 #6): each image's k most similar anchor sentences (over all classes) vote for
    their class; ties go to the class with the larger summed similarity.
    E_I (N, D) normalised; anchors (C, M, D) normalised, mask (C, M) -> (N,) predicted classes."""
    C, M, D = anchors.shape
    sim = E_I @ anchors.reshape(C * M, D).T                       # (N, C*M) cosine
    sim = sim.masked_fill(~mask.reshape(1, C * M), float("-inf"))
    top, idx = sim.topk(min(k, int(mask.sum())), dim=1)           # (N, k)
    votes = torch.zeros(len(E_I), C, device=E_I.device)
    votes.scatter_add_(1, idx // M, torch.ones_like(top) + 1e-3 * top)   # one vote each, similarity breaks ties
    return votes.argmax(1)


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


def percent(value):
    """One table cell: 70.1, or "-" for NaN (accuracy_by_shot's value for a group with no classes)."""
    return "-" if math.isnan(value) else f"{value:.1f}"


def main(argv=None):
    one_process_only("evaluate.py")
    args = get_args(argv)
    run_stage(run_released if args.released else run, args)


def evaluate_folder(args, data, zero_shot=True):
    """Every head whose file is in args.out, on args.split: {method: accuracy_by_shot}, {method: (pred, y)}, paths."""
    counts, split = data.counts, getattr(data, args.split)
    loader = make_loader(split, make_transform(args.image_size, **clip_preprocess(args.backbone, args.pretrained),
                                               train=False), args)
    results, preds, found = {}, {}, []

    def record(name, pred, y):
        preds[name] = (pred.cpu(), y.cpu())
        results[name] = accuracy_by_shot(pred.cpu(), y.cpu(), counts)

    if zero_shot:                                                # zero-shot: CLIP with the 80 templates
        args.init = "clip"
        clip = load_clip(args, args.device)
        E_I, y = encode_images(clip.encode_image, loader, args.device, desc="zero-shot")
        record("Zero-Shot CLIP", (E_I @ zero_shot_classifier(clip, data.classnames, args.device).T).argmax(1), y)
        del clip

    for head, init, name in (("fc", "clip", "Baseline (CLIP + FC)"), ("fc", "cvlp", "FC head (CVLP)"),
                             ("lgr", "clip", "LGR without CVLP"), ("lgr", "cvlp", "VL-LTR (LGR)")):
        args.head, args.init = head, init
        path = os.path.join(args.out, f"{head}{suffix(args)}.pt")
        if not os.path.exists(path):
            continue
        ckpt = load_checkpoint(path, "lgr", f"python lgr.py --head {head} --init {init}")
        check_meta(ckpt, {**checkpoint_meta(args, "lgr", data.num_classes), "head": head}, path)
        args.variant, args.tau = ckpt["args"]["variant"], ckpt["args"]["tau"]
        model = build_recognizer(args, args.device, ckpt)
        p, y = predict(model, loader, args, desc=name)
        record(name, p["P"], y)
        if head == "lgr":
            record(f"{name}: P^I only", p["P_I"], y)
            record(f"{name}: P^T only", p["P_T"], y)
        found.append(path)

    if os.path.exists(os.path.join(args.out, "cvlp.pt")) and os.path.exists(os.path.join(args.out, "anchor_embeds.pt")):
        args.init = "cvlp"
        encoder, _ = load_encoder(args, args.device)
        a = load_checkpoint(os.path.join(args.out, "anchor_embeds.pt"), "anss", "python anss.py")
        E_I, y = encode_images(encoder.encode_image, loader, args.device, desc="KNN")
        record(f"KNN head (k={args.knn_k})", knn_predict(E_I, F.normalize(a["embeds"].to(args.device), dim=-1),
                                                       a["mask"].to(args.device), args.knn_k), y)
    return results, preds, found


def run(args):
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    results, preds, found = evaluate_folder(args, data)
    if "VL-LTR (LGR)" not in results:
        print(f"note: no {args.out}/lgr.pt yet: run `python cvlp.py && python anss.py && python lgr.py` for VL-LTR")

    print(format_table(results, f"{args.data} {args.backbone}, {args.split} split, top-1 (%)"))
    report = {"data": args.data, "backbone": args.backbone, "split": args.split, "checkpoints": found,
              "results": {k: {**v, "confusions": confusions(*preds[k], data.classnames)} for k, v in results.items()},
              "classes": data.classnames, "train_counts": data.counts.tolist()}
    path = os.path.join(args.out, "eval.json")
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# The released VL-LTR checkpoints: python evaluate.py --data imagenet_lt --released checkpoint.pth

# The paper's VL-LTR rows (Table 1-3; SPEC.md §6), test top-1 %, overall / many / medium / few where given.
PAPER_VLLTR = {("imagenet_lt", "RN50"): "70.1 / 77.8 / 67.0 / 50.8", ("imagenet_lt", "ViT-B-16"): "77.2",
               ("places_lt", "RN50"): "48.0 / 51.9 / 47.2 / 38.4", ("places_lt", "ViT-B-16"): "50.1",
               ("inat2018", "RN50"): "74.6", ("inat2018", "ViT-B-16"): "76.8 (81.0 at --image-size 384)"}


def run_released(args):
    """A released checkpoint.pth (SPEC.md §8) on args.split with the official code's inference rule and
    evaluation images (short side to 256, centre crop 224), beside the paper's number. Writes eval_released.json."""
    if args.pretrained != default_tag(args.backbone):
        raise DataError(f"the released VL-LTR models were fine-tuned from OpenAI's CLIP weights; drop --pretrained "
                        f"{args.pretrained}")
    model = recognizer_from_released(args.released, args.backbone, args.image_size).to(args.device)
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    if len(model.anchors) != data.num_classes:
        raise DataError(f"--released {args.released} has {len(model.anchors)} classes, {args.data} has "
                        f"{data.num_classes}; pass the --data it was trained on")
    args.variant, alpha = "official", official_alpha(args.data)
    transform = make_transform(args.image_size, **clip_preprocess(args.backbone, args.pretrained), train=False,
                               crop_pct=0.875)
    p, y = predict(model, make_loader(getattr(data, args.split), transform, args), args, desc="released")
    results = {f"VL-LTR released, alpha {alpha}": accuracy_by_shot(p["P"], y, data.counts),
               "  P^I only": accuracy_by_shot(p["P_I"], y, data.counts),
               "  P^T only": accuracy_by_shot(p["P_T"], y, data.counts)}
    print(format_table(results, f"{args.released}: {args.data} {args.backbone}, {args.split} split, top-1 (%)"))
    paper = PAPER_VLLTR.get((args.data, args.backbone))
    if paper:
        print(f"paper (test split): {paper}")
    path = os.path.join(args.out, "eval_released.json")
    report = {"data": args.data, "backbone": args.backbone, "split": args.split, "checkpoint": args.released,
              "alpha": alpha, "results": results, "paper": paper}
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
