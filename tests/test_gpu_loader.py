"""Tests for --loader gpu: the workers read file bytes, the device decodes and augments a whole batch
(images.DeviceTransform, data.make_loader). Run here with --device cpu: the same code, the CPU decoder.

    python -m pytest -q test_gpu_loader.py        # CPU, no download, about 10 s

The reference is the PIL path (images.Transform, one image at a time with torchvision v2), written out step
by step. Tolerance: the decoders agree here (torchvision and PIL both use libjpeg-turbo; nvjpeg on CUDA may
differ by a level or two, not yet measured on a GPU), and the eval resize is Transform's own, so the eval
path must match to within 1 uint8 level. The train resize differs in one rounding: Transform resizes uint8
images with v2's uint8 kernel, which rounds to whole levels and clips to 0..255 between its horizontal and
vertical passes; DeviceTransform resizes in float and rounds once at the end (as Transform.batch does). On
these noisy photo-like images that moves a pixel by at most 3 levels and by 0.13-0.2 of a level on average
(5 seeds of boxes); the test allows 4 and 0.5. (A hard 0-to-255 edge, where bicubic overshoots and the uint8
kernel clips the overshoot between passes, can differ by ~12 levels at a few pixels.)
"""
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import cvlp
import data
from util import clip_models, engine, images
from tests.test_data import make_imagenet_tree, write

MEAN, STD = (clip_models.clip_preprocess("shapes-tiny")[k] for k in ("mean", "std"))
LEVEL = 1 / 255 / torch.tensor(STD).view(3, 1, 1)               # one uint8 level in normalised units, per channel


def photo(h, w, seed):
    """A smooth h x w RGB image with some noise: gradients and edges like a photo, not pure noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(xx / 5 + seed), 128 + 100 * np.cos(yy / 7), 128 + 100 * np.sin((xx + yy) / 9)], -1)
    return np.clip(a + np.random.default_rng(seed).normal(0, 20, a.shape), 0, 255).astype(np.uint8)


def save_images(folder):
    """An RGB JPEG of each of four sizes, a grey JPEG, a CMYK JPEG and a PNG named .JPEG -> their paths."""
    ims = [Image.fromarray(photo(h, w, k)) for k, (h, w) in enumerate([(60, 80), (97, 45), (64, 64), (33, 120)])]
    ims += [ims[0].convert("L"), ims[1].convert("CMYK"), ims[2]]
    paths = [str(folder / f"{k}.JPEG") for k in range(len(ims))]
    for k, (im, path) in enumerate(zip(ims, paths)):
        im.save(path, format="PNG" if k == 6 else "JPEG", quality=90)
    return paths


def pil_path(path, box, size):
    """Transform's train path for one image with a given crop box and no flip: PIL decode, to a uint8
    tensor, v2's resized_crop (bicubic, antialias), to float in [0, 1], normalise."""
    x = v2.functional.to_image(images.load_rgb(path))                          # (3, H, W) uint8
    x = v2.functional.resized_crop(x, *box, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), MEAN, STD)


def in_levels(a, b):
    """|a - b| of normalised images in uint8 levels."""
    return (a - b).abs() / LEVEL


# ----------------------------------------------------------------------------------------------
# Which files the device decodes: read from the JPEG frame header


def jpeg(frame_marker, precision, components):
    """SOI, a 4-byte APP0 segment, then a frame header of a 16 x 16 image."""
    return torch.tensor([0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x4A, 0x46,
                         0xFF, frame_marker, 0x00, 0x0B, precision, 0x00, 0x10, 0x00, 0x10, components, 0, 0, 0],
                        dtype=torch.uint8)


def test_device_decodes_8_bit_grey_and_colour_jpegs_and_leaves_the_rest_to_pil(tmp_path):
    assert images.device_decodable(jpeg(0xC0, 8, 3))              # baseline, YCbCr
    assert images.device_decodable(jpeg(0xC0, 8, 1))              # baseline, grey
    assert images.device_decodable(jpeg(0xC2, 8, 3))              # progressive
    assert not images.device_decodable(jpeg(0xC0, 8, 4))          # CMYK / YCCK
    assert not images.device_decodable(jpeg(0xC0, 12, 3))         # 12-bit samples
    assert not images.device_decodable(jpeg(0xC9, 8, 3))          # arithmetic coding
    assert not images.device_decodable(torch.tensor([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A], dtype=torch.uint8))
    assert not images.device_decodable(torch.tensor([0xFF, 0xD8], dtype=torch.uint8))   # cut short
    # Files PIL wrote: RGB and grey JPEGs on the device; CMYK and the PNG named .JPEG through PIL.
    flags = [images.device_decodable(images.read_bytes(p)) for p in save_images(tmp_path)]
    assert flags == [True, True, True, True, True, False, False]


# ----------------------------------------------------------------------------------------------
# Same boxes, same output as the PIL path


def test_train_path_with_the_same_crop_boxes_matches_the_pil_transform(tmp_path):
    paths = save_images(tmp_path)
    t = images.DeviceTransform(images.make_transform(32, MEAN, STD, train=True), "cpu")
    decoded = t.decode([images.read_bytes(p) for p in paths], paths, [None] * len(paths))
    assert [tuple(x.shape) for x in decoded] == [(3, 60, 80), (3, 97, 45), (3, 64, 64), (3, 33, 120),
                                                 (3, 60, 80), (3, 97, 45), (3, 64, 64)]
    # One box of each kind: a corner, a tall strip, the whole image, a 1-pixel-wide strip, and the rest.
    boxes = torch.tensor([[0, 0, 30, 40], [10, 5, 80, 30], [0, 0, 64, 64], [2, 100, 30, 1],
                          [5, 10, 50, 60], [40, 20, 50, 25], [8, 8, 40, 40]])
    out = t.augment(decoded, boxes, torch.zeros(7, dtype=torch.bool))
    ref = torch.stack([pil_path(p, box, 32) for p, box in zip(paths, boxes.tolist())])
    assert out.shape == ref.shape == (7, 3, 32, 32) and out.dtype == torch.float32
    d = in_levels(out, ref)
    assert d.max() <= 4 + 1e-4 and d.mean() < 0.5, (d.max(), d.mean())
    mirrored = t.augment(decoded, boxes, torch.tensor([True, False, True, False, True, False, True]))
    assert torch.equal(mirrored[0::2], out[0::2].flip(-1)) and torch.equal(mirrored[1::2], out[1::2])


def test_drawn_boxes_come_from_each_images_own_size_as_torchvision_draws_them(tmp_path):
    paths = save_images(tmp_path)
    t = images.DeviceTransform(images.make_transform(32, MEAN, STD, train=True), "cpu")
    files = [images.read_bytes(p) for p in paths]
    torch.manual_seed(3)
    out = t(files, paths, [None] * len(paths))
    # The same draws again from the same seed: the batch's boxes, each from its own image's size, then the flips.
    torch.manual_seed(3)
    sizes = torch.tensor([[60, 80], [97, 45], [64, 64], [33, 120], [60, 80], [97, 45], [64, 64]])
    boxes = images.random_crop_boxes(7, sizes[:, 0], sizes[:, 1], (0.08, 1.0))
    flip = torch.rand(7) < 0.5
    top, left, h, w = boxes.T
    assert ((top + h <= sizes[:, 0]) & (left + w <= sizes[:, 1])).all()          # each inside its own image
    ref = torch.stack([pil_path(p, box, 32) for p, box in zip(paths, boxes.tolist())])
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    assert in_levels(out, ref).max() <= 4 + 1e-4


def loader_args(**kw):
    """What make_loader reads from a stage's arguments."""
    return Namespace(**{"batch": 4, "workers": 0, "device": "cpu", "loader": "gpu", **kw})


def test_eval_path_and_odd_files_match_the_pil_loader(tmp_path):
    # RGB JPEGs, a grey JPEG, a CMYK JPEG and a PNG named .JPEG, through both loaders in eval mode.
    paths = save_images(tmp_path)
    split = data.Split(paths, np.arange(7) % 3, [f"split.txt:{k + 1}" for k in range(7)])
    transform = images.make_transform(32, MEAN, STD, train=False)
    out = {}
    for loader in ("pil", "gpu"):
        args = loader_args(loader=loader, batch=4)
        batches = data.make_loader(split, transform, args)
        assert len(batches) == 2
        out[loader] = [torch.cat(t) for t in zip(*batches)]
    (x_pil, y_pil), (x_gpu, y_gpu) = out["pil"], out["gpu"]
    assert x_gpu.shape == (7, 3, 32, 32) and x_gpu.dtype == torch.float32
    assert torch.equal(y_gpu, y_pil) and y_gpu.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert in_levels(x_gpu, x_pil).max() <= 1 + 1e-4


def test_unreadable_file_is_load_rgbs_one_line_error(tmp_path):
    # Not a JPEG past its first bytes (goes to load_rgb at once), and a JPEG cut in half (its header passes,
    # the device decoder refuses it, the batch is decoded again image by image, load_rgb names the file).
    paths = save_images(tmp_path)[:2]
    write(tmp_path / "bad.JPEG", b"\xff\xd8\xff\xe0 not really a JPEG")
    whole = images.read_bytes(paths[0]).numpy().tobytes()
    write(tmp_path / "cut.JPEG", whole[:len(whole) // 2])
    eval_transform = images.make_transform(32, MEAN, STD, train=False)
    for name in ("bad.JPEG", "cut.JPEG"):
        bad = str(tmp_path / name)
        split = data.Split(paths + [bad], np.array([0, 1, 0]), ["s.txt:1", "s.txt:2", "s.txt:3"])
        with pytest.raises(engine.DataError) as e:
            list(data.make_loader(split, eval_transform, loader_args()))
        with pytest.raises(engine.DataError) as e_pil:
            images.load_rgb(bad, "s.txt:3")
        assert str(e.value) == str(e_pil.value) and f"cannot read image {bad} (listed at s.txt:3)" in str(e.value)
    missing = data.Split([str(tmp_path / "gone.JPEG")], np.array([0]), ["s.txt:9"])
    with pytest.raises(engine.DataError, match=r"image not found: \S+gone\.JPEG \(listed at s\.txt:9\)"):
        list(data.make_loader(missing, eval_transform, loader_args()))


# ----------------------------------------------------------------------------------------------
# cvlp.py --loader gpu trains on an ImageNet-LT tree (CMYK, grey and PNG-named files included)


def cvlp_gpu_loader(root, out, tiny_clip, *extra):
    cvlp.main(["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
               "--clip-weights", str(tiny_clip), "--epochs", "2", "--batch", "2", "--text", "prompt",
               "--loader", "gpu", "--augment", "crop-flip", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])
    return torch.load(out / "cvlp.pt", weights_only=True)


def test_cvlp_trains_with_the_gpu_loader_and_resumes_exactly(tmp_path, tiny_clip, capsys):
    # 6 train images, batch 2: 3 steps an epoch. Uninterrupted: 2 steps. Interrupted after 1, resumed to 2:
    # the augmentation draws in the main process continue where they stopped, so the weights are bitwise equal.
    root = make_imagenet_tree(tmp_path / "imagenet")
    a = cvlp_gpu_loader(root, tmp_path / "a", tiny_clip, "--stop-after-steps", "2")
    assert a["position"]["epoch"] == 0 and a["position"]["batch"] == 2
    assert "stopped after 2 steps" in capsys.readouterr().out
    cvlp_gpu_loader(root, tmp_path / "b", tiny_clip, "--stop-after-steps", "1")
    b = cvlp_gpu_loader(root, tmp_path / "b", tiny_clip, "--stop-after-steps", "2", "--resume")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs"
    start = torch.load(tiny_clip, weights_only=True)             # and training moved the image encoder
    assert any(not torch.equal(a["model"][k], start[k]) for k in start if k.startswith("visual."))
