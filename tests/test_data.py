"""Tests for data.py: sampling, shot splits, the shapes_lt world, the real-dataset readers and their errors.

    python -m pytest -q test_data.py        # CPU, no download; the shapes_lt world is generated once

Expected values are written out by hand; real datasets are tiny trees written under tmp_path.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from anss import description_precision
from cvlp import class_wise_contrastive_loss, cosine_similarity_matrix
from util import clip_models, images, shapes_lt
from util.errors import DataError
from util.shapes_lt import COLOURS, SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)


def draw_frequencies(sampler, epochs):
    """Class frequencies of `epochs` passes of a sampler over labels [0]*400 + [1]*100 + [2]*25."""
    labels = np.repeat([0, 1, 2], [400, 100, 25])
    drawn = np.concatenate([labels[list(sampler)] for _ in range(epochs)])
    return np.bincount(drawn, minlength=3) / len(drawn)


# ----------------------------------------------------------------------------------------------
# Sampling and shot splits


def test_sqrt_sampler_draws_classes_in_proportion_to_sqrt_count():
    labels = np.repeat([0, 1, 2], [400, 100, 25])            # sqrt: 20, 10, 5 -> sum 35
    sampler = data.make_sampler(labels, "sqrt", torch.Generator().manual_seed(0))
    assert len(sampler) == 525                                # epoch length = dataset size
    freq = draw_frequencies(sampler, epochs=200)              # 105,000 draws
    # Binomial std of a frequency near 0.57 over 105,000 draws is sqrt(.57 * .43 / 105000) = 0.0015;
    # 0.01 is over 6 std, so a correct sampler never fails, and instance sampling (0.76) always does.
    np.testing.assert_allclose(freq, [20 / 35, 10 / 35, 5 / 35], atol=0.01)


def test_instance_sampler_draws_classes_in_proportion_to_count():
    labels = np.repeat([0, 1, 2], [400, 100, 25])
    sampler = data.make_sampler(labels, "instance", torch.Generator().manual_seed(0))
    # Plain shuffling: each epoch is a permutation, so the frequencies are exact.
    np.testing.assert_allclose(draw_frequencies(sampler, epochs=3), [400 / 525, 100 / 525, 25 / 525])


# ----------------------------------------------------------------------------------------------
# Transforms: in-memory images are augmented a batch at a time


def test_crop_boxes_fall_back_to_the_centred_largest_box_with_clamped_aspect():
    # scale (2, 3): no box of 2-3x the image area fits, so every image gets the fallback box. A 10 x 40
    # image is wider than 4/3: height 10, width round(10 * 4/3) = 13, centred: left (40 - 13) // 2 = 13.
    boxes = images.random_crop_boxes(5, 10, 40, scale=(2.0, 3.0))
    assert boxes.tolist() == [[0, 13, 10, 13]] * 5
    assert images.random_crop_boxes(3, 8, 8, scale=(2.0, 3.0)).tolist() == [[0, 0, 8, 8]] * 3   # square: all of it


def test_crop_boxes_stay_inside_the_image_with_area_and_aspect_in_range():
    torch.manual_seed(0)
    top, left, h, w = images.random_crop_boxes(20000, 32, 32, scale=(0.5, 1.0)).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    # Rounding w and h to whole pixels moves the area by at most (w + h) / 2 + 1/4 pixels: 33 of 1024.
    area = (h * w).float() / 1024
    assert area.min() >= 0.5 - 33 / 1024 and area.max() <= 1.0
    aspect = w.float() / h.float()                           # in [3/4, 4/3] up to the rounding of w, h
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5   # positions vary


def test_resized_crop_of_a_box_the_output_size_is_that_box():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    boxes = torch.tensor([[1, 1, 2, 2], [0, 2, 2, 2]])         # (top, left, h, w)
    out = images.resized_crops(x, boxes, 2)
    assert torch.equal(out[0], x[0, :, 1:3, 1:3]) and torch.equal(out[1], x[1, :, 0:2, 2:4])
    one_pixel = images.resized_crops(x, torch.tensor([[3, 0, 1, 1], [0, 3, 1, 1]]), 3)  # 1 px -> 3 x 3 of it
    assert torch.allclose(one_pixel[0], x[0, :, 3:4, 0:1].expand(3, 3, 3))
    assert torch.allclose(one_pixel[1], x[1, :, 0:1, 3:4].expand(3, 3, 3))


def test_batch_transform_with_full_crops_returns_each_image_or_its_mirror():
    # crop scale (1, 1) leaves one box, the whole 8 x 8 image: the only randomness left is the flip.
    t = images.make_transform(8, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), train=True, crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = t.batch(x)                                         # mean 0, std 1/255: back to 0..255
    same = ((out - x.float()).abs() < 1e-3).flatten(1).all(1)
    mirrored = ((out - x.flip(-1).float()).abs() < 1e-3).flatten(1).all(1)
    assert (same | mirrored).all() and 15 < mirrored.sum() < 49     # Binomial(64, 1/2): 32 +- 4


def test_batch_transform_matches_the_per_image_eval_transform_and_loader_uses_it():
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    split = data.Split(x, np.array([3, 1, 4, 1, 5, 9]))
    t = images.make_transform(24, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), train=False)   # resize 32 -> 24
    one_by_one = torch.stack([t(torch.from_numpy(im).permute(2, 0, 1)) for im in x])
    loader = torch.utils.data.DataLoader(images.ImageDataset(split, t), batch_size=4)
    batches = list(loader)
    assert [y.tolist() for _, y in batches] == [[3, 1, 4, 1], [5, 9]]
    torch.testing.assert_close(torch.cat([b for b, _ in batches]), one_by_one, atol=1e-5, rtol=0)


def test_shot_split_boundaries_are_the_papers_many_from_100_few_up_to_20():
    # Sec. 4.2: many-shot >= 100 images, few-shot <= 20; exactly 100 is many, exactly 20 is few.
    counts = [500, 101, 100, 99, 50, 21, 20, 19, 5]
    assert list(data.shot_split(counts)) == ["many", "many", "many", "medium", "medium", "medium", "few", "few", "few"]


# ----------------------------------------------------------------------------------------------
# shapes_lt


@pytest.fixture(scope="module")
def world():
    return data.shapes_lt_data(shapes_lt.make_world(0))     # the full world, generated once for this module


def small_world(monkeypatch, seed):
    """make_world with 2 train images per class and 1 val / test image: the same seeding code,
    a fraction of the rendering (the full world takes ~10 s on a 2-core CPU)."""
    real = shapes_lt.shapes_classes
    monkeypatch.setattr(shapes_lt, "shapes_classes", lambda s: (real(s)[0], np.full(100, 2)))
    return data.shapes_lt_data(shapes_lt.make_world(seed, n_val=1, n_test=1))


def test_shapes_lt_is_deterministic_per_seed(monkeypatch):
    a, b, c = small_world(monkeypatch, 0), small_world(monkeypatch, 0), small_world(monkeypatch, 1)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
        np.testing.assert_array_equal(getattr(a, split).labels, getattr(b, split).labels)
    assert a.classnames == b.classnames
    assert a.corpus.sentences == b.corpus.sentences and a.corpus.informative == b.corpus.informative
    assert a.classnames != c.classnames                       # another seed, another world
    assert not np.array_equal(a.train.images, c.train.images)
    assert a.corpus.sentences != c.corpus.sentences


def test_shapes_lt_counts_follow_imagenet_lt_profile(world):
    counts = world.counts
    assert len(counts) == 100 and world.num_classes == 100
    assert counts[0] == 500 and counts[-1] == 5 and counts.max() == 500 and counts.min() == 5
    assert counts.max() / counts.min() == 100                 # imbalance factor
    assert np.all(np.diff(counts) <= 0)                       # head to tail, non-increasing


def test_every_shape_and_colour_appears_in_a_many_shot_class(world):
    combos, counts = shapes_lt.shapes_classes(0)
    many = data.shot_split(counts) == "many"
    colours = list(COLOURS)
    assert {SHAPES[s] for (s, k), m in zip(combos, many) if m} == set(SHAPES)
    assert {colours[k] for (s, k), m in zip(combos, many) if m} == set(colours)
    assert world.classnames[0] == f"{colours[combos[0][1]]} {SHAPES[combos[0][0]]}"
    assert world.classnames[0] == "red circle"               # head class 0 = (shape 0, colour 0)


def test_shapes_lt_corpus_has_templates_first_and_flags(world):
    corpus = world.corpus
    for c, name in enumerate(world.classnames):
        sents, src, flags = corpus.sentences[c], corpus.source[c], corpus.informative[c]
        assert sents[0] == f"a bad photo of a {name}."       # first of the 80 CLIP templates
        assert src[:80] == ["template"] * 80 and set(src[80:]) == {"description"}
        assert len(flags) == len(sents) and all(flags[:80])  # templates count as informative
        assert 5 <= len(sents) - 80 <= 200                    # descriptions: 5 .. 200 per class


def test_sessions_group_each_class_in_sittings_of_five():
    # class 0: 7 images -> sittings 0 (5 images), 1 (2); class 1: 3 images -> one sitting. Ids are
    # class * (7 // 5 + 1) + k // 5, so no two classes share one.
    assert shapes_lt.sessions([7, 3], 5).tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert shapes_lt.sessions([2, 2], 5).tolist() == [0, 0, 1, 1]


def test_tail_train_images_share_one_scene_test_images_do_not(world):
    """A 5-image class was photographed in one sitting: its train images differ only by jitter and
    noise, far less than its test images (independent scenes) do."""
    def mean_pairwise_distance(images):                      # (n, H, W, 3) uint8 -> mean L2 over pairs
        x = images.reshape(len(images), -1).astype(np.float64)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return d[np.triu_indices(len(x), 1)].mean()
    tail = len(world.counts) - 1                              # 5 train images
    train = world.train.images[world.train.labels == tail]
    test = world.test.images[world.test.labels == tail][:5]
    assert len(train) == 5
    assert mean_pairwise_distance(train) < 0.6 * mean_pairwise_distance(test)


def test_shapes_lt_val_and_test_are_balanced(world):
    assert list(np.bincount(world.val.labels)) == [10] * 100
    assert list(np.bincount(world.test.labels)) == [20] * 100
    assert world.test.images.shape == (2000, 32, 32, 3) and world.test.images.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# shapes_lt_coined: the same world, every class called by a made-up name


def test_coined_names_are_distinct_words_the_clip_standin_never_read():
    from open_clip.tokenizer import SimpleTokenizer
    names = shapes_lt.coined_names(100, 0)
    assert names == shapes_lt.coined_names(100, 0) and names != shapes_lt.coined_names(100, 1)
    assert len(set(names)) == 100 and all(n.isalpha() and n.islower() and 4 <= len(n) <= 6 for n in names)
    words = set(COLOURS) | set(SHAPES) | {w for ws in (*shapes_lt.COLOUR_WORDS.values(), *shapes_lt.SHAPE_WORDS.values())
                                          for phrase in ws for w in phrase.replace("-", " ").split()}
    assert not [(n, w) for n in names for w in words if w in n]
    forms = ["a {c} {s}.", "a photo of a {c} {s}.", "a {s} coloured {c}.", "{c} {s} on a plain background."]
    bpe = SimpleTokenizer()                                       # the stand-in's captions, written out here
    read = {t for f in forms for c in COLOURS for s in SHAPES for t in bpe.encode(f.format(c=c, s=s))}
    assert not [n for n in names if set(bpe.encode(n)) & read]    # no BPE piece of a name was ever read


def test_coined_world_differs_from_shapes_lt_only_in_the_class_names(shapes_env):
    a = data.load_data("shapes_lt", str(shapes_env["root"]), seed=0)
    b = data.load_data("shapes_lt_coined", str(shapes_env["root"]), seed=0)
    assert b.name == "shapes_lt_coined" and b.classnames == shapes_lt.coined_names(100, 0)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
        np.testing.assert_array_equal(getattr(a, split).labels, getattr(b, split).labels)
    assert a.corpus.source == b.corpus.source and a.corpus.informative == b.corpus.informative
    for c, (old, new) in enumerate(zip(a.classnames, b.classnames)):
        assert a.corpus.sentences[c][80:] == b.corpus.sentences[c][80:]       # the same descriptions
        assert b.corpus.sentences[c][:80] == [s.replace(old, new) for s in a.corpus.sentences[c][:80]]
        assert b.corpus.sentences[c][0] == f"a bad photo of a {new}."
    where = {}                                                    # a coined name is said in its own 80 prompts only
    for c, sents in enumerate(b.corpus.sentences):
        for k, s in enumerate(sents):
            for w in set(s.lower().replace(".", " ").split()):
                where.setdefault(w, []).append((c, k))
    for c, name in enumerate(b.classnames):
        assert where[name] == [(c, k) for k in range(80)]


@pytest.mark.parametrize("world", ["shapes_lt_coined", "shapes_lt_small"])
def test_the_other_worlds_share_the_shapes_lt_defaults(world):
    import cvlp
    import lgr
    for stage in (cvlp, lgr):
        a, b = stage.get_args(["--data", "shapes_lt"]), stage.get_args(["--data", world])
        for key in ("backbone", "image_size", "data_root", "workers", "epochs", "lr", "batch"):
            assert getattr(a, key) == getattr(b, key), key
    assert b.data_root == "data/shapes_lt" and b.out == os.path.join("runs", world, "shapes-tiny")


def test_small_world_keeps_the_first_tenth_of_each_class_and_the_same_val_and_test(shapes_env):
    a = data.load_data("shapes_lt", str(shapes_env["root"]), seed=0)
    b = data.load_data("shapes_lt_small", str(shapes_env["root"]), seed=0)
    assert a.counts[0] == 500 and a.counts[-1] == 5
    assert b.counts[0] == 50 and b.counts[-1] == 1                # 500 // 10; 5 // 10 -> at least one image
    np.testing.assert_array_equal(b.counts, np.maximum(1, a.counts // 10))
    for c in (0, 50, 99):                                         # each class's first images, in order
        np.testing.assert_array_equal(b.train.images[b.train.labels == c], a.train.images[a.train.labels == c][:b.counts[c]])
    for split in ("val", "test"):
        np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
    assert b.classnames == a.classnames and b.corpus == a.corpus


# ----------------------------------------------------------------------------------------------
# ImageNet-LT: a tiny tree in the official layout

DESC_0 = """Tench
The tench is a freshwater fish. It lives in still waters, e.g. ponds and lakes in the U.S. Midwest and Europe.
Yes.

== History ==
It was described by Linnaeus in 1758. Anglers prize it!
=== Etymology ===
The name comes from Latin tinca.
== References ==
Smith wrote the main reference work.
=== Online sources ===
A web page lists many tench facts.
== External links ==
The tench page on FishBase is useful.
== Habitat ==
It prefers warm muddy lakes.
"""


def make_imagenet_tree(root):
    """3 classes x 2 train images (one CMYK JPEG, one grayscale JPEG, one PNG named .JPEG), 1 val image
    per class (the test split lists the val images), labels.txt and wiki for classes 0 and 1."""
    colour = (200, 30, 30)
    images = {
        "train/n01440764/a.JPEG": Image.new("RGB", (16, 16), colour),
        "train/n01440764/b.JPEG": Image.new("CMYK", (16, 16), (0, 128, 255, 0)),
        "train/n01443537/a.JPEG": Image.new("L", (16, 16), 90),
        "train/n01443537/b.JPEG": Image.new("RGB", (16, 16), colour),   # saved as PNG below
        "train/n01484850/a.JPEG": Image.new("RGB", (20, 12), colour),
        "train/n01484850/b.JPEG": Image.new("RGB", (16, 16), colour),
        "val/v0.JPEG": Image.new("RGB", (16, 16), colour),
        "val/v1.JPEG": Image.new("RGB", (16, 16), colour),
        "val/v2.JPEG": Image.new("RGB", (16, 16), colour),
    }
    for rel, im in images.items():
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        im.save(root / rel, format="PNG" if rel == "train/n01443537/b.JPEG" else "JPEG")
    write(root / "ImageNet_LT_train.txt", "".join(f"{rel} {i // 2}\n" for i, rel in enumerate(list(images)[:6])))
    val = "val/v0.JPEG 0\nval/v1.JPEG 1\nval/v2.JPEG 2\n"
    write(root / "ImageNet_LT_val.txt", val)
    write(root / "ImageNet_LT_test.txt", val)
    write(root / "labels.txt", "n01440764 0 tench, Tinca tinca\nn01443537 1 goldfish\nn01484850 2 great white shark\n")
    write(root / "wiki/desc_0.txt", DESC_0)
    write(root / "wiki/desc_1.txt", b"The goldfish is \xff orange.\n")   # not UTF-8: must not crash
    return root


def test_imagenet_lt_reads_splits_names_and_wiki(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path)
    d = data.load_data("imagenet_lt", str(root))
    assert d.classnames == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert list(d.train.labels) == [0, 0, 1, 1, 2, 2] and d.train.labels.dtype == np.int64
    assert list(d.val.labels) == [0, 1, 2] and list(d.test.labels) == [0, 1, 2]
    assert d.train.images[1] == os.path.join(str(root), "train/n01440764/b.JPEG")
    assert d.train.lines[1] == os.path.join(str(root), "ImageNet_LT_train.txt") + ":2"
    s = d.corpus.sentences
    assert s[0][0] == "a bad photo of a tench, Tinca tinca." and len(s[0]) == 80 + 6
    assert s[0][80:] == ["The tench is a freshwater fish.",
                         "It lives in still waters, e.g. ponds and lakes in the U.S. Midwest and Europe.",
                         "It was described by Linnaeus in 1758.",
                         "Anglers prize it!",
                         "The name comes from Latin tinca.",
                         "It prefers warm muddy lakes."]      # a kept section after dropped ones
    assert s[1][80:] == ["The goldfish is \ufffd orange."]
    assert s[2][0] == "a bad photo of a great white shark." and len(s[2]) == 80   # no desc_2.txt
    assert d.corpus.source[0] == ["template"] * 80 + ["description"] * 6 and d.corpus.informative is None
    flat = " ".join(x for sents in s for x in sents)
    for dropped in ("Smith", "web page", "FishBase", "Yes.", "Tench The"):
        assert dropped not in flat
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: 1 of 3 classes have no " + os.path.join(str(root), "wiki") +
                   "/desc_<index>.txt: they use the prompt templates only"]


def test_odd_image_files_load_as_rgb_tensors(tmp_path):
    root = make_imagenet_tree(tmp_path)
    assert Image.open(root / "train/n01440764/b.JPEG").mode == "CMYK"
    assert Image.open(root / "train/n01443537/a.JPEG").mode == "L"
    assert Image.open(root / "train/n01443537/b.JPEG").format == "PNG"
    d = data.load_data("imagenet_lt", str(root), text="prompt")
    ds = images.ImageDataset(d.train, images.make_transform(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False))
    for i in range(6):
        x, y = ds[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == i // 2


def test_no_wiki_folder_warns_once_and_uses_templates_only(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path)
    for f in os.listdir(root / "wiki"):
        os.remove(root / "wiki" / f)
    os.rmdir(root / "wiki")
    d = data.load_data("imagenet_lt", str(root))
    assert [len(s) for s in d.corpus.sentences] == [80, 80, 80]
    assert capsys.readouterr().err == (f"warning: no wiki/ folder under {root}: using the 80 prompt "
                                       "templates only (the paper's 'prompt only' setting)\n")
    data.load_data("imagenet_lt", str(root), text="prompt")             # templates only on purpose: no warning
    assert capsys.readouterr().err == ""


def test_class_without_training_images_is_one_warning(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path)
    with open(root / "labels.txt", "a") as f:
        f.write("n01491361 3 tiger shark\n")
    d = data.load_data("imagenet_lt", str(root), text="prompt")
    assert d.num_classes == 4 and list(d.counts) == [2, 2, 2, 0]
    assert capsys.readouterr().err == "warning: 1 of 4 classes have no training images in imagenet_lt\n"


def test_missing_labels_txt_falls_back_to_open_clip_names(tmp_path):
    root = make_imagenet_tree(tmp_path)
    os.remove(root / "labels.txt")
    d = data.load_data("imagenet_lt", str(root), text="prompt")
    assert d.num_classes == 1000 and d.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert d.classnames[657] == d.classnames[744] == "missile"   # docs/design.md §7: repeated name, two classes


# ----------------------------------------------------------------------------------------------
# Bad input: one DataError line that says what is wrong


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def test_missing_data_root_names_layout_and_flag(tmp_path):
    with pytest.raises(DataError, match=r"data root .*nope not found; expected ImageNet_LT_\{train,val,test\}\.txt.*--data-root"):
        data.load_data("imagenet_lt", str(tmp_path / "nope"))


def test_missing_split_file(tmp_path):
    root = make_imagenet_tree(tmp_path)
    os.remove(root / "ImageNet_LT_test.txt")
    with pytest.raises(DataError, match=r"split file .*ImageNet_LT_test\.txt not found"):
        data.load_data("imagenet_lt", str(root))


def test_line_pointing_at_missing_image_names_file_and_line(tmp_path):
    root = make_imagenet_tree(tmp_path)
    append_line(root / "ImageNet_LT_train.txt", "train/n01440764/gone.JPEG 0")   # line 7
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt:7: image .*gone\.JPEG not found"):
        data.load_data("imagenet_lt", str(root))


def test_malformed_split_line(tmp_path):
    root = make_imagenet_tree(tmp_path)
    append_line(root / "ImageNet_LT_val.txt", "val/v0.JPEG")                     # line 4, no label
    with pytest.raises(DataError, match=r"ImageNet_LT_val\.txt:4: malformed line 'val/v0\.JPEG'"):
        data.load_data("imagenet_lt", str(root))


def test_label_out_of_range_names_line_and_valid_range(tmp_path):
    root = make_imagenet_tree(tmp_path)
    append_line(root / "ImageNet_LT_val.txt", "val/v0.JPEG 3")                   # 3 classes: 0..2
    with pytest.raises(DataError, match=r"ImageNet_LT_val\.txt:4: label 3 out of range \(valid: 0\.\.2\)"):
        data.load_data("imagenet_lt", str(root))
    write(root / "ImageNet_LT_val.txt", "val/v0.JPEG -1\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_val\.txt:1: label -1 out of range"):
        data.load_data("imagenet_lt", str(root))


def test_class_list_and_split_disagree_on_class_count(tmp_path):
    root = make_imagenet_tree(tmp_path)
    write(root / "labels.txt", "n01440764 0 tench\nn01443537 1 goldfish\n")
    with pytest.raises(DataError, match=r"labels\.txt names 2 classes but the train split uses 3 "
                                        r"\(label 2 at .*ImageNet_LT_train\.txt:5\)"):
        data.load_data("imagenet_lt", str(root))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match=r"unknown --data 'cifar'; choose one of: imagenet_lt, places_lt, inat2018, shapes_lt, "):
        data.load_data("cifar")


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--data", "imagenet_lt",
                        "--data-root", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: data root ")
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# Places-LT and iNaturalist 2018


def test_places_lt_reads_readable_names(tmp_path, capsys):
    for rel in ("data_256/a/abbey/1.jpg", "data_256/a/apartment_building/outdoor/1.jpg",
                "data_256/a/airfield/1.jpg", "val_256/v.jpg"):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="JPEG")
    write(tmp_path / "labels.txt", "/a/abbey 0\n/a/apartment_building/outdoor 1\nairfield 2\n")
    write(tmp_path / "Places_LT_train.txt", "data_256/a/abbey/1.jpg 0\ndata_256/a/apartment_building/outdoor/1.jpg 1\n"
                                            "data_256/a/airfield/1.jpg 2\n")
    write(tmp_path / "Places_LT_val.txt", "val_256/v.jpg 1\n")
    write(tmp_path / "Places_LT_test.txt", "val_256/v.jpg 2\n")
    d = data.load_data("places_lt", str(tmp_path))
    assert d.classnames == ["abbey", "apartment building outdoor", "airfield"]
    assert list(d.train.labels) == [0, 1, 2] and list(d.val.labels) == [1] and list(d.test.labels) == [2]
    assert d.corpus.sentences[1][0] == "a bad photo of a apartment building outdoor."
    assert capsys.readouterr().err.startswith("warning: no wiki/ folder")
    os.remove(tmp_path / "labels.txt")
    with pytest.raises(DataError, match=r"labels\.txt not found; Places-LT needs the class list"):
        data.load_data("places_lt", str(tmp_path))


def test_inat2018_reads_coco_json_and_uses_val_as_test(tmp_path):
    files = ["train_val2018/Aves/0/a.jpg", "train_val2018/Aves/1/b.jpg", "train_val2018/Aves/1/c.jpg"]
    for rel in files:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="JPEG")
    categories = [{"id": 1, "name": "Anas platyrhynchos", "supercategory": "Aves"},   # listed out of order
                  {"id": 0, "name": "Aix sponsa", "supercategory": "Aves"}]
    train = {"images": [{"id": 10, "file_name": files[0]}, {"id": 11, "file_name": files[1]}],
             "annotations": [{"id": 1, "image_id": 11, "category_id": 1}, {"id": 2, "image_id": 10, "category_id": 0}]}
    val = {"images": [{"id": 20, "file_name": files[2]}], "annotations": [{"id": 3, "image_id": 20, "category_id": 1}]}
    for name, obj in (("categories.json", categories), ("train2018.json", train), ("val2018.json", val)):
        write(tmp_path / name, json.dumps(obj))
    d = data.load_data("inat2018", str(tmp_path), text="prompt")
    assert d.classnames == ["Aix sponsa", "Anas platyrhynchos"]     # class index = order of category id
    assert list(d.train.labels) == [1, 0]
    assert d.train.images == [os.path.join(str(tmp_path), files[1]), os.path.join(str(tmp_path), files[0])]
    assert d.train.lines[0] == os.path.join(str(tmp_path), "train2018.json") + ":annotations[0]"
    assert list(d.val.labels) == [1] and d.test is d.val                # the paper reports on val
    assert [len(s) for s in d.corpus.sentences] == [80, 80]
    os.rename(tmp_path / "val2018.json", tmp_path / "val.json")           # the official VL-LTR README's name for it
    assert data.load_data("inat2018", str(tmp_path), text="prompt").val.images == [os.path.join(str(tmp_path), files[2])]


# ----------------------------------------------------------------------------------------------
# The shapes_lt stand-in's loss, and AnSS's precision against the ground truth


def test_shapes_standin_clip_loss_is_clips_loss_with_repeated_pairs_as_positives():
    # E^I = E^T = the 3 unit vectors, so S = identity and S / tau = 2 I at tau = 0.5.
    E, tau = torch.eye(3, dtype=torch.float64), 0.5
    # All pairs distinct: every row and column is -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) = 0.2395.
    assert shapes_lt.clip_loss(E, E, torch.tensor([4, 7, 9]), tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    # Pair 4 drawn twice (rows / columns 0 and 1 are copies): each of those rows averages -log p over both copies.
    p_self, p_other = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    copies = -(math.log(p_self) + math.log(p_other)) / 2
    expected = (2 * copies + -math.log(p_self)) / 3                 # rows (image -> text); columns are the same
    assert shapes_lt.clip_loss(E, E, torch.tensor([4, 4, 9]), tau).item() == pytest.approx(expected, rel=1e-12)
    # In general it is Eq. (2) with one class per pair, halved: the same function of the same inputs.
    g = torch.Generator().manual_seed(0)
    E_I, E_T, pair = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor([0, 3, 3, 1, 0, 2])
    S = cosine_similarity_matrix(E_I, E_T)
    assert shapes_lt.clip_loss(E_I, E_T, pair) == class_wise_contrastive_loss(S, pair, pair, 0.07) / 2   # bitwise


def test_description_precision_compares_anss_and_cutoff_on_the_description_sentences_alone():
    # class 0: template, d1 (noise), d2, d3; class 1: template, d1 (noise), d2. Templates never count.
    corpus = data.Corpus(sentences=[["t", "a", "b", "c"], ["t", "d", "e"]],
                    source=[["template"] + ["description"] * 3, ["template"] + ["description"] * 2],
                    informative=[[True, False, True, True], [True, False, True]])
    scores = torch.tensor([0.1, 0.95, 0.9, 0.2, 0.0, 0.3, 0.4])
    r = description_precision(scores, torch.tensor([0, 4, 7]), corpus, M=2)
    # AnSS: class 0 keeps c (0.2), b (0.9) -> 2 informative; class 1 keeps d, e -> 1. 3 of 4.
    # cut-off: class 0 keeps a, b -> 1; class 1 keeps d, e -> 1. 2 of 4. All descriptions: 3 of 5.
    assert r == pytest.approx({"anss": 0.75, "cutoff": 0.5, "corpus": 0.6, "kept": 4})


def test_the_repositorys_stand_in_file_matches_its_hash_and_expands_to_a_full_model():
    assert shapes_lt.file_sha256(shapes_lt.STANDIN_FILE) == shapes_lt.STANDIN_SHA256
    blob = torch.load(shapes_lt.STANDIN_FILE, weights_only=True)
    model = clip_models.create_clip("shapes-tiny", 32)
    sd = shapes_lt.expand_standin(blob, model)
    rows = blob["token_rows"]
    assert torch.equal(sd["token_embedding.weight"][rows], blob["token_embedding_rows"])
    assert torch.equal(model.token_embedding.weight.detach(), sd["token_embedding.weight"])
    for k, v in blob["state"].items():
        assert torch.equal(model.state_dict()[k], v), k
    # the rows left out: N(0, 0.02^2) from a fixed seed, the same at every expansion
    others = torch.ones(blob["vocab"], dtype=torch.bool)
    others[rows] = False
    drawn = sd["token_embedding.weight"][others]
    assert abs(drawn.std().item() - 0.02) < 1e-3 and abs(drawn.mean().item()) < 1e-3
    assert torch.equal(shapes_lt.expand_standin(blob, clip_models.create_clip("shapes-tiny", 32))["token_embedding.weight"],
                       sd["token_embedding.weight"])


def test_compacting_a_stand_in_keeps_every_tensor_and_the_used_token_rows_exactly():
    torch.manual_seed(1)
    trained = clip_models.create_clip("shapes-tiny", 32).state_dict()
    blob = shapes_lt.compact_standin(trained, used_tokens=[49407, 5, 49406, 5], seed=0)
    assert blob["token_rows"].tolist() == [5, 49406, 49407]
    sd = shapes_lt.expand_standin(blob, clip_models.create_clip("shapes-tiny", 32))
    assert torch.equal(sd["token_embedding.weight"][[5, 49406, 49407]], trained["token_embedding.weight"][[5, 49406, 49407]])
    assert all(torch.equal(sd[k], trained[k]) for k in trained if k != "token_embedding.weight")


def test_a_stand_in_file_that_does_not_match_its_hash_is_not_used(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "standin.pt"
    bad.write_bytes(b"not the stand-in")
    monkeypatch.setattr(shapes_lt, "STANDIN_FILE", str(bad))
    trained = []
    monkeypatch.setattr(shapes_lt, "train_clip_standin", lambda model, path, seed, device: trained.append(path))
    path = shapes_lt.ensure_standin(str(tmp_path / "root"), 0, clip_models.create_clip("shapes-tiny", 32), "cpu")
    assert trained == [path] and path == shapes_lt.standin_path(str(tmp_path / "root"), 0)
    assert "does not match its hash" in capsys.readouterr().err
