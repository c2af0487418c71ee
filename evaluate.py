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
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from anss import load_encoder, suffix
from cvlp import (check_meta, checkpoint_meta, clip_mean_std, context_length, encode_images, encode_texts,
                  fill_defaults, load_checkpoint, load_clip, make_loader)
from data import atomic_write, load_data, make_transform, prompt_sentences, run_stage, tokenize_exact
from lgr import accuracy_by_shot, build_recognizer, predict


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VL-LTR evaluation: top-1 overall / many / medium / few")
    p.add_argument("--data", default="shapes_lt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--clip-weights", default=None, help="CLIP weights for the zero-shot row (see cvlp.py)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="Sec. 4.1: report test, tune on val")
    p.add_argument("--knn-k", type=int, default=10, help="KNN head: nearest anchor sentences that vote")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted, one warning) instead of stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>/<backbone>)")
    p.add_argument("--seed", type=int, default=0)
    return fill_defaults(p.parse_args(argv))


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
    """The paper's Table 8 layout: method, overall / many / medium / few."""
    lines = [title, f"{'method':<26}{'overall':>9}{'many':>8}{'medium':>8}{'few':>8}", "-" * 59]
    for name, r in results.items():
        lines.append(f"{name:<26}{r['overall']:9.1f}{r['many']:8.1f}{r['medium']:8.1f}{r['few']:8.1f}")
    return "\n".join(lines)


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    counts, split = data.counts, getattr(data, args.split)
    loader = make_loader(split, make_transform(args.image_size, *clip_mean_std(), train=False), args)
    results, preds = {}, {}

    def record(name, pred, y):
        preds[name] = (pred.cpu(), y.cpu())
        results[name] = accuracy_by_shot(pred.cpu(), y.cpu(), counts)

    args.init = "clip"                                           # zero-shot: CLIP with the 80 templates
    clip = load_clip(args, args.device)
    E_I, y = encode_images(clip.encode_image, loader, args.device, desc="zero-shot")
    record("Zero-Shot CLIP", (E_I @ zero_shot_classifier(clip, data.classnames, args.device).T).argmax(1), y)
    del clip

    found = []
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
    if "VL-LTR (LGR)" not in results:
        print(f"note: no {args.out}/lgr.pt yet: run `python cvlp.py && python anss.py && python lgr.py` for VL-LTR")

    print(format_table(results, f"{args.data} {args.backbone}, {args.split} split, top-1 (%)"))
    report = {"data": args.data, "backbone": args.backbone, "split": args.split, "checkpoints": found,
              "results": {k: {**v, "confusions": confusions(*preds[k], data.classnames)} for k, v in results.items()},
              "classes": data.classnames, "train_counts": counts.tolist()}
    path = os.path.join(args.out, "eval.json")
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
