"""Data for VL-LTR: long-tailed image datasets, class-level text corpora, square-root sampling.

Paper Sec. 4.1 (datasets, text descriptions) and Sec. 4.2 (shot splits); docs/design.md §4.

    python data.py --data shapes_lt            # summary + contact sheet, no download
    python data.py --data imagenet_lt --data-root data/imagenet
    python data.py --data imagenet_lt --data-root data/imagenet --skip-bad-images   # + decode every image once
    python data.py --data folder --data-root PATH              # your own tree: train/<class>/*, val/<class>/*
    python data.py --data cifar100_lt --imbalance 10           # CIFAR-100-LT from torchvision's CIFAR-100 files

Every dataset becomes an `LTData` here: the class names, three `Split`s (train / val / test) and a
`Corpus` (per class, a list of sentences). The stages use `load_data`, `make_loader` (square-root
sampling), `corpus_tokens` and `shot_split` from here. The real datasets' files are read in readers.py,
the embedded shapes_lt world is generated in shapes_lt.py.
"""
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

from util import flags, shapes_lt
from util.clip_models import cache_dir, context_length, default_tag, tokenize_corpus
from util.distributed import rank_world
from util.errors import DataError, fail, warn
from util.images import (DeviceLoader, DeviceTransform, FileBytes, ImageDataset, clip_transform, collate_files,
                         contact_sheet, drop_unreadable)
from util.own_data import cifar100_lt, image_folder
from util.readers import READERS, Split, read_descriptions
from util.resumable_sampler import ResumableSampler

# Per-dataset defaults, the one table every stage reads them from. Where each value comes from (docs/settings.md
# lists every row with its source): the paper where it speaks (Sec. 4.3 for ImageNet-LT; Sec. 4.4: Places-LT "the
# same as Section 4.3"; Sec. 4.5 for iNaturalist 2018), else the official code (its configs/<dataset>/ files and
# main.py's argument defaults), else the project's own choice, said so in the comment.
#   root, backbone, image_size    where the data lives; the paper's RN50 at 224 px
#   augment, crop_scale           training images: "randaug" = RandomResizedCrop to crop_scale, flip, RandAugment
#                                 rand-m9-mstd0.5-inc1 and random erasing 0.25, the official code's (timm's, its
#                                 main.py defaults; the paper names none); "crop-flip" = crop and flip alone
#   eval_crop                     evaluation images: short side to image_size / eval_crop, centre crop (official: 0.875)
#   cvlp_*, lgr_*                 epochs, lr, batch (paper); warm-up epochs and final lr of the cosine schedule (official:
#                                 5 warm-up epochs in pre-training, 0 in every fine-tuning config; min lr 0, except the
#                                 iNat pre-training config, which leaves main.py's 1e-5)
#   cvlp_train_mode               CVLP's student in train mode (BatchNorm's batch statistics) or not (running statistics,
#                                 frozen): the official ImageNet-LT and Places-LT pre-training configs set train_mode False
#   baseline_epochs               the CLIP + FC baseline's epochs (Sec. 4.3: 100; Sec. 4.5: iNat LGR's 360)
#   head_form                     LGRHead's form: "paper" builds K and G as Eq. (4)-(6) write them; "gram", the same values
#                                 without them, at iNat's 8,142 classes (34.7 against 4.2 GiB, BENCHMARKS.md)
#   alpha                         the official variant's weight of P^I in Eq. (7) (official evaluation: 0.2, iNat 0.7)
IMAGENET_LT = dict(root="data/imagenet", backbone="RN50", image_size=224, augment="randaug", crop_scale=(0.08, 1.0),
                   eval_crop=0.875,
                   cvlp_epochs=50, cvlp_lr=5e-5, cvlp_batch=256, cvlp_warmup=5, cvlp_min_lr=0.0, cvlp_train_mode=False,
                   lgr_epochs=50, lgr_lr=1e-3, lgr_batch=128, lgr_warmup=0, lgr_min_lr=0.0,
                   baseline_epochs=100, head_form="paper", alpha=0.2)
# The embedded world: the project's own settings throughout (docs/shapes_lt.md), sized so that the whole method runs in
# about two minutes on a 2-core CPU. Crop and flip alone: a colour is half of each class's name, and RandAugment's
# colour operations would change it. CVLP 5 epochs at 1e-3, a tenth of them warm-up (the recipe's share); LGR 10 at
# 2e-3 on batch 64 (a tenth of ImageNet-LT's images: 170 steps an epoch). Both learning rates were chosen on the val
# split (docs/shapes_lt.md; 2e-3 gave VL-LTR and the baseline alike their best of 5e-4, 1e-3, 2e-3 and 4e-3). The
# baseline as long as CVLP and LGR together, as the paper's 100 epochs are its 50 + 50, at LGR's lr (Sec. 4.5).
SHAPES = {**IMAGENET_LT, "root": "data/shapes_lt", "backbone": "shapes-tiny", "image_size": 32, "augment": "crop-flip",
          "crop_scale": (0.5, 1.0), "eval_crop": 1.0, "cvlp_epochs": 5, "cvlp_lr": 1e-3, "cvlp_warmup": 0.5,
          "cvlp_train_mode": True, "lgr_epochs": 10, "lgr_lr": 2e-3, "lgr_batch": 64,
          "baseline_epochs": 15}
# CIFAR-100-LT (Cui et al. 2019): 32 px images upsampled to CLIP's 224 and cropped as ImageNet's, as LIFT and BALLAD
# fine-tune CLIP on it; its own settings otherwise are ImageNet-LT's. --data cifar100_lt --imbalance 10 is the run
# named cifar100_lt_ir10 (dataset_name).
CIFAR = {**IMAGENET_LT, "root": "data/cifar100"}
DATASETS = {
    "imagenet_lt": IMAGENET_LT,
    "places_lt": {**IMAGENET_LT, "root": "data/places"},                  # Sec. 4.4: the setting of Sec. 4.3
    "inat2018": {**IMAGENET_LT, "root": "data/inat", "cvlp_epochs": 100, "cvlp_lr": 5e-4, "cvlp_min_lr": 1e-5,
                 "cvlp_train_mode": True, "lgr_epochs": 360, "lgr_lr": 2e-5, "baseline_epochs": 360,   # Sec. 4.5
                 "head_form": "gram", "alpha": 0.7},
    "shapes_lt": SHAPES,
    "shapes_lt_coined": SHAPES,   # the same world with made-up class names (shapes_lt.coined_names)
    "shapes_lt_small": SHAPES,    # the same world with a tenth of each class's training images (the L_dis study)
    "folder": {**IMAGENET_LT, "root": None},   # your own ImageFolder tree: no default place (--data-root PATH)
    "cifar100_lt": CIFAR, "cifar100_lt_ir100": CIFAR, "cifar100_lt_ir50": CIFAR, "cifar100_lt_ir10": CIFAR,
}

# --variant official: the official code's settings where they differ from the paper's (the paper's stay the default;
# docs/design.md §3). Per dataset: the visual encoder frozen in fine-tuning (its
# ImageNet-LT and Places-LT models LGR_r50 and LGR_vit16 build it with img_grad False; the iNat models train it) and
# the norm of G detached in the text branch's cosine (the iNat models, "v_detach"). Per (dataset, backbone): the
# learning rates of its configs that differ from the paper's (ViT-B/16 pre-training, Places-LT fine-tuning).
OFFICIAL = {"imagenet_lt": dict(freeze_visual=True, v_detach=False),
            "places_lt": dict(freeze_visual=True, v_detach=False),
            "inat2018": dict(freeze_visual=False, v_detach=True)}
OFFICIAL_LR = {("imagenet_lt", "ViT-B-16"): dict(cvlp_lr=3.5e-5),
               ("places_lt", "RN50"): dict(lgr_lr=1e-4),
               ("places_lt", "ViT-B-16"): dict(cvlp_lr=1e-5, lgr_lr=5e-5),
               ("inat2018", "ViT-B-16"): dict(cvlp_lr=3.5e-4)}

# Shot splits by training images per class, as the paper (Sec. 4.2) and the official evaluation define them:
# many >= 100, few <= 20, medium between (docs/design.md §4). The other common LTR convention (many > 100, few < 20)
# differs only for a class of exactly 100 or exactly 20 images: it puts both in medium.
MANY_FROM, FEW_UP_TO = 100, 20
SHAPES_WORLDS = ("shapes_lt", "shapes_lt_coined", "shapes_lt_small")   # generated in memory by shapes_lt.py
SMALL_DIVISOR = 10                                   # shapes_lt_small keeps max(1, n_c // 10) training images
CIFAR_IMBALANCES = (100, 50, 10)                     # n_max / n_min of CIFAR-100-LT as the literature reports it


def add_common_args(p):
    """The options every stage shares (cvlp.py, anss.py, lgr.py, evaluate.py): the dataset, the CLIP backbone and
    its weights, the run folder, the device and the seed. fill_defaults() fills in the per-dataset defaults."""
    p.add_argument("--data", default="shapes_lt", help=" | ".join(DATASETS))
    p.add_argument("--data-root", default=None, help="dataset folder (default: DATASETS[data]['root']; "
                   "--data folder: required)")
    p.add_argument("--imbalance", type=int, default=None, choices=CIFAR_IMBALANCES,
                   help="--data cifar100_lt: n_max / n_min of the training counts (default 100); the run is "
                   "named cifar100_lt_ir<imbalance> in its checkpoints and run folder")
    p.add_argument("--backbone", default=None, help="RN50 | ViT-B-16 | shapes-tiny | another open_clip model "
                   "(default: per dataset; the later stages must use cvlp.py's)")
    p.add_argument("--clip-weights", default=None, help="local CLIP weights: a state dict, or OpenAI's archive "
                   "(RN50.pt, ViT-B-16.pt); default: open_clip's weights of --pretrained (needs internet once), on "
                   "shapes_lt the world's small CLIP stand-in, trained on first use")
    p.add_argument("--pretrained", default=None, metavar="TAG", help="which CLIP weights: an open_clip tag of "
                   "--backbone (open_clip.list_pretrained_tags_by_model), e.g. laion2b_s34b_b88k for ViT-B-16; it "
                   "sets QuickGELU or GELU, mean / std and resizing as those weights were trained, and names what a "
                   "--clip-weights file holds (default: openai, the paper's; shapes-tiny: standin; the later stages "
                   "must use cvlp.py's)")
    p.add_argument("--image-size", type=flags.image_size, default=None, help="input size, a multiple of the "
                   "backbone's stride (default: per dataset, 224 for CLIP "
                   "backbones; 384 for the iNat ViT-B/16-384 row; CIFAR-100-LT's 32 px images are upsampled to it, as "
                   "LIFT and BALLAD do)")
    p.add_argument("--workers", type=flags.count_or_zero, default=None, help="data loader processes, 0: load in the "
                   "main process (default: up to 8; 0 on shapes_lt)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted, one warning) instead of stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>/<backbone>, runs/<data>/<backbone>-<tag> "
                   "for a --pretrained other than the default)")
    p.add_argument("--seed", type=flags.seed, default=0, help="seeds training and the shapes_lt world")
    return p


def fill_defaults(args, stage=None):
    """Per-dataset defaults shared by all stages (DATASETS), and with stage "cvlp" or "lgr" that stage's epochs, lr,
    batch, warm-up, final lr and training augmentation (under --variant official the official configs' learning rates
    where they differ, OFFICIAL_LR); the dataset's name (dataset_name: cifar100_lt with --imbalance 10 becomes cifar100_lt_ir10); the run
    folder runs/<run_name>/<backbone>, with the tag appended for weights other than the default ones (so that two
    runs of one backbone keep their own files)."""
    try:
        args.data = dataset_name(args.data, getattr(args, "imbalance", None))
    except DataError as e:
        fail(e)
    args.imbalance = cifar_imbalance(args.data)                  # in the saved args: None unless CIFAR-100-LT
    d = DATASETS[args.data]
    args.backbone = args.backbone or d["backbone"]
    args.pretrained = args.pretrained or default_tag(args.backbone)
    args.image_size = d["image_size"] if args.image_size is None else args.image_size
    try:
        flags.check_image_size(args.image_size, args.backbone)
    except DataError as e:
        fail(e)
    args.data_root = args.data_root or d["root"]
    args.workers = args.workers if args.workers is not None else (0 if args.data in SHAPES_WORLDS else default_workers())
    folder = args.backbone if args.pretrained == default_tag(args.backbone) else f"{args.backbone}-{args.pretrained}"
    args.out = args.out or os.path.join("runs", run_name(args.data, args.data_root), folder)
    if stage:                                    # a flag left at None takes the dataset's value for this stage
        official = OFFICIAL_LR.get((args.data, args.backbone), {}) if getattr(args, "variant", None) == "official" else {}
        for k in ("epochs", "lr", "batch", "warmup", "min_lr"):
            if getattr(args, k) is None:
                setattr(args, k, official.get(f"{stage}_{k}", d[f"{stage}_{k}"]))
        if getattr(args, "augment", None) is None:
            args.augment = d["augment"]
    return args


def official_setting(data, key):
    """--variant official: the official code's `key` for dataset `data` (OFFICIAL; another dataset: ImageNet-LT's)."""
    return OFFICIAL.get(data, OFFICIAL["imagenet_lt"])[key]


def cifar_imbalance(name):
    """The imbalance factor in a CIFAR-100-LT name: "cifar100_lt_ir10" -> 10; None for the other datasets."""
    return int(name[len("cifar100_lt_ir"):]) if name.startswith("cifar100_lt_ir") else None


def dataset_name(data, imbalance=None):
    """--data and --imbalance -> the name a run goes by: in its checkpoints (a later stage refuses another's, so an
    ir10 anss.py stops at an ir100 cvlp.pt), eval.json and run folder. "cifar100_lt" -> "cifar100_lt_ir<imbalance>"
    (default 100); every other name stays as it is, and takes no --imbalance."""
    if data not in DATASETS:
        raise DataError(f"unknown --data {data!r}; choose one of: {', '.join(DATASETS)}")
    if data == "cifar100_lt":
        return f"cifar100_lt_ir{imbalance or 100}"
    if imbalance is not None and imbalance != cifar_imbalance(data):
        raise DataError(f"--imbalance {imbalance} does not fit --data {data}" + (
            f" (imbalance {cifar_imbalance(data)}); give --data cifar100_lt --imbalance {imbalance}"
            if cifar_imbalance(data) else "; it sets CIFAR-100-LT's training counts (--data cifar100_lt)"))
    return data


def run_name(name, root):
    """The run folder's name under runs/: the dataset's, and for --data folder the tree's own (folder_<name of
    --data-root>), so that two trees do not share a run folder."""
    if name == "folder" and root:
        return f"folder_{os.path.basename(os.path.normpath(root))}"
    return name


def default_workers():
    """Loader processes for image files: 8, or fewer when this process may use fewer CPU cores (more only
    compete for them, and torch's DataLoader warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


# ----------------------------------------------------------------------------------------------
# The common representation


@dataclass
class Corpus:
    sentences: list         # [C][k] str: the class's text corpus, templates first
    source: list            # [C][k] "template" | "description"
    informative: list = None  # [C][k] bool ground truth (shapes_lt only; templates count as informative)


@dataclass
class LTData:
    name: str
    classnames: list        # [C] str
    train: Split
    val: Split
    test: Split
    corpus: Corpus

    @property
    def num_classes(self):
        return len(self.classnames)

    @property
    def counts(self):
        """(C,) training images per class."""
        return np.bincount(self.train.labels, minlength=self.num_classes)


def shot_split(counts):
    """(C,) training counts -> (C,) array of "many" (>= 100) | "medium" | "few" (<= 20), paper Sec. 4.2."""
    counts = np.asarray(counts)
    return np.where(counts >= MANY_FROM, "many", np.where(counts <= FEW_UP_TO, "few", "medium"))


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
    """The numbers as the official evaluation reports them, and as the paper's tables print them (docs/design.md §3):
    overall top-1 of the alpha mix, many / medium / few of the logit sum (logit_sum_prediction), two predictions.
    So the columns need not average to the overall: ImageNet-LT RN50 77.8 / 67.0 / 50.8 give ~69.0, not 70.1."""
    mix, logit_sum = accuracy_by_shot(pred_mix, y, counts), accuracy_by_shot(pred_logit_sum, y, counts)
    return {"overall": mix["overall"], **{k: logit_sum[k] for k in ("many", "medium", "few")}}


# ----------------------------------------------------------------------------------------------
# Class corpora: the 80 CLIP ImageNet prompt templates (shipped by open_clip) + description sentences


def prompt_sentences(classname):
    """The 80 CLIP prompt sentences for one class, e.g. 'a photo of a goldfish.' (paper Sec. 4.1)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES
    return [t(classname) for t in OPENAI_IMAGENET_TEMPLATES]


def build_corpus(classnames, descriptions, informative=None, prompts=True):
    """Corpus with the 80 prompt sentences prepended to each class's description sentences.

    descriptions: [C][k] str; informative: optional [C][k] bool; prompts=False gives descriptions only.
    Empty or whitespace-only sentences are dropped. A class left with no sentence at all (prompts=False
    and no description) keeps an empty list, with one warning: the stages pad and mask such classes.
    """
    sentences, source, flags = [], [], []
    for c, name in enumerate(classnames):
        keep = [i for i, s in enumerate(descriptions[c]) if s.strip()]
        p = prompt_sentences(name) if prompts else []
        sentences.append(p + [descriptions[c][i] for i in keep])
        source.append(["template"] * len(p) + ["description"] * len(keep))
        if informative is not None:
            flags.append([True] * len(p) + [informative[c][i] for i in keep])
    empty = sum(not s for s in sentences)
    if empty:
        warn(f"{empty} of {len(classnames)} classes have no text at all (no description, no prompt templates); "
             "they get no sentence to train on")
    return Corpus(sentences, source, flags if informative is not None else None)


def prompt_only(corpus):
    """The paper's "prompt only" text source (Table 10): keep the template sentences alone."""
    keep = [[i for i, s in enumerate(src) if s == "template"] for src in corpus.source]
    pick = lambda lists: [[lst[i] for i in k] for lst, k in zip(lists, keep)]
    return Corpus(pick(corpus.sentences), pick(corpus.source),
                  pick(corpus.informative) if corpus.informative is not None else None)


# ----------------------------------------------------------------------------------------------
# shapes_lt: the embedded world, generated in shapes_lt.py


def shapes_lt_data(world, name="shapes_lt", classnames=None):
    """The embedded world (shapes_lt.make_world: arrays and description sentences) as LTData; its corpus
    is built like a real dataset's, the 80 prompts first. classnames: other names for the classes
    (shapes_lt_coined), which change the prompt sentences and nothing else."""
    split = lambda k: Split(world[f"{k}_images"], world[f"{k}_labels"])
    classnames = classnames or world["classnames"]
    return LTData(name, classnames, split("train"), split("val"), split("test"),
                  build_corpus(classnames, world["descriptions"], world["informative"]))


# ----------------------------------------------------------------------------------------------
# Real datasets: their files are readers.py's; here they become LTData


def skip_unreadable(train, val, test):
    """--skip-bad-images: drop the unreadable images of the three splits, with one summarised warning."""
    train, bad_train = drop_unreadable(train)
    new_val, bad_val = drop_unreadable(val)
    test, bad_test = (new_val, []) if test is val else drop_unreadable(test)   # iNat, a tree without test/: val is test
    bad = bad_train + bad_val + bad_test
    if bad:
        where = f" at {bad[0][1]}" if bad[0][1] else ""          # an ImageFolder tree has no split-file lines
        warn(f"skipped {len(bad)} unreadable images (first: {bad[0][0]}{where}); --skip-bad-images left "
             f"them out (train {len(bad_train)}, val {len(bad_val)}, test {len(bad_test)})")
    return train, new_val, test


def make_lt_data(name, classnames, train, val, test, descriptions, skip_bad_images=False):
    """Assemble LTData: drop unreadable images if asked, warn once about classes without training images,
    build the text corpus from the [C][k] description sentences."""
    if skip_bad_images:
        train, val, test = skip_unreadable(train, val, test)
    empty = int((np.bincount(train.labels, minlength=len(classnames)) == 0).sum())
    if empty:
        warn(f"{empty} of {len(classnames)} classes have no training images in {name}")
    return LTData(name, classnames, train, val, test, build_corpus(classnames, descriptions))


def load_data(name, root=None, seed=0, text="wiki+prompt", skip_bad_images=False):
    """The one entry point: dataset name -> LTData. text: "wiki+prompt" (default) or "prompt" only.
    skip_bad_images: decode every listed image once now and drop the missing or unreadable ones, with one
    summarised warning. Without it a missing image is an error here and a corrupt one an error (naming
    file and split line) when it is loaded. shapes_lt and CIFAR-100-LT live in memory: nothing to check."""
    name = dataset_name(name)                                    # cifar100_lt -> cifar100_lt_ir100
    root = root or DATASETS[name]["root"]
    if name in SHAPES_WORLDS:
        world = shapes_lt.load_world(root, seed)                 # generated once per seed, cached under root
        coined = shapes_lt.coined_names(len(world["classnames"]), seed) if name == "shapes_lt_coined" else None
        data = shapes_lt_data(world, name, coined)
        if name == "shapes_lt_small":
            data.train = shapes_lt.first_images(data.train, SMALL_DIVISOR)
    elif name == "folder":
        data = make_lt_data(name, *image_folder(root, text != "prompt"), skip_bad_images)
    elif cifar_imbalance(name):                                  # in memory: nothing to skip
        data = make_lt_data(name, *cifar100_lt(root, cifar_imbalance(name), text != "prompt"))
    else:
        classnames, train, val, test = READERS[name](root, check_images=not skip_bad_images)
        descriptions = read_descriptions(root, len(classnames), text != "prompt")
        data = make_lt_data(name, classnames, train, val, test, descriptions, skip_bad_images)
    if text == "prompt":
        data.corpus = prompt_only(data.corpus)
    return data


# ----------------------------------------------------------------------------------------------
# Square-root sampling and the loader


def make_sampler(labels, kind="sqrt", generator=None):
    """Square-root sampling (paper Sec. 4.3, docs/design.md §4): class c is drawn with probability proportional to
    sqrt(n_c), uniformly inside the class. Per-image weight n_c^-1/2, so class mass n_c * n_c^-1/2 = sqrt(n_c).
    Epoch length = dataset size. kind="instance": every image equally likely (plain shuffling)."""
    labels = np.asarray(labels)
    if kind == "instance":
        return torch.utils.data.RandomSampler(range(len(labels)), generator=generator)
    if kind != "sqrt":
        raise DataError(f"unknown --sampling {kind!r}; choose sqrt or instance")
    counts = np.bincount(labels)
    weights = torch.as_tensor(counts[labels], dtype=torch.float64) ** -0.5
    return torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def image_transform(args, train):
    """The dataset's image transform (DATASETS). Training: RandomResizedCrop to its crop_scale and a flip, with
    args.augment "randaug" also the official RandAugment and random erasing. Evaluation: the short side to
    image_size / eval_crop, then a centre crop. The mean, std and resizing are the CLIP weights' (clip_transform)."""
    d = DATASETS[args.data]
    if train:
        return clip_transform(args, train=True, crop_scale=d["crop_scale"], augment=args.augment)
    return clip_transform(args, train=False, crop_pct=d["eval_crop"])


def make_loader(split, transform, args, sampling=None, generator=None, batch=None):
    """A DataLoader over one Split. With sampling="sqrt"|"instance" (training): make_sampler, wrapped so an
    epoch can resume part-way, and drop_last; without: in order (evaluation). args.loader "gpu" and image
    files: an images.DeviceLoader, which yields the same (x, y) batches with x already on args.device."""
    sampler = None
    if sampling:                                                 # torchrun: each rank its share of the global batch
        sampler = ResumableSampler(make_sampler(split.labels, sampling, generator), batch or args.batch, *rank_world())
    if getattr(args, "loader", "pil") == "gpu" and not isinstance(split.images, np.ndarray):
        # --loader gpu: the workers read file bytes; each batch is decoded and augmented on args.device.
        # A generator of its own: the loader's seed draw leaves torch's generator to the augmentation (resume).
        files = torch.utils.data.DataLoader(
            FileBytes(split), batch_size=batch or args.batch, sampler=sampler, num_workers=args.workers,
            collate_fn=collate_files, drop_last=bool(sampling), persistent_workers=args.workers > 0,
            worker_init_fn=ignore_sigterm, generator=torch.Generator())
        return DeviceLoader(files, DeviceTransform(transform, args.device), sampler)
    return torch.utils.data.DataLoader(
        ImageDataset(split, transform), batch_size=batch or args.batch, sampler=sampler,
        num_workers=args.workers, pin_memory=str(args.device).startswith("cuda"), drop_last=bool(sampling),
        persistent_workers=args.workers > 0, worker_init_fn=ignore_sigterm)


def ignore_sigterm(worker_id):
    """In each loader worker: ignore SIGTERM, as torch's workers already ignore Ctrl-C. slurm and torchrun send
    it to every process of the job; the training process then finishes its step and saves (engine.fit), which
    needs its workers alive, and stops them itself when it exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Text: tokenised once, cached


def corpus_tokens(data, model, args):
    """The class corpora tokenised at the model's context length (cached, cache_dir()); every class needs at
    least one sentence."""
    text = tokenize_corpus(data.corpus, context_length(model), cache_dir=cache_dir())
    require_sentences(data, text)
    return text


def require_sentences(data, text):
    """Every class needs at least one sentence: CVLP draws one per image, LGR attends over them."""
    empty = torch.nonzero(text["offsets"][1:] == text["offsets"][:-1]).flatten().tolist()
    if empty:
        names = ", ".join(data.classnames[c] for c in empty[:3])
        raise DataError(f"{len(empty)} classes have no sentences (e.g. {names}); keep the prompt templates "
                        f"(--text wiki+prompt or prompt) or add description files")


# ----------------------------------------------------------------------------------------------
# The dataset check: summary (the contact sheet is images.contact_sheet)


def corpus_stats(corpus, context_length=77):
    """The paper's Table 7: M_min, M_max, M_mean, M_med sentences per class, L_avg tokens per sentence."""
    m = np.array([len(s) for s in corpus.sentences])
    tok = tokenize_corpus(corpus, context_length, cache_dir=cache_dir())["tokens"]
    lengths = (tok.argmax(dim=1) + 1).float()                    # tokens incl. [SOS] and [EOS]
    return dict(M_min=int(m.min()), M_max=int(m.max()), M_mean=float(m.mean()), M_med=float(np.median(m)),
                L_avg=float(lengths.mean()) if len(lengths) else 0.0)


def summary(data):
    """Lines a user wants to see before training: sizes, imbalance, shot splits, corpus statistics."""
    counts = data.counts
    shots = shot_split(counts)
    lines = [f"dataset      {data.name}: {data.num_classes} classes",
             f"images       train {len(data.train.labels)}, val {len(data.val.labels)}, test {len(data.test.labels)}"
             + (" (val is the test split)" if data.val is data.test else ""),
             f"train/class  max {counts.max()}, min {counts.min()}, "
             f"imbalance factor {counts.max() / max(counts.min(), 1):.0f}"]
    for s, bounds in (("many", f">= {MANY_FROM}"), ("medium", f"{FEW_UP_TO + 1}-{MANY_FROM - 1}"), ("few", f"<= {FEW_UP_TO}")):
        sel = shots == s
        lines.append(f"  {s:<6}     {sel.sum():4d} classes, {counts[sel].sum():7d} train images ({bounds} a class)")
    order = np.argsort(-counts, kind="stable")                   # head to tail: the names as read, to check them
    named = lambda classes: ", ".join(f"{data.classnames[c][:40]} ({counts[c]})" for c in classes)
    lines += [f"classes      head: {named(order[:3])}", f"             tail: {named(order[::-1][:3])}"]
    st = corpus_stats(data.corpus)
    src = [x for srcs in data.corpus.source for x in srcs]
    lines.append(f"corpus       {sum(map(len, data.corpus.sentences))} sentences "
                 f"({src.count('template')} template, {src.count('description')} description)")
    lines.append("  (Table 7)  M_min {M_min}  M_max {M_max}  M_mean {M_mean:.0f}  M_med {M_med:.0f}  "
                 "L_avg {L_avg:.0f}".format(**st))
    if data.corpus.informative is not None:
        flags = [f for fl, srcs in zip(data.corpus.informative, data.corpus.source)
                 for f, s in zip(fl, srcs) if s == "description"]
        lines.append(f"  informative descriptions: {np.mean(flags):.1%} (ground truth)")
    return "\n".join(lines)


def get_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shapes_lt", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None, help="dataset folder (default: DATASETS[data]['root'])")
    p.add_argument("--imbalance", type=int, default=None, choices=CIFAR_IMBALANCES,
                   help="--data cifar100_lt: n_max / n_min of the training counts (default 100)")
    p.add_argument("--seed", type=flags.seed, default=0, help="shapes_lt world seed")
    p.add_argument("--sheet", default=None, help="contact sheet PNG (default: runs/<run name>/contact_sheet.png)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image once; report and leave out the unreadable ones (checks a download)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        name = dataset_name(args.data, args.imbalance)
        data = load_data(name, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
        print(summary(data))
        sheet = args.sheet or os.path.join("runs", run_name(name, args.data_root), "contact_sheet.png")
        path = contact_sheet(data.train, data.counts, sheet)
        shown = "" if data.num_classes <= 400 else f" (400 of {data.num_classes} classes, evenly spaced head to tail)"
        print(f"contact sheet {path}{shown}")
    except DataError as e:
        fail(e)


if __name__ == "__main__":
    main()
