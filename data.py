"""Data for VL-LTR: long-tailed image datasets, class-level text corpora, square-root sampling.

Paper Sec. 4.1 (datasets, text descriptions) and Sec. 4.2 (shot splits); SPEC.md §4.

    python data.py --data shapes_lt            # summary + contact sheet, no download
    python data.py --data imagenet_lt --data-root data/imagenet
    python data.py --data imagenet_lt --data-root data/imagenet --skip-bad-images   # + decode every image once

This is the one file that knows about datasets. Every dataset becomes an `LTData`: the class
names, three `Split`s (train / val / test) and a `Corpus` (per class, a list of sentences).
The stages use `load_data`, `make_loader` (square-root sampling), `corpus_tokens`
and `shot_split` from here. The embedded shapes_lt world is generated in shapes_lt.py.
"""
import argparse
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import shapes_lt
from clip_models import context_length, tokenize_exact
from engine import DataError, ResumableSampler, atomic_write, fail, rank_world, warn
from images import DeviceLoader, DeviceTransform, FileBytes, ImageDataset, collate_files, drop_unreadable, load_rgb

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
}

# Shot splits by training images per class (SPEC §4). The paper writes many >= 100 and few <= 20,
# which overlap with medium (20~100); we use the common LTR convention: many > 100, few < 20.
MANY_ABOVE, FEW_BELOW = 100, 20
SHAPES_WORLDS = ("shapes_lt", "shapes_lt_coined", "shapes_lt_small")   # generated in memory by shapes_lt.py
SMALL_DIVISOR = 10                                   # shapes_lt_small keeps max(1, n_c // 10) training images


def fill_defaults(args):
    """Per-dataset defaults shared by all stages (DATASETS); the run folder runs/<data>/<backbone>."""
    if args.data not in DATASETS:
        fail(f"unknown --data {args.data!r}; choose one of: {', '.join(DATASETS)}")
    d = DATASETS[args.data]
    args.backbone = args.backbone or d["backbone"]
    args.image_size = args.image_size or d["image_size"]
    args.data_root = args.data_root or d["root"]
    args.workers = args.workers if args.workers is not None else (0 if args.data in SHAPES_WORLDS else default_workers())
    args.out = args.out or os.path.join("runs", args.data, args.backbone)
    return args


def default_workers():
    """Loader processes for image files: 8, or fewer when this process may use fewer CPU cores (more only
    compete for them, and torch's DataLoader warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


# ----------------------------------------------------------------------------------------------
# The common representation


@dataclass
class Split:
    images: object          # list of file paths (real datasets) or uint8 array (N, H, W, 3) (shapes_lt)
    labels: np.ndarray      # (N,) int64 class indices
    lines: list = None      # "file:line" of each image in its split file, for error messages

    def subset(self, index):
        """The Split restricted to the images at `index` (a list of positions), in that order."""
        images = self.images[index] if isinstance(self.images, np.ndarray) else [self.images[i] for i in index]
        return Split(images, self.labels[index], [self.lines[i] for i in index] if self.lines else None)


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
    """(C,) training counts -> (C,) array of "many" | "medium" | "few" (paper Sec. 4.2)."""
    counts = np.asarray(counts)
    return np.where(counts > MANY_ABOVE, "many", np.where(counts < FEW_BELOW, "few", "medium"))


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
# Real datasets: ImageNet-LT, Places-LT, iNaturalist 2018 in their official on-disk layout (SPEC §4)

# Split files list "relative/path label" per line; every listed image is checked to exist at load
# time, so a broken download fails here with the file and line, not hours into training.

WIKI_DROPPED = {"external links", "references", "further reading", "bibliography", "see also", "notes"}
WIKI_HEADER = re.compile(r"\s*(=+)\s*(.*?)\s*\1\s*")                     # "== History ==", "=== Sub ==="
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'“(])")             # ". The", "! 1990", '? "'
ABBREVIATION = re.compile(r"(?:^|[\s(])(?:e\.g|i\.e|cf|vs|c|St|Dr|Mr|Mrs|Ms|Prof|Jr|Sr|Mt|U\.S|U\.K|[A-Z])\.$")
IMAGENET_LABEL_LINE = re.compile(r"\S+\s+(?P<index>\d+)\s+(?P<name>.+)")  # "n01440764 0 tench, Tinca tinca"
PLACES_LABEL_LINE = re.compile(r"(?P<name>.+?)\s+(?P<index>\d+)")         # "/a/abbey 0"



def split_sentences(paragraph):
    """Split after . ! ? followed by a capital, digit or quote; not after "e.g.", "St.", "U.S.", initials."""
    sentences = []
    for piece in SENTENCE_END.split(paragraph):
        if sentences and ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def parse_wiki(text):
    """A class's Wikipedia text -> description sentences (paper Sec. 4.1, SPEC §4).

    One paragraph per line (Wikipedia's plain-text extracts). Drops header lines and the sections
    External links, References, Further reading, Bibliography, See also and Notes with their
    subsections; keeps sentences of 3 words or more (drops titles, list stubs, "Yes.").
    """
    sentences, dropped_level = [], None
    for line in text.splitlines():
        header = WIKI_HEADER.fullmatch(line)
        if header:
            level, title = len(header.group(1)), header.group(2).lower()
            if dropped_level is None or level <= dropped_level:   # deeper headers stay in a dropped section
                dropped_level = level if title in WIKI_DROPPED else None
        elif dropped_level is None:
            sentences += [s.strip() for s in split_sentences(line.strip())]
    return [s for s in sentences if len(s.split()) >= 3]


def read_descriptions(root, num_classes, wiki=True):
    """[C][k] description sentences from <root>/wiki/desc_<c>.txt; [] (templates only) where there is none."""
    folder = os.path.join(root, "wiki")
    if not wiki:
        return [[] for _ in range(num_classes)]
    if not os.path.isdir(folder):
        warn(f"no wiki/ folder under {root}: using the 80 prompt templates only (the paper's 'prompt only' setting)")
        return [[] for _ in range(num_classes)]
    descriptions, missing = [], 0
    for c in range(num_classes):
        path = os.path.join(folder, f"desc_{c}.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:   # non-UTF-8 bytes become U+FFFD
                descriptions.append(parse_wiki(f.read()))
        else:
            descriptions.append([])
            missing += 1
    if missing:
        warn(f"{missing} of {num_classes} classes have no {folder}/desc_<index>.txt: they use the prompt templates only")
    return descriptions


def check_root(root, layout):
    """The data root must exist and hold something; the message lists what belongs in it."""
    if not os.path.isdir(root):
        raise DataError(f"data root {root} not found; expected {layout}; pass --data-root")
    if not os.listdir(root):
        raise DataError(f"data root {root} is empty; expected {layout}; finish the download or pass --data-root")


def check_image(path, where):
    """Every listed image must exist (a plain loop of os.path.exists: ~186K files for ImageNet-LT)."""
    if not os.path.exists(path):
        raise DataError(f"{where}: image {path} not found; check --data-root (paths are relative to it) "
                        "or remove the line")


def read_split_file(path, root, num_classes=None, check_images=True):
    """A split file of "relative/path label" lines -> Split. Labels must lie in 0..num_classes-1
    (only >= 0 when num_classes is None: the train split is checked against the class list after).
    check_images=False (--skip-bad-images): missing images are left to skip_unreadable()."""
    if not os.path.isfile(path):
        raise DataError(f"split file {path} not found; put the official split files under {root} or pass --data-root")
    images, labels, lines = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise DataError(f"{where}: malformed line {line.strip()!r}; expected 'relative/path.JPEG label'")
            label = int(parts[1])
            if label < 0 or (num_classes is not None and label >= num_classes):
                valid = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
                raise DataError(f"{where}: label {label} out of range (valid: {valid}); fix the line")
            image = os.path.join(root, parts[0])
            if check_images:
                check_image(image, where)
            images.append(image)
            labels.append(label)
            lines.append(where)
    if not labels:
        raise DataError(f"split file {path} lists no images; re-download it")
    return Split(images, np.array(labels, dtype=np.int64), lines)


def check_class_count(train, num_classes, names_file):
    """The class list must cover every training label: more labels than names means the wrong list."""
    n = int(train.labels.max()) + 1
    if n > num_classes:
        where = train.lines[int(train.labels.argmax())]
        raise DataError(f"{names_file} names {num_classes} classes but the train split uses {n} "
                        f"(label {n - 1} at {where}); use the class list that came with these split files")


def read_class_list(path, pattern):
    """labels.txt -> [C] class names ordered by index; `pattern` matches one line with groups index, name."""
    names = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = pattern.fullmatch(line.strip())
            if not m:
                raise DataError(f"{path}:{lineno}: malformed class line {line.strip()!r}")
            names[int(m.group("index"))] = m.group("name").strip()
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(len(names))) - set(names))
        raise DataError(f"{path}: class indices must be 0..{len(names) - 1}, each once; "
                        f"index {missing[0]} is missing or repeated")
    return [names[i] for i in range(len(names))]


def skip_unreadable(train, val, test):
    """--skip-bad-images: drop the unreadable images of the three splits, with one summarised warning."""
    train, bad_train = drop_unreadable(train)
    new_val, bad_val = drop_unreadable(val)
    test, bad_test = (new_val, []) if test is val else drop_unreadable(test)   # iNat: val serves as test
    bad = bad_train + bad_val + bad_test
    if bad:
        warn(f"skipped {len(bad)} unreadable images (first: {bad[0][0]} at {bad[0][1]}); --skip-bad-images left "
             f"them out (train {len(bad_train)}, val {len(bad_val)}, test {len(bad_test)})")
    return train, new_val, test


def make_lt_data(name, classnames, train, val, test, root, wiki, skip_bad_images=False):
    """Assemble LTData: drop unreadable images if asked, warn once about classes without training images,
    build the text corpus."""
    if skip_bad_images:
        train, val, test = skip_unreadable(train, val, test)
    empty = int((np.bincount(train.labels, minlength=len(classnames)) == 0).sum())
    if empty:
        warn(f"{empty} of {len(classnames)} classes have no training images in {name}")
    descriptions = read_descriptions(root, len(classnames), wiki)
    return LTData(name, classnames, train, val, test, build_corpus(classnames, descriptions))


def load_txt_splits(name, root, prefix, classnames, names_file, wiki, skip_bad_images=False):
    """ImageNet-LT and Places-LT: <prefix>_{train,val,test}.txt under root, plus the wiki corpus."""
    split_path = lambda s: os.path.join(root, f"{prefix}_{s}.txt")
    check = not skip_bad_images
    train = read_split_file(split_path("train"), root, check_images=check)
    check_class_count(train, len(classnames), names_file)
    val = read_split_file(split_path("val"), root, len(classnames), check_images=check)
    test = read_split_file(split_path("test"), root, len(classnames), check_images=check)
    return make_lt_data(name, classnames, train, val, test, root, wiki, skip_bad_images)


def load_imagenet_lt(root, wiki=True, skip_bad_images=False):
    """ImageNet-LT (1000 classes, 115.8K train images, Liu et al. 2019), official split files.

    Class names from <root>/labels.txt ("wnid index name") if present, else open_clip's
    IMAGENET_CLASSNAMES (SPEC §7: two names repeat; classes keep their identity by index).
    """
    check_root(root, "ImageNet_LT_{train,val,test}.txt, labels.txt, train/ val/ ... "
                     "and optional wiki/desc_<index>.txt")
    names_file = os.path.join(root, "labels.txt")
    if os.path.isfile(names_file):
        classnames = read_class_list(names_file, IMAGENET_LABEL_LINE)
    else:
        from open_clip import IMAGENET_CLASSNAMES
        classnames, names_file = list(IMAGENET_CLASSNAMES), "open_clip's IMAGENET_CLASSNAMES (no labels.txt)"
    return load_txt_splits("imagenet_lt", root, "ImageNet_LT", classnames, names_file, wiki, skip_bad_images)


def places_name(raw):
    """Places365 category -> readable name: "/a/apartment_building/outdoor" -> "apartment building outdoor"."""
    return re.sub(r"^/[a-z]/", "", raw).replace("/", " ").replace("_", " ").strip()


def load_places_lt(root, wiki=True, skip_bad_images=False):
    """Places-LT (365 classes, 62.5K train images, Liu et al. 2019); labels.txt ("name index") is required."""
    check_root(root, "Places_LT_{train,val,test}.txt, labels.txt ('name index' per line), the images "
                     "they list and optional wiki/desc_<index>.txt")
    names_file = os.path.join(root, "labels.txt")
    if not os.path.isfile(names_file):
        raise DataError(f"{names_file} not found; Places-LT needs the class list, one 'name index' per line "
                        "(e.g. '/a/abbey 0', Places365's categories_places365.txt)")
    classnames = [places_name(n) for n in read_class_list(names_file, PLACES_LABEL_LINE)]
    return load_txt_splits("places_lt", root, "Places_LT", classnames, names_file, wiki, skip_bad_images)


def read_json(path):
    """An iNat json file, with a one-line error when it is missing or not JSON."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; put the official iNaturalist 2018 json files there or pass --data-root")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-download it")


def read_coco_split(path, root, class_of, check_images=True):
    """COCO-style iNat json ("images" [{id, file_name}], "annotations" [{image_id, category_id}]) -> Split.
    class_of: category id -> class index. Lines are "<file>:annotations[<i>]"."""
    d = read_json(path)
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        pairs = [(a["image_id"], a["category_id"]) for a in d["annotations"]]
    except (KeyError, TypeError):
        raise DataError(f"{path}: expected COCO-style 'images' [{{id, file_name}}] and "
                        "'annotations' [{image_id, category_id}]; re-download it")
    images, labels, lines = [], [], []
    for i, (image_id, category) in enumerate(pairs):
        where = f"{path}:annotations[{i}]"
        if category not in class_of or image_id not in files:
            raise DataError(f"{where}: category_id {category} or image_id {image_id} not defined "
                            "(categories.json / 'images'); use matching json files")
        image = os.path.join(root, files[image_id])
        if check_images:
            check_image(image, where)
        images.append(image)
        labels.append(class_of[category])
        lines.append(where)
    return Split(images, np.array(labels, dtype=np.int64), lines)


def load_inat2018(root, wiki=True, skip_bad_images=False):
    """iNaturalist 2018 (8142 classes, 437.5K train images). The paper reports on val: val = test here.

    Classes are the categories.json entries sorted by id (ids 0..8141 in the official file, so
    class index = category id there); wiki/desc_<index>.txt uses that index.
    """
    check_root(root, "train2018.json, val2018.json, categories.json, the images they list "
                     "(train_val2018/...) and optional wiki/desc_<index>.txt")
    try:
        categories = sorted(read_json(os.path.join(root, "categories.json")), key=lambda c: c["id"])
        classnames = [c["name"] for c in categories]
    except (KeyError, TypeError):
        raise DataError(f"{root}/categories.json: expected a list of {{id, name, ...}}; re-download it")
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    train = read_coco_split(os.path.join(root, "train2018.json"), root, class_of, not skip_bad_images)
    val = read_coco_split(os.path.join(root, "val2018.json"), root, class_of, not skip_bad_images)
    return make_lt_data("inat2018", classnames, train, val, val, root, wiki, skip_bad_images)



def load_data(name, root=None, seed=0, text="wiki+prompt", skip_bad_images=False):
    """The one entry point: dataset name -> LTData. text: "wiki+prompt" (default) or "prompt" only.
    skip_bad_images: decode every listed image once now and drop the missing or unreadable ones, with one
    summarised warning. Without it a missing image is an error here and a corrupt one an error (naming
    file and split line) when it is loaded. shapes_lt lives in memory: nothing to check."""
    if name not in DATASETS:
        raise DataError(f"unknown --data {name!r}; choose one of: {', '.join(DATASETS)}")
    root = root or DATASETS[name]["root"]
    if name in SHAPES_WORLDS:
        world = shapes_lt.load_world(root, seed)                 # generated once per seed, cached under root
        coined = shapes_lt.coined_names(len(world["classnames"]), seed) if name == "shapes_lt_coined" else None
        data = shapes_lt_data(world, name, coined)
        if name == "shapes_lt_small":
            data.train = first_images(data.train, SMALL_DIVISOR)
    else:
        data = {"imagenet_lt": load_imagenet_lt, "places_lt": load_places_lt,
                "inat2018": load_inat2018}[name](root, wiki=text != "prompt", skip_bad_images=skip_bad_images)
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
            generator=torch.Generator())
        return DeviceLoader(files, DeviceTransform(transform, args.device), sampler)
    return torch.utils.data.DataLoader(
        ImageDataset(split, transform), batch_size=batch or args.batch, sampler=sampler,
        num_workers=args.workers, pin_memory=str(args.device).startswith("cuda"), drop_last=bool(sampling),
        persistent_workers=args.workers > 0)


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


def corpus_tokens(data, model, args):
    """The class corpora tokenised at the model's context length (cached beside the shapes_lt world, or in
    the run folder); every class needs at least one sentence."""
    text = tokenize_corpus(data.corpus, context_length(model),
                           cache_dir=args.data_root if args.data in SHAPES_WORLDS else args.out)
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
# Summary and contact sheet


def corpus_stats(corpus, context_length=77):
    """The paper's Table 7: M_min, M_max, M_mean, M_med sentences per class, L_avg tokens per sentence."""
    m = np.array([len(s) for s in corpus.sentences])
    tok = tokenize_corpus(corpus, context_length)["tokens"]
    lengths = (tok.argmax(dim=1) + 1).float()                    # tokens incl. [SOS] and [EOS]
    return dict(M_min=int(m.min()), M_max=int(m.max()), M_mean=float(m.mean()), M_med=float(np.median(m)),
                L_avg=float(lengths.mean()) if len(lengths) else 0.0)


def contact_sheet(data, path, per_row=20, cell=48):
    """One training image per class, head (top left) to tail (bottom right), with its count."""
    from PIL import ImageDraw
    counts = data.counts
    order = np.argsort(-counts, kind="stable")
    rows = math.ceil(len(order) / per_row)
    sheet = Image.new("RGB", (per_row * cell, rows * (cell + 12)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    first = {int(c): i for i, c in reversed(list(enumerate(data.train.labels)))}
    for j, c in enumerate(order):
        x, y = (j % per_row) * cell, (j // per_row) * (cell + 12)
        if c in first:
            images = data.train.images
            im = Image.fromarray(images[first[c]]) if isinstance(images, np.ndarray) else load_rgb(images[first[c]])
            sheet.paste(im.resize((cell - 4, cell - 4), Image.NEAREST), (x + 2, y + 2))
        draw.text((x + 2, y + cell - 2), f"{counts[c]}", fill=(0, 0, 0))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    return path


def summary(data):
    """Lines a user wants to see before training: sizes, imbalance, shot splits, corpus statistics."""
    counts = data.counts
    shots = shot_split(counts)
    lines = [f"dataset      {data.name}: {data.num_classes} classes",
             f"images       train {len(data.train.labels)}, val {len(data.val.labels)}, test {len(data.test.labels)}",
             f"train/class  max {counts.max()}, min {counts.min()}, "
             f"imbalance factor {counts.max() / max(counts.min(), 1):.0f}"]
    for s in ("many", "medium", "few"):
        sel = shots == s
        lines.append(f"  {s:<6}     {sel.sum():4d} classes, {counts[sel].sum():7d} train images")
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
    p.add_argument("--seed", type=int, default=0, help="shapes_lt world seed")
    p.add_argument("--sheet", default=None, help="contact sheet PNG (default: runs/<data>/contact_sheet.png)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image once; report and leave out the unreadable ones (checks a download)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        data = load_data(args.data, args.data_root, args.seed, skip_bad_images=args.skip_bad_images)
        print(summary(data))
        path = contact_sheet(data, args.sheet or os.path.join("runs", args.data, "contact_sheet.png"))
        print(f"contact sheet {path}")
    except DataError as e:
        fail(e)


if __name__ == "__main__":
    main()
