"""Data for VL-LTR: long-tailed image datasets, class-level text corpora, square-root sampling.

Paper Sec. 4.1 (datasets, text descriptions) and Sec. 4.2 (shot splits); SPEC.md §4.

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
import argparse
import hashlib
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

import shapes_lt
from clip_models import context_length, default_tag, tokenize_exact
from engine import DataError, ResumableSampler, atomic_write, fail, rank_world, warn
from images import DeviceLoader, DeviceTransform, FileBytes, ImageDataset, collate_files, contact_sheet, drop_unreadable
from readers import READERS, Split, read_cifar100, read_descriptions, read_image_folder, read_named_descriptions

# Per-dataset defaults: where the data lives and what the stages use when not told otherwise.
DATASETS = {
    "shapes_lt": dict(root="data/shapes_lt", backbone="shapes-tiny", image_size=32, crop_scale=(0.5, 1.0)),
    # the same world (root, images, descriptions, CLIP stand-in) with made-up class names: shapes_lt.coined_names
    "shapes_lt_coined": dict(root="data/shapes_lt", backbone="shapes-tiny", image_size=32, crop_scale=(0.5, 1.0)),
    # the same world with a tenth of each class's training images (50 -> 1), for the over-fitting regime of L_dis
    "shapes_lt_small": dict(root="data/shapes_lt", backbone="shapes-tiny", image_size=32, crop_scale=(0.5, 1.0)),
    "imagenet_lt": dict(root="data/imagenet", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "places_lt": dict(root="data/places", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "inat2018": dict(root="data/inat", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    # your own ImageFolder tree (readers.read_image_folder): no default place, --data-root PATH; ImageNet-LT's settings
    "folder": dict(root=None, backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    # CIFAR-100-LT (Cui et al. 2019): 32 px images upsampled to CLIP's 224 and cropped as ImageNet's, as LIFT and
    # BALLAD fine-tune CLIP on it. --data cifar100_lt --imbalance 10 is the run named cifar100_lt_ir10 (dataset_name)
    "cifar100_lt": dict(root="data/cifar100", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "cifar100_lt_ir100": dict(root="data/cifar100", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "cifar100_lt_ir50": dict(root="data/cifar100", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "cifar100_lt_ir10": dict(root="data/cifar100", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
}

# Shot splits by training images per class, as the paper (Sec. 4.2) and the official evaluation define them:
# many >= 100, few <= 20, medium between (SPEC.md §4). The other common LTR convention (many > 100, few < 20)
# differs only for a class of exactly 100 or exactly 20 images: it puts both in medium.
MANY_FROM, FEW_UP_TO = 100, 20
SHAPES_WORLDS = ("shapes_lt", "shapes_lt_coined", "shapes_lt_small")   # generated in memory by shapes_lt.py
SMALL_DIVISOR = 10                                   # shapes_lt_small keeps max(1, n_c // 10) training images
CIFAR_IMBALANCES = (100, 50, 10)                     # n_max / n_min of CIFAR-100-LT as the literature reports it
CIFAR_SUBSET_SEED = 0                                # LDAM-DRW's rand_number; not --seed: every run, the same images


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
    p.add_argument("--image-size", type=int, default=None, help="input size (default: per dataset, 224 for CLIP "
                   "backbones; 384 for the iNat ViT-B/16-384 row; CIFAR-100-LT's 32 px images are upsampled to it, as "
                   "LIFT and BALLAD do)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: up to 8; 0 on shapes_lt)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted, one warning) instead of stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>/<backbone>, runs/<data>/<backbone>-<tag> "
                   "for a --pretrained other than the default)")
    p.add_argument("--seed", type=int, default=0, help="seeds training and the shapes_lt world")
    return p


def fill_defaults(args):
    """Per-dataset defaults shared by all stages (DATASETS); the dataset's name (dataset_name: cifar100_lt with
    --imbalance 10 becomes cifar100_lt_ir10); the run folder runs/<run_name>/<backbone>, with the tag appended for
    weights other than the default ones (so that two runs of one backbone keep their own files)."""
    try:
        args.data = dataset_name(args.data, getattr(args, "imbalance", None))
    except DataError as e:
        fail(e)
    args.imbalance = cifar_imbalance(args.data)                  # in the saved args: None unless CIFAR-100-LT
    d = DATASETS[args.data]
    args.backbone = args.backbone or d["backbone"]
    args.pretrained = args.pretrained or default_tag(args.backbone)
    args.image_size = args.image_size or d["image_size"]
    args.data_root = args.data_root or d["root"]
    args.workers = args.workers if args.workers is not None else (0 if args.data in SHAPES_WORLDS else default_workers())
    folder = args.backbone if args.pretrained == default_tag(args.backbone) else f"{args.backbone}-{args.pretrained}"
    args.out = args.out or os.path.join("runs", run_name(args.data, args.data_root), folder)
    return args


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


def first_images(split, divisor):
    """Each class's first max(1, n_c // divisor) images in the world's order (shapes_lt_small): its first sittings
    of five (the last one maybe cut short), so a head class keeps 10 scenes of 100 and a tail class one photo."""
    counts = np.bincount(split.labels)
    return split.subset(np.concatenate([np.flatnonzero(split.labels == c)[:max(1, n // divisor)]
                                        for c, n in enumerate(counts)]))


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


def image_folder_data(root, descriptions=True, skip_bad_images=False):
    """--data folder: the user's ImageFolder tree (readers.read_image_folder) as LTData; class descriptions from
    <root>/descriptions/<class folder>.txt when descriptions is True."""
    if root is None:
        raise DataError("--data folder needs --data-root PATH, a folder holding train/<class>/* and val/<class>/*")
    folders, classnames, train, val, test = read_image_folder(root)
    text = (read_named_descriptions(os.path.join(root, "descriptions"), folders) if descriptions
            else [[] for _ in folders])
    return make_lt_data("folder", classnames, train, val, test, text, skip_bad_images)


# CIFAR-100-LT, as the long-tailed literature builds it (Cui et al. 2019; Cao et al. 2019's LDAM-DRW code,
# which LIFT and BALLAD reuse): class i keeps n_i = int(n_max * (1 / imbalance) ** (i / 99)) training images,
# n_max = 500; the balanced test set (100 a class) is the test split and, there being no other, the val split.


def long_tailed_counts(n_max, num_classes, imbalance):
    """[C] training images per class, falling exponentially from n_max to n_max / imbalance; int() rounds down, as
    the literature's code does (CIFAR-100, n_max 500: 10,847 images at imbalance 100, 12,608 at 50, 19,573 at 10)."""
    return [int(n_max * (1 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def long_tailed_subset(split, counts, seed=CIFAR_SUBSET_SEED):
    """Class c keeps counts[c] of its images: the first ones of its indices shuffled by one RandomState(seed),
    class after class. That is LDAM-DRW's draw (np.random.seed(0), then np.random.shuffle per class) without
    touching numpy's global state, so the subset is the literature's, image for image."""
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        index = np.flatnonzero(split.labels == c)                # this class's images, in file order
        rng.shuffle(index)
        keep.append(index[:n])
    return split.subset(np.concatenate(keep))


def cifar100_lt_data(root, imbalance, descriptions=True):
    """CIFAR-100-LT with the given imbalance factor from torchvision's CIFAR-100 files (readers.read_cifar100):
    class names from the meta file, underscores as spaces; descriptions from <root>/descriptions/<meta name>.txt
    (aquarium_fish.txt) when descriptions is True. Images stay in memory, uint8 (N, 32, 32, 3), as shapes_lt's."""
    names, train, test = read_cifar100(root)
    n_max = int(np.bincount(train.labels, minlength=len(names)).min())   # 500 in CIFAR-100's training file
    train = long_tailed_subset(train, long_tailed_counts(n_max, len(names), imbalance))
    classnames = [n.replace("_", " ") for n in names]
    text = read_named_descriptions(os.path.join(root, "descriptions"), names) if descriptions else [[] for _ in names]
    return make_lt_data(f"cifar100_lt_ir{imbalance}", classnames, train, test, test, text)


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
            data.train = first_images(data.train, SMALL_DIVISOR)
    elif name == "folder":
        data = image_folder_data(root, text != "prompt", skip_bad_images)
    elif cifar_imbalance(name):                                  # in memory: nothing to skip
        data = cifar100_lt_data(root, cifar_imbalance(name), text != "prompt")
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
    """Square-root sampling (paper Sec. 4.3, SPEC §4): class c is drawn with probability proportional to
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


def tokenize_corpus(corpus, context_length=77, cache_dir=None):
    """All sentences, flattened class by class, tokenised once with the open_clip BPE tokenizer.

    Returns {"tokens": (S, L) int32, "label": (S,) int64 class of each sentence,
             "offsets": (C + 1,) int64, class c owns sentences offsets[c]:offsets[c+1],
             "truncated": number of sentences longer than the context (cut, EOT kept last)}.
    Cached under cache_dir, keyed by a hash of the sentences and the context length. One warning when
    some sentences were truncated (also on a cache hit: the count is in the cache).
    """
    flat = [s for sents in corpus.sentences for s in sents]
    key = hashlib.sha1(("\n".join(flat) + f"|{context_length}|v2").encode()).hexdigest()[:16]   # v2: exact count
    path = os.path.join(cache_dir, f"tokens_{key}.pt") if cache_dir else None
    out = None
    if path and os.path.exists(path):
        try:
            out = torch.load(path, weights_only=True)
        except Exception:
            pass
    if out is None:
        tokens, truncated = tokenize_exact(flat, context_length)
        sizes = [len(s) for s in corpus.sentences]
        out = {"tokens": tokens.to(torch.int32),
               "label": torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)),
               "offsets": torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.long),
               "truncated": truncated}
        if path:
            try:
                atomic_write(path, lambda f: torch.save(out, f))
            except OSError:
                pass
    if out["truncated"]:
        warn(f"{out['truncated']} sentences are longer than the {context_length}-token context and were "
             "truncated (EOT kept last)")
    return out


def cache_dir():
    """Where tokenised corpora are kept between runs: $VL_LTR_CACHE, else ~/.cache/vl-ltr. One file per corpus
    and context length (named by their hash), shared by every run folder: a corpus is tokenised once (iNat's
    919K sentences take about a minute)."""
    return os.environ.get("VL_LTR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vl-ltr")


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shapes_lt", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None, help="dataset folder (default: DATASETS[data]['root'])")
    p.add_argument("--imbalance", type=int, default=None, choices=CIFAR_IMBALANCES,
                   help="--data cifar100_lt: n_max / n_min of the training counts (default 100)")
    p.add_argument("--seed", type=int, default=0, help="shapes_lt world seed")
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
