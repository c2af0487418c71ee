"""The user's own data on disk, read into Splits: an ImageFolder tree (train/<class>/*, val/<class>/*, optional
test/<class>/*, class names and descriptions) and torchvision's CIFAR-100 files, for --data folder and
--data cifar100_lt (docs/own_data.md).

    folders, classnames, train, val, test = read_image_folder(root)
    descriptions = read_named_descriptions(os.path.join(root, "descriptions"), folders)
    names, train, test = read_cifar100(root)                      # cifar-100-python/{train,test,meta}

data.py turns them into an LTData, as the paper's datasets' (readers.py). Every problem with a file is one
DataError naming the file.
"""
import os
import pickle

import numpy as np

from util.errors import DataError, warn
from util.readers import Split, check_root, read_description_file


# ----------------------------------------------------------------------------------------------
# The user's own data: an ImageFolder tree, train/<class>/*, val/<class>/*, optional test/<class>/*

# Files PIL reads without extra libraries, matched case-insensitively; anything else in a class folder is
# an error, so that a stray notes.txt or .heic photo is named now, not when the loader reaches it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico")
FOLDER_LAYOUT = "train/<class>/*, val/<class>/*, optional test/<class>/*, classnames.txt and descriptions/<class>.txt"


def visible(names):
    """Sorted names without the hidden ones (.DS_Store, .ipynb_checkpoints): the same order on every machine."""
    return sorted(n for n in names if not n.startswith("."))


def class_folders(split_dir):
    """The class folders of train/, val/ or test/, sorted as torchvision's ImageFolder sorts them (so class
    indices agree with it). A file beside them is an error: images go one level down, in their class's folder."""
    folders = []
    for name in visible(os.listdir(split_dir)):
        path = os.path.join(split_dir, name)
        if not os.path.isdir(path):
            raise DataError(f"{path} is a file; images go in {split_dir}/<class>/, one folder per class")
        folders.append(name)
    if not folders:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    return folders


def class_images(folder):
    """Every image file under one class folder, sub-folders included (as ImageFolder), sorted folder by folder.
    A file that is not an image by its extension, or a folder without any image, is an error."""
    images = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = visible(dirnames)                          # os.walk visits them in this order
        for name in visible(filenames):
            path = os.path.join(dirpath, name)
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                raise DataError(f"{path} is not an image file by its extension (expected one of "
                                f"{' '.join(IMAGE_EXTENSIONS)}); convert it or move it out of the tree")
            images.append(path)
    if not images:
        raise DataError(f"class folder {folder} holds no images; add some or remove the folder")
    return images


def read_folder_split(root, split, folders):
    """<root>/<split>/<class>/* -> Split, the classes being `folders` (train's, in order): each must have a folder
    here, and every folder here must be one of them."""
    split_dir = os.path.join(root, split)
    found = class_folders(split_dir)
    missing = [f for f in folders if f not in found]
    if missing:
        raise DataError(f"{split_dir} has no folder for class {missing[0]!r} (train/{missing[0]}); "
                        f"every class needs {split} images: add {split}/{missing[0]}/")
    extra = [f for f in found if f not in folders]
    if extra:
        raise DataError(f"{split_dir}/{extra[0]} is a class without training images (no train/{extra[0]}); "
                        "add train images or remove the folder")
    images, labels = [], []
    for c, folder in enumerate(folders):
        files = class_images(os.path.join(split_dir, folder))
        images += files
        labels += [c] * len(files)
    return Split(images, np.array(labels, dtype=np.int64))


def read_classnames(path, folders):
    """classnames.txt: one class name a line, in the folders' sorted order (blank lines skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(folders):
        raise DataError(f"{path} names {len(names)} classes but train/ has {len(folders)} class folders; write one "
                        f"name a line, in the folders' sorted order ({', '.join(folders[:3])}, ...)")
    return names


def read_image_folder(root):
    """An ImageFolder tree -> (folders, classnames, train, val, test): [C] class folder names, sorted; [C] class
    names, from classnames.txt if present, else the folder names with underscores as spaces; three Splits
    (test = val, the same Split, when there is no test/ folder, with one warning)."""
    check_root(root, FOLDER_LAYOUT)
    if not os.path.isdir(os.path.join(root, "train")):
        raise DataError(f"{root} has no train/ folder; expected {FOLDER_LAYOUT}")
    folders = class_folders(os.path.join(root, "train"))
    names_file = os.path.join(root, "classnames.txt")
    if os.path.isfile(names_file):
        classnames = read_classnames(names_file, folders)
    else:
        classnames = [f.replace("_", " ") for f in folders]
    train = read_folder_split(root, "train", folders)
    if not os.path.isdir(os.path.join(root, "val")):
        raise DataError(f"{root} has no val/ folder; expected {FOLDER_LAYOUT}")
    val = read_folder_split(root, "val", folders)
    if os.path.isdir(os.path.join(root, "test")):
        test = read_folder_split(root, "test", folders)
    else:
        warn(f"no test/ folder under {root}: val/ is the test split as well")
        test = val
    return folders, classnames, train, val, test


def read_named_descriptions(folder, keys):
    """[C][k] description sentences from <folder>/<key>.txt, one file per class (keys: class folder names, or
    CIFAR's class names), parsed as the wiki files are. No folder: [] for every class (the prompt templates
    only), one warning; a class without its file, or a file that names no class, one warning each."""
    if not os.path.isdir(folder):
        warn(f"no {folder} folder: using the 80 prompt templates only (add {os.path.basename(folder)}/<class>.txt "
             "files for class descriptions)")
        return [[] for _ in keys]
    files = set(visible(os.listdir(folder)))
    descriptions = [read_description_file(os.path.join(folder, f"{k}.txt")) if f"{k}.txt" in files else []
                    for k in keys]
    missing = sum(f"{k}.txt" not in files for k in keys)
    if missing:
        warn(f"{missing} of {len(keys)} classes have no {folder}/<class>.txt: they use the prompt templates only")
    stray = sorted(files - {f"{k}.txt" for k in keys})
    if stray:
        warn(f"{len(stray)} files in {folder} name no class (first: {stray[0]}); they are not read")
    return descriptions


# ----------------------------------------------------------------------------------------------
# CIFAR-100, torchvision's python version: <root>/cifar-100-python/{train,test,meta}, pickled dicts

CIFAR_FOLDER = "cifar-100-python"
# What CIFAR-100's pickles hold besides dicts, lists and strings: numpy arrays (written by Python 2's numpy,
# whose module was numpy.core, or re-saved by numpy 2's numpy._core, protocol 5 as a buffer). Nothing else is
# unpickled: a pickle can run any code it names, and these files come from the web.
CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
                        ("_codecs", "encode")}


class ArrayUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds numpy arrays and plain Python objects only (the Python docs' "restricting globals")."""

    def find_class(self, module, name):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR file")
        return super().find_class(module, name)


def read_cifar_pickle(path, keys):
    """One CIFAR file -> its dict, with str keys, holding at least `keys`. latin1, as torchvision reads them: the
    files were pickled by Python 2; a copy re-pickled after loading with encoding="bytes" has bytes keys."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; put CIFAR-100's python version there (cifar-100-python.tar.gz, "
                        "extracted; torchvision's CIFAR100(root, download=True) makes this folder)")
    try:
        with open(path, "rb") as f:
            d = ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:                                       # truncated, not a pickle, or a foreign object
        raise DataError(f"{path} is not a CIFAR-100 python file ({type(e).__name__}: {e}); re-download it")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()} if isinstance(d, dict) else {}
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(f"{path} has no {missing[0]!r} entry; expected CIFAR-100's python version "
                        f"(a dict with {', '.join(repr(k) for k in keys)})")
    return d


def read_cifar_split(path, num_classes):
    """A CIFAR-100 train or test file -> Split of uint8 (N, 32, 32, 3) images in file order, labels its fine labels."""
    d = read_cifar_pickle(path, ("data", "fine_labels"))
    data, labels = np.asarray(d["data"]), np.asarray(d["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape} for {len(labels)} labels; expected uint8 "
                        "(N, 3072), one row per label (CIFAR's 3 x 32 x 32 planes); re-download it")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: fine label {labels.max() if labels.max() >= num_classes else labels.min()} out of "
                        f"range (meta names {num_classes} classes); use the meta file that came with it")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))      # (N, 32, 32, 3) RGB
    return Split(images, labels)


def read_cifar100(root):
    """torchvision's CIFAR-100 files under <root>/cifar-100-python (or root itself) -> (names, train, test):
    [100] fine class names as the meta file writes them ("aquarium_fish"), 50,000 train and 10,000 test images."""
    check_root(root, f"{CIFAR_FOLDER}/{{train,test,meta}} (CIFAR-100, python version) and optional descriptions/")
    folder = os.path.join(root, CIFAR_FOLDER)
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root, "meta")):
        folder = root                                            # --data-root pointed at cifar-100-python itself
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n)
             for n in read_cifar_pickle(os.path.join(folder, "meta"), ("fine_label_names",))["fine_label_names"]]
    train = read_cifar_split(os.path.join(folder, "train"), len(names))
    test = read_cifar_split(os.path.join(folder, "test"), len(names))
    return names, train, test


# ----------------------------------------------------------------------------------------------
# What data.load_data makes an LTData of


def image_folder(root, descriptions=True):
    """--data folder: the user's ImageFolder tree -> (classnames, train, val, test, [C][k] description sentences),
    the descriptions from <root>/descriptions/<class folder>.txt when descriptions is True (data.make_lt_data
    makes the LTData)."""
    if root is None:
        raise DataError("--data folder needs --data-root PATH, a folder holding train/<class>/* and val/<class>/*")
    folders, classnames, train, val, test = read_image_folder(root)
    text = (read_named_descriptions(os.path.join(root, "descriptions"), folders) if descriptions
            else [[] for _ in folders])
    return classnames, train, val, test, text


# CIFAR-100-LT, as the long-tailed literature builds it (Cui et al. 2019; Cao et al. 2019's LDAM-DRW code,
# which LIFT and BALLAD reuse): class i keeps n_i = int(n_max * (1 / imbalance) ** (i / 99)) training images,
# n_max = 500; the balanced test set (100 a class) is the test split and, there being no other, the val split.


def long_tailed_counts(n_max, num_classes, imbalance):
    """[C] training images per class, falling exponentially from n_max to n_max / imbalance; int() rounds down, as
    the literature's code does (CIFAR-100, n_max 500: 10,847 images at imbalance 100, 12,608 at 50, 19,573 at 10)."""
    return [int(n_max * (1 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def long_tailed_subset(split, counts, seed=0):
    """Class c keeps counts[c] of its images: the first ones of its indices shuffled by one RandomState(seed),
    class after class. That is LDAM-DRW's draw (np.random.seed(0), then np.random.shuffle per class) without
    touching numpy's global state, so the subset is the literature's, image for image. seed 0, LDAM-DRW's
    rand_number, not --seed: every run, the same images."""
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        index = np.flatnonzero(split.labels == c)                # this class's images, in file order
        rng.shuffle(index)
        keep.append(index[:n])
    return split.subset(np.concatenate(keep))


def cifar100_lt(root, imbalance, descriptions=True):
    """CIFAR-100-LT with the given imbalance factor from torchvision's CIFAR-100 files (read_cifar100) -> (classnames,
    train, val, test, [C][k] description sentences): class names from the meta file, underscores as spaces;
    descriptions from <root>/descriptions/<meta name>.txt (aquarium_fish.txt) when descriptions is True; the test
    split is the val split too. Images stay in memory, uint8 (N, 32, 32, 3), as shapes_lt's."""
    names, train, test = read_cifar100(root)
    n_max = int(np.bincount(train.labels, minlength=len(names)).min())   # 500 in CIFAR-100's training file
    train = long_tailed_subset(train, long_tailed_counts(n_max, len(names), imbalance))
    classnames = [n.replace("_", " ") for n in names]
    text = read_named_descriptions(os.path.join(root, "descriptions"), names) if descriptions else [[] for _ in names]
    return classnames, train, test, test, text
