"""What a finished VL-LTR run says about one image, and why: the top classes by P of Eq. (7) with its two
branches P^I and P^T, and under each class the anchor sentences the LGR head attended to most (A, Eq. 6).

    python predict.py photo.jpg --run runs/shapes_lt/shapes-tiny          # any image file PIL can read
    python predict.py a.jpg b.png --run runs/imagenet_lt/RN50 --json      # the same as JSON
    python predict.py --demo --run runs/shapes_lt/shapes-tiny             # tail-class test images -> PNG

The run folder needs lgr.pt (lgr.py), anchors.json and anchor_embeds.pt (anss.py); everything else (dataset,
backbone, CLIP weights' tag, image size, variant) is read from lgr.pt. The class names and anchor sentences
come from anchors.json, so a real dataset's run works without its images. --demo also needs the run's dataset.
"""
import json
import os
from argparse import Namespace

import numpy as np
import torch
from PIL import Image

from data import DATASETS, image_transform, load_data, shot_split
from lgr import build_recognizer, lgr_probabilities
from util import flags
from util.engine import eval_precision, load_checkpoint, run_stage
from util.errors import DataError
from util.images import load_rgb
from util.run_folder import check_file


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR prediction with its reasons: top classes, P, P^I, P^T, anchors")
    p.add_argument("images", nargs="*", help="image files (any format PIL reads)")
    p.add_argument("--run", default=os.path.join("runs", "shapes_lt", "shapes-tiny"),
                   help="a finished run folder: lgr.pt, anchors.json, anchor_embeds.pt")
    p.add_argument("--top", type=flags.count, default=5, help="classes listed per image")
    p.add_argument("--sentences", type=flags.count_or_zero, default=3,
                   help="anchor sentences listed under each class (0: none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--demo", action="store_true", help="explain a few test images of few-shot classes of the "
                   "run's dataset and draw them into --demo-out (needs matplotlib)")
    p.add_argument("--demo-images", type=flags.count, default=4, help="--demo: how many images (one per class)")
    p.add_argument("--demo-out", default=None, help="--demo: the PNG (default <run>/predict_demo.png)")
    p.add_argument("--data-root", default=None, help="--demo: the dataset folder (default: the one lgr.pt names)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.images and not args.demo:
        p.error("give one or more image files, or --demo")
    return args


def read_image(path):
    """An image file as an RGB PIL image, or a one-line error that names it."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such image file")
    try:
        return load_rgb(path)
    except DataError:
        raise DataError(f"{path}: not an image PIL can read; give a JPEG, PNG or other image file")


def load_run(run, device):
    """The fine-tuned model of a run folder and what explains it: (model, run args, anchors.json classes)."""
    path = os.path.join(run, "lgr.pt")
    if not os.path.isfile(path):
        raise DataError(f"no lgr.pt in {run}; point --run at a finished run folder (`python cvlp.py && python "
                        "anss.py && python lgr.py` make runs/<data>/<backbone>)")
    ckpt = load_checkpoint(path, "lgr", f"python lgr.py --out {run}")
    check_file(os.path.join(run, "anchor_embeds.pt"))            # made from the cvlp.pt there now (run_folder.py)
    check_file(path, ckpt)                                       # and lgr.pt from those anchors
    if ckpt.get("head") != "lgr" or ckpt.get("init") != "cvlp":
        raise DataError(f"{path} is not a VL-LTR (LGR on CVLP) checkpoint (head {ckpt.get('head')}, init "
                        f"{ckpt.get('init')}); point --run at a folder where `python lgr.py` wrote lgr.pt")
    saved = ckpt["args"]
    args = Namespace(**{**saved, "out": run, "head": "lgr", "init": "cvlp", "num_classes": ckpt["num_classes"],
                        "pretrained": ckpt["pretrained"], "device": device})   # the tag: its model and images
    model = build_recognizer(args, device, ckpt).eval()         # anchors from anchor_embeds.pt
    anchors_path = os.path.join(run, "anchors.json")
    if not os.path.exists(anchors_path):
        raise DataError(f"{anchors_path} not found; run `python anss.py --data {args.data} --out {run}` first")
    with open(anchors_path, encoding="utf-8") as f:
        classes = json.load(f)["classes"]
    if [len(c["sentences"]) for c in classes] != model.mask.sum(1).tolist():
        raise DataError(f"{anchors_path} does not match anchor_embeds.pt in {run}; rerun anss.py there")
    return model, args, classes


@torch.no_grad()
def explain(model, args, classes, image, top=5, sentences=3):
    """One PIL image -> its top classes by P (Eq. 7), each with P, P^I, P^T and the `sentences` anchors of
    largest attention weight A (Eq. 6) among the class's real anchors (padding never shows)."""
    transform = image_transform(args, train=False)
    x = transform(image)[None].to(args.device)                  # (1, 3, S, S)
    with eval_precision(args.device):                           # fp32, whatever the training precision
        logits_I, logits_T, A = model(x)                         # (1, C), (1, C), (1, C, M)
    logits_I, logits_T, A = logits_I.float(), logits_T.float(), A.float()
    P = lgr_probabilities(logits_I, logits_T, args.variant, DATASETS[args.data]["alpha"])[0]   # (C,)
    P_I, P_T = logits_I.softmax(-1)[0], logits_T.softmax(-1)[0]                              # (C,) each
    out = []
    for c in P.argsort(descending=True)[:top].tolist():
        weights = A[0, c][model.mask[c]].cpu()                   # (n_c,) over the real anchors, in anchors.json order
        best = weights.argsort(descending=True)[:sentences].tolist()
        out.append({"class": c, "name": classes[c]["name"], "P": P[c].item(), "P_I": P_I[c].item(),
                    "P_T": P_T[c].item(),
                    "anchors": [{"sentence": classes[c]["sentences"][k], "A": weights[k].item()} for k in best]})
    return out


def format_text(name, top):
    """The text answer for one image: a line per class, its anchors indented below it."""
    lines = [name]
    for rank, t in enumerate(top, 1):
        lines.append(f"  {rank}. {t['name']:<28} P {t['P']:.3f}   P^I {t['P_I']:.3f}   P^T {t['P_T']:.3f}")
        lines += [f"       A {a['A']:.3f}  {a['sentence']}" for a in t["anchors"]]
    return "\n".join(lines)


def demo(args, model, run_args, classes):
    """A few test images of few-shot classes (<= 20 training images, Sec. 4.2; one per class, spread over the
    tail), each with its explanation beside it, drawn into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = load_data(run_args.data, args.data_root or run_args.data_root, run_args.seed)
    few = np.flatnonzero(shot_split(data.counts) == "few")
    picked = few[np.linspace(0, len(few) - 1, min(args.demo_images, len(few))).round().astype(int)]
    fig, axes = plt.subplots(len(picked), 2, figsize=(12, 2.6 * len(picked)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]})
    for (ax_image, ax_text), c in zip(axes, picked):
        i = int(np.flatnonzero(data.test.labels == c)[0])
        images = data.test.images
        image = Image.fromarray(images[i]) if isinstance(images, np.ndarray) else load_rgb(images[i])
        top = explain(model, run_args, classes, image, args.top, args.sentences)
        ax_image.imshow(image, interpolation="nearest")
        ax_image.set_title(f"true: {data.classnames[c]}\n({data.counts[c]} training images)", fontsize=9)
        ax_image.axis("off")
        lines = []
        for rank, t in enumerate(top[:2], 1):                    # the two best classes and their anchors
            mark = "correct" if t["class"] == c else "wrong"
            lines.append(f"{rank}. {t['name']} ({mark})   P {t['P']:.2f}  (P^I {t['P_I']:.2f}, P^T {t['P_T']:.2f})")
            lines += [f"      A {a['A']:.3f}  {a['sentence']}" for a in t["anchors"]]
        lines.append("   then: " + ", ".join(f"{t['name']} {t['P']:.2f}" for t in top[2:]))
        ax_text.text(0, 0.5, "\n".join(lines), va="center", ha="left", family="monospace", fontsize=8.5)
        ax_text.axis("off")
    fig.suptitle(f"predict.py on test images of few-shot classes ({run_args.data}, {args.run})", fontsize=10)
    fig.tight_layout()
    path = args.demo_out or os.path.join(args.run, "predict_demo.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    run_stage(run, get_args(argv))


def run(args):
    images = [(path, read_image(path)) for path in args.images]   # read first: a bad file stops before any work
    model, run_args, classes = load_run(args.run, args.device)
    if args.demo:
        demo(args, model, run_args, classes)
    answers = [{"image": path, "top": explain(model, run_args, classes, image, args.top, args.sentences)}
               for path, image in images]
    if answers:
        print(json.dumps(answers, indent=1) if args.json else "\n\n".join(format_text(a["image"], a["top"])
                                                                         for a in answers))


if __name__ == "__main__":
    main()
