"""Stage 2a of VL-LTR: anchor sentence selection (AnSS), paper Sec. 3.3.

    python anss.py --data shapes_lt       # reads cvlp.pt, writes anchors.json and anchor_embeds.pt

Text crawled from the web is noisy. AnSS scores every sentence T_k of class c by its L_lin (the
text side of Eq. 2) against a special image batch I' holding at most 50 training images per class,
and keeps the M = 64 sentences with the smallest loss as the class's anchors. `--select cutoff`
is the Table 4 #7 ablation: the first M sentences of the corpus, no scoring.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from cvlp import load_clip, temperature
from data import add_common_args, corpus_tokens, fill_defaults, image_transform, load_data, make_loader
from util import flags
from util.clip_models import create_clip, encode_images, encode_texts
from util.engine import (check_meta, checkpoint_meta, load_checkpoint, one_process_only, prepare_out,
                         run_file, run_stage, save_checkpoint, seed_everything)
from util.files import atomic_write
from util.progress import progress
from util.records import run_header
from util.run_folder import other_settings, small_entries, state


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR stage 2a: anchor sentence selection")
    add_common_args(p)
    p.add_argument("--init", default="cvlp", choices=["cvlp", "clip"],
                   help="encoders: CVLP's (cvlp.pt) or plain CLIP weights (Table 4 #2, no CVLP)")
    p.add_argument("--select", default="anss", choices=["anss", "cutoff"], help="Table 4 #7: cut off = first M")
    p.add_argument("--M", type=flags.count, default=64, help="anchor sentences per class (Sec. 4.3: 64)")
    p.add_argument("--images-per-class", type=flags.count, default=50,
                   help="I' holds at most this many per class (Sec. 3.3)")
    p.add_argument("--text", default="wiki+prompt", choices=["wiki+prompt", "prompt"])
    p.add_argument("--chunk", type=flags.count, default=4096, help="AnSS scores blocks of this many images x sentences "
                   "(memory chunk^2 floats, whatever the dataset size)")
    p.add_argument("--batch", type=flags.count, default=256, help="images embedded at once")
    p.add_argument("--overwrite", action="store_true", help="make the anchors again even when those in --out are up "
                   "to date (made from this cvlp.pt with these settings: without it the stage then says so and stops)")
    args = p.parse_args(argv)
    return fill_defaults(args)


# ----------------------------------------------------------------------------------------------
# The selection


def sentence_scores(E_I, y, E_T, t, tau):
    """The AnSS score of every sentence as Sec. 3.3 defines it: its L_lin (the text side of Eq. 2) against the
    image set I'. E_I (N', D) normalised image embeddings with labels y (N',); E_T (S, D) normalised sentence
    embeddings with labels t (S,). For sentence k of class c, with I_c the images of class c in I':
        score_k = -1/|I_c| sum_{i in I_c} log softmax_over_I'(S[:, k] / tau)[i]
    Returns (S,) scores; lower = the sentence picks out its own class's images better. A class with no image in
    I' has no L_lin: its sentences score 0 (select_anchors then keeps corpus order, as the cut-off does).
    Holds the whole (N', S) matrix: anss.py runs the same scores in blocks (anchor_scores)."""
    S = E_I @ E_T.T                                              # (N', S) cosine similarities S_ik
    log_p = (S / tau).log_softmax(dim=0)                         # (N', S) each sentence's softmax over I'
    own = (y[:, None] == t[None, :]).to(S.dtype)                 # (N', S) the images of the sentence's class
    n = own.sum(0)                                               # (S,) |I_c|
    return torch.where(n > 0, -(own * log_p).sum(0) / n.clamp(min=1), 0.0)


def anchor_scores(E_I, y, E_T, t, tau, num_classes, chunk=4096):
    """sentence_scores(E_I, y, E_T, t, tau) at any size: the same (S,) scores without the (N', S) matrix, which
    at iNat's 407K images x 270K sentences would be 440 GB (test_equations.py checks the two forms agree).

    log softmax_i(x) = x_i - logsumexp(x), so
        score_k = logsumexp_{i in I'}(S_ik / tau) - (mean_{i: y_i = c} E^I_i) . E^T_k / tau,
    the class's mean image embedding standing in for its images (the mean of S_ik over them, exactly).
    The logsumexp runs over blocks of `chunk` images x `chunk` sentences, so memory stays chunk^2
    whatever N' and S are; the work is one pass over the (N', S) products.
    """
    n_per_class = torch.bincount(y, minlength=num_classes).float()                        # (C,)
    mean_image = E_I.new_zeros(num_classes, E_I.shape[1]).index_add_(0, y, E_I) / n_per_class.clamp(min=1)[:, None]
    scores = E_T.new_zeros(len(E_T))                     # a class with no image in I' keeps 0: corpus order
    for k in progress(range(0, len(E_T) if len(E_I) else 0, chunk), desc="AnSS scores", unit="block"):
        T, c = E_T[k:k + chunk], t[k:k + chunk]                                            # (k, D), (k,)
        lse = torch.stack([(E_I[i:i + chunk] @ T.T / tau).logsumexp(dim=0)                 # (k,) per image block
                           for i in range(0, len(E_I), chunk)]).logsumexp(dim=0)
        own = (mean_image[c] * T).sum(-1) / tau                                            # (k,)
        scores[k:k + chunk] = torch.where(n_per_class[c] > 0, lse - own, 0.0)
    return scores


def select_anchors(scores, offsets, M):
    """Per class the M lowest-scored sentences, padded to M and masked when a class has fewer.

    scores (S,) (or None for cut-off: the first M in corpus order); offsets (C + 1,).
    Returns index (C, M) long into the flat sentence list (padding repeats index 0 of the class) and
    mask (C, M) bool, True for real sentences."""
    C = len(offsets) - 1
    index = torch.zeros(C, M, dtype=torch.long)
    mask = torch.zeros(C, M, dtype=torch.bool)
    for c in range(C):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        order = torch.arange(lo, hi) if scores is None else lo + torch.argsort(scores[lo:hi], stable=True)
        keep = order[:M]
        index[c, :len(keep)], mask[c, :len(keep)] = keep, True
        index[c, len(keep):] = lo if hi > lo else 0
    return index, mask


def image_subset(labels, per_class, seed):
    """Indices of I': at most `per_class` training images of each class, chosen at random (seeded). The images
    are grouped by class once (one stable sort, not a scan of all labels per class: 8,142 x 437K at iNat)."""
    rng = np.random.default_rng(seed)
    by_class = np.argsort(labels, kind="stable")                                  # (N,) class 0's images first
    ends = np.cumsum(np.bincount(labels))                                         # (C,) where each class ends
    keep = [rng.permutation(group)[:per_class] for group in np.split(by_class, ends[:-1])]
    return np.sort(np.concatenate(keep))


def precision_report(index, mask, corpus):
    """shapes_lt: fraction of kept sentences whose ground-truth flag says informative, over all kept
    sentences and over the kept description sentences alone (templates are informative by construction)."""
    flags = torch.tensor([f for fl in corpus.informative for f in fl])
    source = np.array([s for src in corpus.source for s in src])
    kept = index[mask]
    desc = torch.from_numpy(source[kept.numpy()] == "description")
    return {"kept": int(mask.sum()), "precision": flags[kept].float().mean().item(),
            "descriptions_kept": int(desc.sum()),
            "description_precision": flags[kept][desc].float().mean().item() if desc.any() else float("nan")}


def description_precision(scores, offsets, corpus, M):
    """shapes_lt, AnSS against cut-off where the choice matters: per class, M sentences chosen from its
    description sentences alone (templates set aside), by lowest L_lin (AnSS) or corpus order (cut-off).
    Returns the informative fraction of each choice and of all description sentences (chance level)."""
    flags = torch.tensor([f for fl in corpus.informative for f in fl])
    is_desc = torch.tensor([s == "description" for src in corpus.source for s in src])
    chosen = {"anss": [], "cutoff": []}
    for c in range(len(offsets) - 1):
        desc = torch.arange(int(offsets[c]), int(offsets[c + 1]))[is_desc[int(offsets[c]):int(offsets[c + 1])]]
        chosen["cutoff"].append(desc[:M])
        chosen["anss"].append(desc[torch.argsort(scores[desc], stable=True)[:M]])
    out = {k: flags[torch.cat(v)].float().mean().item() for k, v in chosen.items()}
    return {**out, "corpus": flags[is_desc].float().mean().item(), "kept": int(sum(len(v) for v in chosen["anss"]))}


def load_encoder(args, device):
    """The encoders to use: CVLP's (from cvlp.pt, rebuilt from its args) or plain CLIP's."""
    if args.init == "clip":
        return load_clip(args, device), None
    path = os.path.join(args.out, "cvlp.pt")
    ckpt = load_checkpoint(path, "cvlp", f"python cvlp.py --data {args.data}")
    check_meta(ckpt, checkpoint_meta(args, "cvlp", args.num_classes), path)
    model = create_clip(ckpt["backbone"], ckpt["args"]["image_size"], args.pretrained)   # check_meta: cvlp.py's tag
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def load_anchor_embeds(args):
    """This run's anchor_embeds.pt (anchor_embeds_clip.pt under --init clip): (C, M, D) embeddings and (C, M) mask,
    refused with one line when another dataset, backbone, tag or number of classes made it."""
    path = run_file(args, "anchor_embeds")
    made_by = f"python anss.py --data {args.data}" + (" --init clip" if args.init == "clip" else "")
    a = load_checkpoint(path, "anss", made_by)
    check_meta(a, checkpoint_meta(args, "anss", args.num_classes), path)
    return a["embeds"], a["mask"]


def up_to_date(args, made_from):
    """True, said in one line, when the anchors in --out were made from this cvlp.pt (made_from) with these settings
    and --overwrite is not given: making them again would give the same anchors, and would make every lgr.pt trained
    on them stale wherever a GPU's rounding differs from one run to the next."""
    path = run_file(args, "anchor_embeds")
    saved = small_entries(path) if not args.overwrite and os.path.exists(run_file(args, "anchors", ".json")) else None
    if saved is None or saved.get("made_from") != made_from or not isinstance(saved.get("args"), dict) \
            or other_settings(saved["args"], args):
        return False
    print(f"{path} is up to date (made from {' and '.join(made_from) or 'CLIP weights'} as it is now, with these "
          f"settings): nothing to do (--overwrite makes it again)")
    return True


def main(argv=None):
    one_process_only("anss.py")
    run_stage(run, get_args(argv))


def run(args):
    seed_everything(args.seed)
    prepare_out(args)
    data = load_data(args.data, args.data_root, args.seed, text=args.text, skip_bad_images=args.skip_bad_images)
    args.num_classes = data.num_classes
    model, cvlp_ckpt = load_encoder(args, args.device)
    made_from = {"cvlp.pt": state(cvlp_ckpt)} if cvlp_ckpt is not None else {}   # --init clip: no file of the run
    if up_to_date(args, made_from):
        return
    tau = temperature(model.logit_scale).item()
    text = corpus_tokens(data, model, args)
    if args.M > int((text["offsets"][1:] - text["offsets"][:-1]).max()):
        print(f"note: --M {args.M} is larger than every class's corpus; all sentences are kept and padded")

    E_T_raw = encode_texts(model, text["tokens"], args.device, desc="sentences", normalize=False)   # (S, D)
    E_T = F.normalize(E_T_raw, dim=-1)                                          # (S, D) for the cosines of L_lin
    if args.select == "anss":
        subset = data.train.subset(image_subset(data.train.labels, args.images_per_class, args.seed))   # I'
        loader = make_loader(subset, image_transform(args, train=False), args)
        E_I, y = encode_images(model.encode_image, loader, args.device, desc="I'")   # (N', D)
        scores = anchor_scores(E_I, y, E_T, text["label"].to(args.device), tau, data.num_classes, args.chunk).cpu()
    else:
        scores = None
    index, mask = select_anchors(scores, text["offsets"], args.M)

    flat = [s for sents in data.corpus.sentences for s in sents]
    precision = None
    if data.corpus.informative is not None:                     # shapes_lt: ground truth is known
        precision = {name: precision_report(*rows, data.corpus) for name, rows in
                     {"cutoff": select_anchors(None, text["offsets"], args.M), args.select: (index, mask)}.items()}
        if scores is not None:
            precision["descriptions_only"] = description_precision(scores, text["offsets"], data.corpus, args.M)
    anchors = {"header": run_header(args, "anss"), "made_from": made_from, "M": args.M, "select": args.select,
               "tau": tau, "precision": precision, "classes": [
        {"name": name, "sentences": [flat[k] for k in index[c][mask[c]].tolist()],
         "scores": [round(scores[k].item(), 4) for k in index[c][mask[c]].tolist()] if scores is not None else None}
        for c, name in enumerate(data.classnames)]}
    atomic_write(run_file(args, "anchors", ".json"),
                 lambda f: f.write(json.dumps(anchors, indent=1).encode()))
    # V = E^T of Eq. (5): the anchors as the text encoder gives them, not normalised (the official code saves them so
    # too); the LGR head normalises only G in its cosine. Padding zeroed, as in the released checkpoints.
    embeds = E_T_raw[index.to(E_T_raw.device)].cpu() * mask[..., None]          # (C, M, D)
    save_checkpoint(run_file(args, "anchor_embeds"), {
        **checkpoint_meta(args, "anss", data.num_classes), "init": args.init, "select": args.select,
        "embeds": embeds, "mask": mask, "args": vars(args), "made_from": made_from})
    print(f"anss: {args.select}, M = {args.M}, {int(mask.sum())} anchors for {data.num_classes} classes "
          f"({int((~mask).any(1).sum())} classes padded); wrote {os.path.basename(run_file(args, 'anchors', '.json'))}, "
          f"{os.path.basename(run_file(args, 'anchor_embeds'))} in {args.out}")
    for name, r in (precision or {}).items():
        if name == "descriptions_only":
            print(f"  M = {args.M} from the description sentences alone: informative {r['anss']:.1%} with AnSS, "
                  f"{r['cutoff']:.1%} with cut-off ({r['corpus']:.1%} of all description sentences)")
        else:
            among = (f"informative among them {r['description_precision']:.1%}" if r["descriptions_kept"] else
                     "the prompt templates fill every class's M")
            print(f"  {name:<6} informative {r['precision']:.1%} of {r['kept']} kept; description sentences kept "
                  f"{r['descriptions_kept']}, {among}")


if __name__ == "__main__":
    main()
