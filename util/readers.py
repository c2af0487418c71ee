"""The paper's datasets' files on disk, read into Splits: ImageNet-LT and Places-LT split files, iNaturalist
2018's json files, and the class descriptions (wiki/desc_<index>.txt), in the official layouts (docs/design.md §4).
The user's own image folders and CIFAR-100 are own_data.py's.

    classnames, train, val, test = READERS["imagenet_lt"](root)   # [C] names and three Splits
    descriptions = read_descriptions(root, len(classnames))      # [C][k] sentences

Nothing here knows about corpora, sampling or training: data.py turns what these functions return into
an LTData. Every problem with a file is one DataError naming the file and line.
"""
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from util.errors import DataError, warn


@dataclass
class Split:
    images: object          # list of file paths (real datasets) or uint8 array (N, H, W, 3) (shapes_lt, CIFAR)
    labels: np.ndarray      # (N,) int64 class indices
    lines: list = None      # "file:line" of each image in its split file, for error messages (None: no split file)

    def subset(self, index):
        """The Split restricted to the images at `index` (a list of positions), in that order."""
        images = self.images[index] if isinstance(self.images, np.ndarray) else [self.images[i] for i in index]
        return Split(images, self.labels[index], [self.lines[i] for i in index] if self.lines else None)



# ----------------------------------------------------------------------------------------------
# Class descriptions: one Wikipedia text per class, wiki/desc_<index>.txt (paper Sec. 4.1)

WIKI_DROPPED = {"external links", "references", "further reading", "bibliography", "see also", "notes"}
WIKI_HEADER = re.compile(r"\s*(=+)\s*(.*?)\s*\1\s*")                     # "== History ==", "=== Sub ==="
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'“(])")             # ". The", "! 1990", '? "'
ABBREVIATION = re.compile(r"(?:^|[\s(])(?:e\.g|i\.e|cf|vs|c|St|Dr|Mr|Mrs|Ms|Prof|Jr|Sr|Mt|U\.S|U\.K|[A-Z])\.$")


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
    """A class's Wikipedia text -> description sentences (paper Sec. 4.1, docs/design.md §4).

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


def read_description_file(path):
    """One class's description file -> its sentences (parse_wiki); non-UTF-8 bytes become U+FFFD."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_wiki(f.read())


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
            descriptions.append(read_description_file(path))
        else:
            descriptions.append([])
            missing += 1
    if missing:
        warn(f"{missing} of {num_classes} classes have no {folder}/desc_<index>.txt: they use the prompt templates only")
    return descriptions


# ----------------------------------------------------------------------------------------------
# The official layouts: ImageNet-LT, Places-LT, iNaturalist 2018

# Split files list "relative/path label" per line; every listed image is checked to exist at load
# time, so a broken download fails here with the file and line, not hours into training.

IMAGENET_LABEL_LINE = re.compile(r"\S+\s+(?P<index>\d+)\s+(?P<name>.+)")  # "n01440764 0 tench, Tinca tinca"
PLACES_LABEL_LINE = re.compile(r"(?P<name>.+?)\s+(?P<index>\d+)")         # "/a/abbey 0"


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


def read_txt_splits(root, prefix, classnames, names_file, check_images=True):
    """ImageNet-LT and Places-LT: <prefix>_{train,val,test}.txt under root -> (train, val, test) Splits."""
    split_path = lambda s: os.path.join(root, f"{prefix}_{s}.txt")
    train = read_split_file(split_path("train"), root, check_images=check_images)
    check_class_count(train, len(classnames), names_file)
    val = read_split_file(split_path("val"), root, len(classnames), check_images=check_images)
    test = read_split_file(split_path("test"), root, len(classnames), check_images=check_images)
    return train, val, test


def read_imagenet_lt(root, check_images=True):
    """ImageNet-LT (1000 classes, 115.8K train images, Liu et al. 2019), official split files
    -> (classnames, train, val, test).

    Class names from <root>/labels.txt ("wnid index name") if present, else open_clip's
    IMAGENET_CLASSNAMES (docs/design.md §7: two names repeat; classes keep their identity by index).
    """
    check_root(root, "ImageNet_LT_{train,val,test}.txt, labels.txt, train/ val/ ... "
                     "and optional wiki/desc_<index>.txt")
    names_file = os.path.join(root, "labels.txt")
    if os.path.isfile(names_file):
        classnames = read_class_list(names_file, IMAGENET_LABEL_LINE)
    else:
        from open_clip import IMAGENET_CLASSNAMES
        classnames, names_file = list(IMAGENET_CLASSNAMES), "open_clip's IMAGENET_CLASSNAMES (no labels.txt)"
    return (classnames, *read_txt_splits(root, "ImageNet_LT", classnames, names_file, check_images))


def places_name(raw):
    """Places365 category -> readable name: "/a/apartment_building/outdoor" -> "apartment building outdoor"."""
    return re.sub(r"^/[a-z]/", "", raw).replace("/", " ").replace("_", " ").strip()


def read_places_lt(root, check_images=True):
    """Places-LT (365 classes, 62.5K train images, Liu et al. 2019) -> (classnames, train, val, test);
    labels.txt ("name index") is required."""
    check_root(root, "Places_LT_{train,val,test}.txt, labels.txt ('name index' per line), the images "
                     "they list and optional wiki/desc_<index>.txt")
    names_file = os.path.join(root, "labels.txt")
    if not os.path.isfile(names_file):
        raise DataError(f"{names_file} not found; Places-LT needs the class list, one 'name index' per line "
                        "(e.g. '/a/abbey 0', Places365's categories_places365.txt)")
    classnames = [places_name(n) for n in read_class_list(names_file, PLACES_LABEL_LINE)]
    return (classnames, *read_txt_splits(root, "Places_LT", classnames, names_file, check_images))


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


def read_inat2018(root, check_images=True):
    """iNaturalist 2018 (8142 classes, 437.5K train images) -> (classnames, train, val, test). The paper
    reports on val: val = test here (the same Split object).

    Classes are the categories.json entries sorted by id (ids 0..8141 in the official file, so
    class index = category id there); wiki/desc_<index>.txt uses that index.
    """
    check_root(root, "train2018.json, val2018.json (or val.json), categories.json, the images they list "
                     "(train_val2018/...) and optional wiki/desc_<index>.txt")
    try:
        categories = sorted(read_json(os.path.join(root, "categories.json")), key=lambda c: c["id"])
        classnames = [c["name"] for c in categories]
    except (KeyError, TypeError):
        raise DataError(f"{root}/categories.json: expected a list of {{id, name, ...}}; re-download it")
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    train = read_coco_split(os.path.join(root, "train2018.json"), root, class_of, check_images)
    val_file = os.path.join(root, "val2018.json")
    if not os.path.isfile(val_file) and os.path.isfile(os.path.join(root, "val.json")):
        val_file = os.path.join(root, "val.json")                 # the name the official VL-LTR README gives it
    val = read_coco_split(val_file, root, class_of, check_images)
    return classnames, train, val, val


READERS = {"imagenet_lt": read_imagenet_lt, "places_lt": read_places_lt, "inat2018": read_inat2018}
