"""The generated dataset tree of a cost rehearsal (tools/rehearse.py): a dataset's official layout (docs/design.md §4) at its
real size, written once. Split files or iNat's COCO-style json, labels.txt / categories.json, train counts from n_max
to n_min with the real total and many / medium / few class counts, balanced val / test, and wiki/desc_<index>.txt
with Table 7's sentences per class, as paragraphs under "== Section ==" headers plus sections parse_wiki must drop.
Pixels do not matter for a cost rehearsal: every image is a hard link (a copy where links fail) to one of a few
thousand tiny JPEGs (32-48 px), which stay in the page cache: loader times are a lower bound of real photos'.
"""
import json
import os
import re
import shutil
import statistics
import time

import numpy as np
from PIL import Image

TREE_VERSION = 2
# Real sizes (Liu et al. 2019; iNat 2018), the real many (> 100) / medium / few (< 20) class counts, and the
# paper's Table 7 description sentences per class: (min, max, mean, median). iNat's val is its test set.
SIZES = {
    "imagenet_lt": dict(classes=1000, train=115846, n_max=1280, n_min=5, shots=(385, 479, 136), val=20, test=50,
                        sentences=(1, 721, 127, 89)),
    "places_lt": dict(classes=365, train=62500, n_max=4980, n_min=5, shots=(131, 163, 71), val=20, test=100,
                      sentences=(2, 610, 116, 77)),
    "inat2018": dict(classes=8142, train=437513, n_max=1000, n_min=2, shots=(842, 4076, 3224), val=3, test=0,
                     sentences=(1, 1774, 33, 17)),
}
SECTIONS = ("Description", "Distribution", "History", "Ecology", "Uses", "Taxonomy", "In culture")
INAT_GROUPS = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia", "Mollusca")



# ----------------------------------------------------------------------------------------------
# The tree: counts, names, descriptions, images


def train_counts(C, total, n_max, n_min, shots):
    """(C,) training images per class, head to tail, summing to `total`. Log-linear from 99 to 21 over the
    medium classes and from 19 to n_min over the few (real class counts per split, scaled to C); no class has
    exactly 100 or 20 images, so the > 100 / < 20 and >= 100 / <= 20 rules give the same split; over the many,
    log n = log 101 + log(n_max / 101) t^p from n_max to 101, its bend p found by bisection. With a handful
    of classes n_max is lowered until the total can be reached."""
    many, medium = (max(1, round(s * C / sum(shots))) for s in shots[:2])
    i = np.arange(C)
    t_med, t_few = (i - many) / medium, (i - many - medium + 1) / max(C - many - medium, 1)
    tail = np.exp(np.where(i < many + medium, np.log(99) + np.log(21 / 99) * t_med,
                           np.log(19) + np.log(n_min / 19) * t_few)).round()
    n_max = min(n_max, (total - tail[many:].sum() - 101 * (many - 1)) // 2)

    def counts(p):
        head = np.log(101) + np.log(n_max / 101) * ((many - i) / many).clip(0) ** p
        return np.where(i < many, np.exp(head).round(), tail).astype(np.int64)
    lo, hi = 1e-3, 1e3                                           # the sum falls as p grows
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if counts(mid).sum() > total else (lo, mid)
    n, diff = counts(hi), int(total - counts(hi).sum())         # rounding leftovers: +-1 on the head after class 0
    np.add.at(n, 1 + np.arange(abs(diff)) % max(many - 1, 1), np.sign(diff))
    return np.sort(n)[::-1].copy()


def sentence_counts(C, m_min, m_max, m_mean, m_med, rng):
    """(C,) description sentences per class (Table 7): log-normal quantiles with the paper's median and mean
    (sigma = sqrt(2 ln(mean / median))), clipped to [min, max], the extremes set to min and max, shuffled."""
    sigma = (2 * np.log(m_mean / m_med)) ** 0.5
    z = [statistics.NormalDist().inv_cdf((c + 0.5) / C) for c in range(C)]
    m = np.round(m_med * np.exp(sigma * np.array(z))).clip(m_min, m_max).astype(np.int64)
    m[0], m[-1] = m_min, m_max
    return rng.permutation(m)


def wiki_text(n, words, rng):
    """A class's description file as parse_wiki reads it, with exactly n description sentences of 12-24 words
    (about 27 tokens with [SOS] and [EOS]: Table 7's L_avg is 26-29): one paragraph (1-6 sentences) per line,
    now and then under a "== Section ==" header, and at the end "See also" and "References" (a "=== Notes ==="
    below it), whose lines must all be dropped."""
    sentences = [" ".join(words[rng.integers(len(words), size=int(rng.integers(12, 25)))]).capitalize() + "."
                 for _ in range(n)]
    lines, i = [], 0
    while i < len(sentences):
        if lines and rng.random() < 0.3:
            lines.append(f"== {SECTIONS[int(rng.integers(len(SECTIONS)))]} ==")
        k = int(rng.integers(1, 7))
        lines.append(" ".join(sentences[i:i + k]))
        i += k
    lines += ["", "== See also ==", "List of related articles in the same family of pages.", "== References ==",
              "Smith, John (1999). A field guide to the classes of this data set. Oxford University Press.",
              "=== Notes ===", "The notes above were cited by several authors in the main text."]
    return "\n".join(lines) + "\n"


def class_names(data, C, words, rng):
    """The class-list entries: ImageNet wnid + open_clip's name, Places365 "/a/abbey_hall/indoor", iNat binomials."""
    if data == "imagenet_lt":
        from open_clip import IMAGENET_CLASSNAMES
        return [(f"n{1440764 + 1000 * c:08d}", IMAGENET_CLASSNAMES[c]) for c in range(C)]
    names = []
    while len(names) < C:
        a, b = words[rng.integers(len(words), size=2)]
        name = (f"/{a[0]}/{a}_{b}" + ("", "/indoor", "/outdoor")[int(rng.integers(3))] if data == "places_lt"
                else f"{a.capitalize()} {b}")
        if name not in names:
            names.append(name)
    return names


def image_lists(data, counts, names):
    """[(relative path, class)] of train, val and test, as the official files name them (ImageNet-LT's val comes
    from ImageNet's train set and its test from ImageNet's val; iNat's val lies beside its train images)."""
    s, splits = SIZES[data], {"train": [], "val": [], "test": []}
    ext = ".JPEG" if data == "imagenet_lt" else ".jpg"
    for c, n in enumerate(counts):
        own = {"imagenet_lt": f"train/{names[c][0]}/{names[c][0]}_", "places_lt": f"train{names[c]}/",
               "inat2018": f"train_val2018/{INAT_GROUPS[c % len(INAT_GROUPS)]}/{c}/"}[data]
        test = f"val/{names[c][0]}/ILSVRC2012_val_" if data == "imagenet_lt" else "val/Places365_val_"
        splits["train"] += [(f"{own}{k:08d}{ext}", c) for k in range(n)]
        splits["val"] += [(f"{own}{k:08d}{ext}", c) for k in range(n, n + s["val"])]
        splits["test"] += [(f"{test}{c * s['test'] + k:08d}{ext}", c) for k in range(s["test"])]
    return splits


def place_images(root, relpaths, n_pool, rng):
    """n_pool distinct tiny JPEGs (32-48 px, blurred random colour blocks) under root/pool, and each listed file a
    hard link to one of them (no bytes copied); copies instead once the file system refuses a link."""
    os.makedirs(os.path.join(root, "pool"))
    pool = [os.path.join(root, "pool", f"{k:05d}.jpg") for k in range(n_pool)]
    for path in pool:
        size = int(rng.integers(32, 49))
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR).save(path)
    put, folders = os.link, set()
    for i, rel in enumerate(relpaths):
        path = os.path.join(root, rel)
        if os.path.dirname(path) not in folders:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            folders.add(os.path.dirname(path))
        try:
            put(pool[i % n_pool], path)
        except OSError:
            put = shutil.copyfile
            put(pool[i % n_pool], path)


def write_text(path, text):
    """Written to a temporary file, then renamed: a cut-off run leaves the old file or none, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_tree(data, root, fraction, seed):
    """The whole tree; returns what tree.json records about it (written last: a half-written tree is no cache)."""
    t0, s, rng = time.time(), SIZES[data], np.random.default_rng(seed)
    C = max(10, round(s["classes"] * fraction))
    counts = train_counts(C, round(s["train"] * C / s["classes"]), s["n_max"], s["n_min"], s["shots"])
    from open_clip import IMAGENET_CLASSNAMES                     # words of its class names (1,217) for sentences
    words = np.array(sorted({w for n in IMAGENET_CLASSNAMES for w in re.findall(r"[a-z]+", n.lower()) if len(w) > 2}))
    names = class_names(data, C, words, rng)
    splits = image_lists(data, counts, names)
    if data == "inat2018":
        categories = [{"id": c, "name": n, "supercategory": INAT_GROUPS[c % len(INAT_GROUPS)]}
                      for c, n in enumerate(names)]
        write_text(os.path.join(root, "categories.json"), json.dumps(categories))
        ids = iter(range(10 ** 9))
        for split, name in (("train", "train2018.json"), ("val", "val2018.json")):
            rows = [(next(ids), p, c) for p, c in splits[split]]
            write_text(os.path.join(root, name), json.dumps({
                "info": {"year": 2018}, "categories": categories,
                "images": [{"id": i, "file_name": p, "width": 48, "height": 48} for i, p, _ in rows],
                "annotations": [{"id": i, "image_id": i, "category_id": c} for i, _, c in rows]}))
    else:
        prefix = "ImageNet_LT" if data == "imagenet_lt" else "Places_LT"
        for split in ("train", "val", "test"):
            write_text(os.path.join(root, f"{prefix}_{split}.txt"), "".join(f"{p} {c}\n" for p, c in splits[split]))
        write_text(os.path.join(root, "labels.txt"), "".join(
            f"{n[0]} {c} {n[1]}\n" if data == "imagenet_lt" else f"{n} {c}\n" for c, n in enumerate(names)))
    m = sentence_counts(C, *s["sentences"], rng)
    os.makedirs(os.path.join(root, "wiki"))
    for c in range(C):
        write_text(os.path.join(root, "wiki", f"desc_{c}.txt"), wiki_text(m[c], words, rng))
    listed = [p for split in splits.values() for p, _ in split]
    place_images(root, listed, min(4096, len(listed)), rng)
    import torch                                                 # random tiny CLIP weights for --clip-weights
    from util.clip_models import create_clip
    torch.manual_seed(seed)
    torch.save(create_clip("shapes-tiny", 32).state_dict(), os.path.join(root, "shapes_tiny_clip.pt"))
    test = splits["test"] or splits["val"]
    return {"data": data, "fraction": fraction, "seed": seed, "version": TREE_VERSION, "classes": C,
            "images": {k: len(v) for k, v in splits.items()}, "train_max_min": [int(counts[0]), int(counts[-1])],
            "sentences": {"min": int(m.min()), "max": int(m.max()), "mean": round(float(m.mean()), 1),
                          "median": float(np.median(m))},
            "predict_images": [os.path.join(root, test[k][0]) for k in (0, len(test) // 2, -1)],
            "seconds": round(time.time() - t0, 1)}


def disk_use(root):
    """(bytes on disk of files and folders, each hard-linked inode counted once, as du does; files) under root."""
    walk = [(folder, dirs + names, len(names)) for folder, dirs, names in os.walk(root)]
    stats = [os.lstat(os.path.join(folder, n)) for folder, entries, _ in walk for n in entries]
    return sum({(st.st_dev, st.st_ino): st.st_blocks * 512 for st in stats}.values()), sum(w[2] for w in walk)
