"""Data for VL-LTR: long-tailed image datasets, class-level text corpora, square-root sampling.

Paper Sec. 4.1 (datasets, text descriptions) and Sec. 4.2 (shot splits); SPEC.md §4.

    python data.py --data shapes_lt            # summary + contact sheet, no download
    python data.py --data imagenet_lt --data-root data/imagenet
    python data.py --data imagenet_lt --data-root data/imagenet --skip-bad-images   # + decode every image once

This is the one file that knows about datasets. Every dataset becomes an `LTData`: the class
names, three `Split`s (train / val / test) and a `Corpus` (per class, a list of sentences).
The stages (cvlp.py, anss.py, lgr.py, evaluate.py) only use `load_data`, `ImageDataset`,
`make_sampler`, `make_transform`, `tokenize_corpus` and `shot_split` from here.

shapes_lt is a small procedurally generated long-tailed world (SPEC §4): 100 classes, each a
colour x shape composition, ImageNet-LT-like train counts 500 -> 5, training photos taken in
sittings of five that share a scene (so a tail class shows one scene), and a per-class corpus
of informative and noise sentences with a ground-truth `informative` flag.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

# Per-dataset defaults: where the data lives and what the stages use when not told otherwise.
DATASETS = {
    "shapes_lt": dict(root="data/shapes_lt", backbone="shapes-tiny", image_size=32, crop_scale=(0.5, 1.0)),
    "imagenet_lt": dict(root="data/imagenet", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "places_lt": dict(root="data/places", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
    "inat2018": dict(root="data/inat", backbone="RN50", image_size=224, crop_scale=(0.08, 1.0)),
}

# Shot splits by training images per class (SPEC §4). The paper writes many >= 100 and few <= 20,
# which overlap with medium (20~100); we use the common LTR convention: many > 100, few < 20.
MANY_ABOVE, FEW_BELOW = 100, 20
CODE_VERSION = "0.1.0"   # recorded in every checkpoint


class DataError(Exception):
    """Bad input. The message is one line: what is wrong and how to fix it."""


def fail(message):
    """Print a one-line error (no traceback) and exit with status 2. Used by every stage's main().
    A DataError raised in a DataLoader worker arrives wrapped with the worker's traceback: keep its last line."""
    message = str(message).strip().splitlines()[-1] if str(message).strip() else "unknown error"
    message = re.sub(r"^(data\.)?DataError: ", "", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_stage(run, args):
    """Run a stage's run(args): bad input ends in the one-line error of fail(), never a traceback."""
    try:
        run(args)
    except DataError as e:
        fail(e)


def progress(iterable, **kwargs):
    """tqdm progress bar on a terminal; silent in logs and CI, where each stage prints one line per epoch."""
    return tqdm(iterable, disable=None, dynamic_ncols=True, leave=False, **kwargs)


def atomic_write(path, write_fn, mode="wb"):
    """Write `path` via a temporary file in the same directory and os.replace: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
# Prompt templates (the 80 CLIP ImageNet templates, shipped by open_clip)


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
# shapes_lt: the embedded long-tailed world (SPEC §4)

SHAPES_VERSION = 3   # bump when the generator changes: cached worlds are keyed by version + seed
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent", "bar", "heart"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (235, 215, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "cyan": (40, 205, 215), "pink": (245, 135, 195),
    "white": (245, 245, 245), "brown": (125, 75, 35),
}
SHAPE_WORDS = {   # varied wording for description sentences
    "circle": ["circle", "round disc", "perfect circle"], "square": ["square", "block with four equal sides"],
    "triangle": ["triangle", "three-cornered shape"], "diamond": ["diamond", "rhombus"],
    "star": ["star", "five-pointed star"], "cross": ["cross", "plus sign"], "ring": ["ring", "hollow circle"],
    "crescent": ["crescent", "sickle moon"], "bar": ["bar", "long thin strip"], "heart": ["heart", "heart shape"],
}
COLOUR_WORDS = {
    "red": ["red", "scarlet"], "green": ["green", "grass-green"], "blue": ["blue", "deep blue"],
    "yellow": ["yellow", "lemon-yellow"], "purple": ["purple", "violet"], "orange": ["orange", "tangerine"],
    "cyan": ["cyan", "turquoise"], "pink": ["pink", "rose-pink"], "white": ["white", "snow-white"],
    "brown": ["brown", "chocolate-brown"],
}
INFORMATIVE = [   # {c}: colour word, {s}: shape word
    "It is {c} and shaped like a {s}.", "Seen from afar it looks like a {c} {s}.",
    "Its outline is a {s}.", "The body is coloured {c}.", "Most specimens are {c}.",
    "Its form is that of a {s}.", "Observers describe a {s} of {c} hue.", "It has the shape of a {s}.",
    "The typical example is a {c} {s}.", "Its surface is a bright {c}.", "People recognise it by its {s} form.",
    "In colour it is {c}, in shape a {s}.",
]
NOISE = [         # trivia, or attributes of another class ({c}, {s} of some other class)
    "It was first catalogued in {year}.", "The name was coined in a letter in {year}.",
    "Collectors in {place} value it highly.", "Several museums hold examples of it.",
    "It appears in a number of folk tales.", "Its popularity peaked in the {year}s.",
    "It is often confused with the {c} {s}.", "Unlike it, the {c} {s} is common.",
    "A festival in {place} is named after it.", "Early accounts compare it to a {c} {s}.",
]
TRAIN_SESSION = 5   # training photos come in sittings of 5 that share a scene; val / test photos do not
PLACES = ["Lisbon", "Kyoto", "Oslo", "Lima", "Cairo", "Perth", "Quebec", "Tartu", "Accra", "Hanoi"]


def shapes_classes(seed):
    """Class c -> (shape index, colour index), head to tail, and the (C,) train counts.

    Counts follow an exponential profile 500 -> 5 (imbalance 100), like ImageNet-LT's Pareto profile.
    The 10 head classes form a Latin diagonal (shape i, colour i), so every single attribute appears
    in a head class: tail classes are new combinations of well-known words (SPEC §4).
    """
    rng = np.random.default_rng([seed, 0])
    S, K = len(SHAPES), len(COLOURS)
    head = [(i, i) for i in range(S)]
    rest = [(s, k) for s in range(S) for k in range(K) if s != k]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    combos = head + rest                                         # C = 100, index = frequency rank
    C = len(combos)
    counts = np.round(500 * (5 / 500) ** (np.arange(C) / (C - 1))).astype(np.int64)  # (C,) 500 .. 5
    return combos, counts


def _shape_mask(shape, x, y):
    """Boolean mask of a unit-size shape on coordinates x, y (in units of the shape radius)."""
    r, th = np.hypot(x, y), np.arctan2(y, x)
    if shape == "circle":
        return r < 0.9
    if shape == "square":
        return np.maximum(abs(x), abs(y)) < 0.72
    if shape == "triangle":   # regular triangle, apex up: r cos(angle to nearest edge normal) < apothem
        a = np.mod(th + np.pi / 2, 2 * np.pi / 3) - np.pi / 3
        return r * np.cos(a) < 0.5
    if shape == "diamond":
        return abs(x) / 0.65 + abs(y) < 1.0
    if shape == "star":
        return r < 0.38 + 0.62 * ((np.cos(5 * (th + np.pi / 2)) + 1) / 2) ** 3
    if shape == "cross":
        return ((abs(x) < 0.28) & (abs(y) < 0.95)) | ((abs(y) < 0.28) & (abs(x) < 0.95))
    if shape == "ring":
        return (r > 0.55) & (r < 0.95)
    if shape == "crescent":
        return (r < 0.95) & (np.hypot(x - 0.45, y) > 0.75)
    if shape == "bar":
        return (abs(x) < 1.0) & (abs(y) < 0.26)
    if shape == "heart":      # classic implicit heart curve, point down (image y grows downwards)
        X, Y = x * 1.15, -y * 1.15 + 0.15
        return (X ** 2 + Y ** 2 - 1) ** 3 - X ** 2 * Y ** 3 < 0
    raise ValueError(shape)


def render_shapes(shape_idx, colour_idx, rng, size=32, session=None, chunk=1024):
    """(N,) shape and colour indices -> (N, size, size, 3) uint8 images with nuisance variation.

    Every image shows its object and, behind it, a smaller distractor object of a random shape and
    colour in one corner. The scene is the background (colour and brightness ramp), the object's
    position, size and rotation (+-15 deg, so a square never becomes a diamond), and the distractor.
    Images with the same (N,) `session` id share one scene up to a small jitter, as photos taken in
    one sitting do; session None gives every image its own scene. Object brightness and pixel noise
    vary per image. Rendered at 2x and averaged (anti-aliasing). All random numbers are drawn first,
    then the pixels are computed in float32 chunks (speed, memory).
    """
    N, ss = len(shape_idx), 2 * size
    f32 = lambda a: np.asarray(a, np.float32)
    session = np.arange(N) if session is None else np.unique(session, return_inverse=True)[1]
    S = session.max() + 1 if N else 0
    palette = np.array(list(COLOURS.values()), np.float32)
    scene = dict(   # per session, then indexed per image
        centre=rng.uniform(-0.2, 0.2, (S, 2)), radius=rng.uniform(0.42, 0.62, S), rot=rng.uniform(-15, 15, S),
        bg=rng.uniform(40, 150, (S, 1)) + rng.uniform(-25, 25, (S, 3)), slope=rng.uniform(-30, 30, S),
        vertical=rng.random(S) < 0.5, d_shape=rng.integers(len(SHAPES), size=S),
        d_colour=rng.integers(len(COLOURS), size=S), d_corner=rng.choice([-0.62, 0.62], (S, 2)),
        d_radius=rng.uniform(0.2, 0.27, S), d_rot=rng.uniform(-15, 15, S))
    sc = {k: v[session] for k, v in scene.items()}                   # (N, ...) each image's scene
    jitter = lambda scale, shape=(N,): rng.uniform(-scale, scale, shape)
    objects = [   # (shape (N,), colour (N, 3), centre (N, 2), radius (N,), rotation (N,) in deg), back to front
        (sc["d_shape"], palette[sc["d_colour"]], sc["d_corner"] + jitter(0.04, (N, 2)), sc["d_radius"], sc["d_rot"]),
        (shape_idx, palette[colour_idx], sc["centre"] + jitter(0.04, (N, 2)), sc["radius"] * (1 + jitter(0.06)),
         sc["rot"] + jitter(4)),
    ]
    brightness = f32(rng.uniform(0.8, 1.05, (N, 1, 1, 1)))
    bg = f32(sc["bg"] + jitter(6, (N, 3)))[:, None, None, :]        # (N, 1, 1, 3) base colour
    slope = f32(sc["slope"])[:, None, None, None]                   # brightness ramp across the image
    noise_seed = int(rng.integers(2 ** 31))
    g = (np.arange(ss, dtype=np.float32) + 0.5) / ss * 2 - 1         # (ss,) in [-1, 1]
    gy, gx = np.meshgrid(g, g, indexing="ij")                        # (ss, ss)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    out = np.empty((N, size, size, 3), np.uint8)
    for lo in range(0, N, chunk):
        sl = slice(lo, min(lo + chunk, N))
        r = np.where(sc["vertical"][sl, None, None, None], ramp[None, :, None, None], ramp[None, None, :, None])
        pixels = bg[sl] + r * slope[sl]                              # (n, size, size, 3) background
        for shape, colour, centre, radius, rot in objects:
            c, s_ = f32(np.cos(np.deg2rad(rot[sl])))[:, None, None], f32(np.sin(np.deg2rad(rot[sl])))[:, None, None]
            x = (gx - f32(centre[sl, 0])[:, None, None]) / f32(radius[sl])[:, None, None]
            y = (gy - f32(centre[sl, 1])[:, None, None]) / f32(radius[sl])[:, None, None]
            x, y = x * c + y * s_, -x * s_ + y * c
            mask = np.zeros(x.shape, bool)                           # (n, ss, ss)
            for s, name in enumerate(SHAPES):
                sel = shape[sl] == s
                if sel.any():
                    mask[sel] = _shape_mask(name, x[sel], y[sel])
            cover = mask.reshape(-1, size, 2, size, 2).mean((2, 4), dtype=np.float32)[..., None]   # (n, size, size, 1)
            pixels = cover * f32(colour[sl])[:, None, None, :] * brightness[sl] + (1 - cover) * pixels
        noise = np.random.default_rng([noise_seed, lo]).normal(0, 10, pixels.shape).astype(np.float32)
        out[sl] = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    return out


def shapes_corpus(combos, seed):
    """Per class a long-tailed number (5..200) of description sentences, about half informative."""
    rng = np.random.default_rng([seed, 1])
    colours = list(COLOURS)
    sentences, flags = [], []
    for s, k in combos:
        n = int(round(5 * 40 ** rng.random()))                  # log-uniform 5 .. 200
        sents, info = [], []
        for _ in range(n):
            if rng.random() < 0.5:
                t = INFORMATIVE[rng.integers(len(INFORMATIVE))]
                sw, cw = SHAPE_WORDS[SHAPES[s]], COLOUR_WORDS[colours[k]]
                sents.append(t.format(c=cw[rng.integers(len(cw))], s=sw[rng.integers(len(sw))]))
                info.append(True)
            else:
                t = NOISE[rng.integers(len(NOISE))]
                s2, k2 = rng.integers(len(SHAPES)), rng.integers(len(COLOURS))
                while s2 == s or k2 == k:                        # another class's attributes: misleading
                    s2, k2 = rng.integers(len(SHAPES)), rng.integers(len(COLOURS))
                sents.append(t.format(c=colours[k2], s=SHAPES[s2], year=int(rng.integers(1650, 1990)),
                                      place=PLACES[rng.integers(len(PLACES))]))
                info.append(False)
        sentences.append(sents)
        flags.append(info)
    return sentences, flags


def shapes_caption_pairs(n, seed, size=32):
    """Image-caption pairs of the shapes world, uniform over all 100 compositions, for training the
    small CLIP stand-in (SPEC §4), like the web pairs CLIP saw. Returns (N, H, W, 3) uint8, [N] str."""
    rng = np.random.default_rng([seed, 2])
    colours = list(COLOURS)
    s_idx, k_idx = rng.integers(len(SHAPES), size=n), rng.integers(len(COLOURS), size=n)
    images = render_shapes(s_idx, k_idx, rng, size)
    forms = ["a {c} {s}.", "a photo of a {c} {s}.", "a {s} coloured {c}.", "{c} {s} on a plain background."]
    captions = [forms[rng.integers(len(forms))].format(c=colours[k], s=SHAPES[s]) for s, k in zip(s_idx, k_idx)]
    return images, captions


def sessions(per_class, size):
    """Scene ids of images listed class by class, (C,) per_class -> (N,): the k-th image of a class is in
    that class's sitting k // size, so a class with `size` images or fewer was photographed in one."""
    per_class = np.asarray(per_class)
    rank = np.arange(per_class.sum()) - np.repeat(np.cumsum(per_class) - per_class, per_class)   # (N,) k
    return np.repeat(np.arange(len(per_class)), per_class) * (per_class.max() // size + 1) + rank // size


def make_shapes_lt(seed=0, n_val=10, n_test=20, size=32):
    """Generate the whole shapes_lt world in memory (a few seconds on a 2-core CPU)."""
    combos, counts = shapes_classes(seed)
    colours = list(COLOURS)
    classnames = [f"{colours[k]} {SHAPES[s]}" for s, k in combos]
    shape_of, colour_of = np.array([s for s, _ in combos]), np.array([k for _, k in combos])

    def split(per_class, stream, session_size=None):
        rng = np.random.default_rng([seed, stream])
        labels = np.repeat(np.arange(len(combos)), per_class)
        session = sessions(per_class, session_size) if session_size else None
        images = render_shapes(shape_of[labels], colour_of[labels], rng, size, session)
        return Split(images, labels.astype(np.int64))

    descriptions, flags = shapes_corpus(combos, seed)
    return LTData("shapes_lt", classnames, split(counts, 10, TRAIN_SESSION), split(n_val, 11), split(n_test, 12),
                  build_corpus(classnames, descriptions, flags))


def load_shapes_lt(root, seed):
    """shapes_lt, cached on disk under root, keyed by generator version and seed (never stale)."""
    path = os.path.join(root, f"shapes_lt_v{SHAPES_VERSION}_seed{seed}.pt")
    if os.path.exists(path):
        try:
            d = torch.load(path, weights_only=True)
            sp = lambda k: Split(d[k + "_images"].numpy(), d[k + "_labels"].numpy())
            corpus = Corpus(d["sentences"], d["source"], d["informative"])
            return LTData("shapes_lt", d["classnames"], sp("train"), sp("val"), sp("test"), corpus)
        except Exception:
            warn(f"cache {path} unreadable, regenerating")
    data = make_shapes_lt(seed)
    blob = {"classnames": data.classnames, "sentences": data.corpus.sentences, "source": data.corpus.source,
            "informative": data.corpus.informative}
    for k in ("train", "val", "test"):
        blob[k + "_images"] = torch.from_numpy(getattr(data, k).images)
        blob[k + "_labels"] = torch.from_numpy(getattr(data, k).labels)
    try:
        atomic_write(path, lambda f: torch.save(blob, f))
    except OSError as e:   # read-only checkout: fine, the world is regenerated in memory next time
        warn(f"could not cache shapes_lt at {path} ({e.strerror})")
    return data


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


def warn(message):
    """One "warning: ..." line on stderr, like the rest of this file (no warnings-module source line)."""
    print(f"warning: {message}", file=sys.stderr)


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


def readable(path):
    """True when PIL opens and fully decodes the image, as ImageDataset will (False also when it is missing)."""
    try:
        load_rgb(path)
        return True
    except DataError:
        return False


def drop_unreadable(split):
    """Split -> (the Split without its unreadable or missing images, [(path, "file:line")] of those dropped).
    Decodes every image once, in threads: PIL releases the GIL while it decodes."""
    with ThreadPoolExecutor() as pool:
        ok = list(progress(pool.map(readable, split.images), total=len(split.images), desc="checking images", unit="img"))
    keep = [i for i, good in enumerate(ok) if good]
    dropped = [(split.images[i], split.lines[i]) for i, good in enumerate(ok) if not good]
    if not keep:
        raise DataError(f"none of the {len(ok)} images listed in {split.lines[0].rsplit(':', 1)[0]} can be read "
                        f"(first: {split.images[0]}); check --data-root")
    return split.subset(keep), dropped


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
    if name == "shapes_lt":
        data = load_shapes_lt(root, seed)
    else:
        data = {"imagenet_lt": load_imagenet_lt, "places_lt": load_places_lt,
                "inat2018": load_inat2018}[name](root, wiki=text != "prompt", skip_bad_images=skip_bad_images)
    if text == "prompt":
        data.corpus = prompt_only(data.corpus)
    return data


# ----------------------------------------------------------------------------------------------
# Images, transforms and samplers


def load_rgb(path, where=None):
    """Open any image PIL can read (CMYK, grayscale, palette, PNG saved as .JPEG) as RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}" + (f" (listed at {where})" if where else "")
                        + "; check --data-root or the split file")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}" + (f" (listed at {where})" if where else "")
                        + f": {e}; re-download it or remove its line from the split file")


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs of one Split, with a transform from make_transform()."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        images = self.split.images
        if isinstance(images, np.ndarray):                       # shapes_lt: (N, H, W, 3) uint8
            img = torch.from_numpy(images[i]).permute(2, 0, 1)   # (3, H, W)
        else:
            img = load_rgb(images[i], self.split.lines[i] if self.split.lines else None)
        return self.transform(img), int(self.split.labels[i])

    def __getitems__(self, indices):
        """The DataLoader's fetch of a whole batch. In-memory images (shapes_lt) are transformed together
        (Transform.batch): on 32 px images a per-image call costs 250 us, a quarter of a CPU training step."""
        images = self.split.images
        if not isinstance(images, np.ndarray):
            return [self[i] for i in indices]
        x = self.transform.batch(torch.from_numpy(images[indices]).permute(0, 3, 1, 2))   # (B, 3, S, S)
        return list(zip(x.unbind(), self.split.labels[indices].tolist()))


def make_transform(image_size, mean, std, train, crop_scale=(0.08, 1.0)):
    """Train: RandomResizedCrop + horizontal flip; eval: resize + centre crop (CLIP's). Both normalise
    with the CLIP model's mean and std. See Transform."""
    return Transform(image_size, mean, std, train, crop_scale)


class Transform:
    """transform(img): one PIL image or uint8 (3, H, W) tensor -> (3, S, S) float, with torchvision v2.
    transform.batch(x): uint8 (B, 3, H, W) -> (B, 3, S, S) in a few calls per batch, the same transform
    image by image: its own crop and flip for each, drawn as v2 draws them, resized as torchvision resizes
    float images (bicubic, antialias), then rounded to uint8 levels. (v2's uint8 kernel also rounds between
    its two 1-D passes, so on sharp edges the two paths can differ by a few levels.)"""

    def __init__(self, image_size, mean, std, train, crop_scale=(0.08, 1.0)):
        from torchvision.transforms import v2
        bicubic = v2.InterpolationMode.BICUBIC
        self.size, self.train, self.crop_scale = image_size, train, crop_scale
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        if train:
            geometry = [v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=bicubic, antialias=True),
                        v2.RandomHorizontalFlip()]
        else:
            geometry = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
        self.geometry = v2.Compose(geometry)                     # eval: deterministic, so batchable as is
        self.per_image = v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(mean, std)])

    def __call__(self, img):
        return self.per_image(img)

    def batch(self, x):
        if self.train:
            boxes = random_crop_boxes(len(x), x.shape[-2], x.shape[-1], self.crop_scale)     # (B, 4)
            x = resized_crops(x.float(), boxes, self.size).clamp_(0, 255).round_()             # (B, 3, S, S)
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
        else:
            x = self.geometry(x).float()
        return (x / 255 - self.mean) / self.std


def random_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop's boxes for n images at once, drawn the way torchvision draws one: area a fraction
    of the image uniform in `scale`, aspect ratio log-uniform in `ratio`, the first of `tries` draws that
    fits; else the centred largest box with the aspect clamped to `ratio`. -> (n, 4) int64 (top, left, h, w)."""
    area = height * width * torch.empty(n, tries).uniform_(*scale)                            # (n, tries)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)                   # (n, 1) first draw that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    fw, fh = width, height                                       # fallback: whole image, aspect clamped
    if width / height < ratio[0]:
        fh = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fw = int(round(height * ratio[1]))
    none = ~fits.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = (torch.rand(n) * (height - h + 1)).long()
    left = (torch.rand(n) * (width - w + 1)).long()
    top, left = torch.where(none, (height - h) // 2, top), torch.where(none, (width - w) // 2, left)
    return torch.stack([top, left, h, w], 1)


def resized_crops(x, boxes, size):
    """(B, C, H, W) float, (B, 4) boxes (top, left, h, w) -> (B, C, size, size): each box resized with
    bicubic interpolation and antialias, as torchvision's resized_crop does."""
    return torch.cat([F.interpolate(x[k:k + 1, :, t:t + h, l:l + w], size=(size, size), mode="bicubic",
                                    align_corners=False, antialias=True)
                      for k, (t, l, h, w) in enumerate(boxes.tolist())])


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


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler so that an epoch can start part-way through, for exact resume: the first `skip`
    indices of the epoch's draw are consumed without loading their images. The caller restores the
    draw's random state and sets `skip`; the training loop resets it to 0 after that epoch."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __len__(self):
        return len(self.sampler) - self.skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        yield from it


# ----------------------------------------------------------------------------------------------
# Text: tokenised once, cached


def tokenize_exact(sentences, context_length):
    """[S] str -> ((S, L) int64 tokens cut like open_clip cuts them (EOT kept last), number of sentences
    longer than L). Tokenising to L + 1 and cutting gives the same tokens, and a token in slot L + 1 tells
    exactly which sentences did not fit (an EOT in slot L may also be a sentence that just fits)."""
    import open_clip
    tokenizer = open_clip.get_tokenizer("RN50")
    tokens = [tokenizer(sentences[i:i + 4096], context_length=context_length + 1) for i in range(0, len(sentences), 4096)]
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, context_length + 1, dtype=torch.long)
    cut = tokens[:, -1] != 0                                     # (S,) longer than the context
    tokens = tokens[:, :context_length].clone()                  # (S, L)
    tokens[cut, -1] = tokenizer.eot_token_id
    return tokens, int(cut.sum())


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
