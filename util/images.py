"""Images for VL-LTR: reading any image file, the training augmentation, and the Dataset the loaders draw from.

Train: RandomResizedCrop + horizontal flip, and with augment "randaug" the official code's RandAugment and random
erasing; eval: resize + centre crop; both normalised with CLIP's mean and std and resized as its weights were trained (the paper fine-tunes CLIP, so its input statistics; the
settings of each --pretrained tag come from clip_models.clip_preprocess). Images held in memory (shapes_lt) are
augmented a whole batch at a time (`Transform.batch`), image files one at a time in the loader's workers.
Which images belong to which split and class is data.py's business.
"""
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from util.clip_models import clip_preprocess
from util.distributed import rank_world
from util.errors import DataError
from util.files import atomic_write
from util.progress import progress


def load_rgb(path, where=None):
    """Open any image PIL can read (CMYK, grayscale, palette, PNG saved as .JPEG) as RGB."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}" + (f" (listed at {where})" if where else "")
                        + "; check --data-root or the split file")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        fix = "re-download it or remove its line from the split file" if where else "replace it or remove it"
        raise DataError(f"cannot read image {path}" + (f" (listed at {where})" if where else "") + f": {e}; {fix}")


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
    lines = split.lines or [None] * len(ok)                      # an ImageFolder tree has no split file
    dropped = [(split.images[i], lines[i]) for i, good in enumerate(ok) if not good]
    if not keep:
        source = f"listed in {lines[0].rsplit(':', 1)[0]}" if lines[0] else f"under {os.path.commonpath(split.images)}"
        raise DataError(f"none of the {len(ok)} images {source} can be read (first: {split.images[0]}); check --data-root")
    return split.subset(keep), dropped


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


def clip_transform(args, train, **kwargs):
    """make_transform for a stage: args.image_size, and the mean / std, interpolation and resize mode that the
    weights of --backbone under --pretrained were trained with (clip_models.clip_preprocess)."""
    return make_transform(args.image_size, **clip_preprocess(args.backbone, args.pretrained), train=train, **kwargs)


def make_transform(image_size, mean, std, train, crop_scale=(0.08, 1.0), crop_pct=1.0, interpolation="bicubic",
                   resize_mode="shortest", augment="crop-flip"):
    """Train: RandomResizedCrop + horizontal flip; augment "randaug" adds the official code's RandAugment
    (rand-m9-mstd0.5-inc1) and random erasing (p 0.25, per-pixel noise), as timm's create_transform builds them for
    its main.py defaults. Eval: resize + centre crop (crop_pct 1.0: CLIP's; 0.875 resizes the short side to
    image_size / 0.875 first, 256 for 224, as the official code evaluates). Both normalise
    with the CLIP model's mean and std and resize with its interpolation ('bicubic' | 'bilinear'); resize_mode
    'squash' (SigLIP's, DFN's ViT-H) resizes eval images to a square, ignoring the aspect ratio, as open_clip
    does. clip_models.clip_preprocess(backbone, tag) gives the last four keywords. See Transform."""
    return Transform(image_size, mean, std, train, crop_scale, crop_pct, interpolation, resize_mode, augment)


class Transform:
    """transform(img): one PIL image or uint8 (3, H, W) tensor -> (3, S, S) float, with torchvision v2.
    transform.batch(x): uint8 (B, 3, H, W) -> (B, 3, S, S) in a few calls per batch, the same transform
    image by image: its own crop and flip for each, drawn as v2 draws them, resized as torchvision resizes
    float images (bicubic or bilinear, antialias), then rounded to uint8 levels. (v2's uint8 kernel also rounds between
    its two 1-D passes, so on sharp edges the two paths can differ by a few levels.)"""

    def __init__(self, image_size, mean, std, train, crop_scale=(0.08, 1.0), crop_pct=1.0, interpolation="bicubic",
                 resize_mode="shortest", augment="crop-flip"):
        from torchvision.transforms import v2
        if interpolation not in ("bicubic", "bilinear") or resize_mode not in ("shortest", "squash"):
            raise DataError(f"image resizing {interpolation} / {resize_mode} is not supported (bicubic or bilinear, "
                            f"shortest or squash)")
        mode = v2.InterpolationMode.BICUBIC if interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
        if augment not in ("crop-flip", "randaug"):
            raise DataError(f"unknown augmentation {augment!r}; choose crop-flip or randaug")
        self.size, self.train, self.crop_scale, self.interpolation = image_size, train, crop_scale, interpolation
        self.randaug = train and augment == "randaug"
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        resized = int(image_size / crop_pct)
        if train:
            geometry = [v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=mode, antialias=True),
                        v2.RandomHorizontalFlip()]
        else:                                   # squash: both sides to the size; shortest: the short side, aspect kept
            geometry = [v2.Resize((resized, resized) if resize_mode == "squash" else resized, interpolation=mode,
                                  antialias=True), v2.CenterCrop(image_size)]
        self.geometry = v2.Compose(geometry)                     # eval: deterministic, so batchable as is
        self.per_image = v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(mean, std)])

        if self.randaug:                         # PIL's image operations, image by image, as the official code runs them
            from timm.data import create_transform
            official = create_transform(image_size, is_training=True, scale=crop_scale, interpolation=interpolation,
                                        mean=mean, std=std, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                                        re_mode="pixel", re_count=1)
            for t in official.transforms:
                for op in getattr(t, "ops", []):                 # RandAugment's operations
                    if op.name == "PosterizeIncreasing":
                        op.aug_fn = posterize_zero_bits_black
            self.per_image = v2.Compose([v2.ToPILImage(), official])

    def __call__(self, img):
        return self.per_image(img)

    def batch(self, x):
        if self.randaug:                                         # RandAugment has no batched form: image by image
            return torch.stack([self(img) for img in x])
        if self.train:
            rank, world_size = rank_world()      # torchrun: draw for the global batch, keep this rank's share
            share = slice(rank * len(x), (rank + 1) * len(x))
            boxes = random_crop_boxes(len(x) * world_size, x.shape[-2], x.shape[-1], self.crop_scale)[share]  # (B, 4)
            x = self.crop_flip(x, boxes, (torch.rand(len(x) * world_size) < 0.5)[share])      # (B, 3, S, S)
        else:
            x = self.geometry(x).float()
        return self.normalise(x)

    def crop_flip(self, images, boxes, flip):
        """The train geometry for given draws: images (B, 3, H, W) or [B] (3, H_k, W_k), boxes (B, 4), flip (B,)
        bool -> (B, 3, S, S) float: each box resized (resized_crops), rounded to uint8 levels, mirrored where flip."""
        crops = resized_crops_batched if torch.is_tensor(images) else resized_crops   # one size: one batched product
        x = crops(images, boxes, self.size, self.interpolation).clamp_(0, 255).round_()
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)

    def normalise(self, x):
        """(B, 3, S, S) float in uint8 levels -> normalised with the CLIP mean and std, on x's device."""
        return (x / 255 - self.mean.to(x.device)) / self.std.to(x.device)


def posterize_zero_bits_black(img, bits_to_keep, **_):
    """RandAugment's PosterizeIncreasing: keep the `bits_to_keep` high bits of each channel. At its strongest level
    (the magnitude noise of rand-m9-mstd0.5 reaches it now and then) timm asks for 0 bits, which PIL once turned into
    a black image and Pillow now refuses ("bits must be between or equal to 1 and 8"): 0 bits give the black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def random_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop's boxes for n images at once, drawn the way torchvision draws one: area a fraction
    of the image uniform in `scale`, aspect ratio log-uniform in `ratio`, the first of `tries` draws that
    fits; else the centred largest box with the aspect clamped to `ratio`. height, width: ints (n images of
    one size) or (n,) tensors (each image its own, --loader gpu). -> (n, 4) int64 (top, left, h, w)."""
    height, width = torch.as_tensor(height).expand(n), torch.as_tensor(width).expand(n)       # (n,)
    area = (height * width)[:, None] * torch.empty(n, tries).uniform_(*scale)                # (n, tries)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(1, keepdim=True)                   # (n, 1) first draw that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    image_aspect = width.double() / height                       # fallback: whole image, aspect clamped
    fh = torch.where(image_aspect < ratio[0], (width.double() / ratio[0]).round().long(), height)
    fw = torch.where(image_aspect > ratio[1], (height.double() * ratio[1]).round().long(), width)
    none = ~fits.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = (torch.rand(n) * (height - h + 1)).long()
    left = (torch.rand(n) * (width - w + 1)).long()
    top, left = torch.where(none, (height - h) // 2, top), torch.where(none, (width - w) // 2, left)
    return torch.stack([top, left, h, w], 1)


def resized_crops(x, boxes, size, interpolation="bicubic"):
    """(B, C, H, W) float, or a list of B (C, H_k, W_k) images of any size and dtype; (B, 4) boxes (top, left,
    h, w) -> (B, C, size, size) float: each box resized with `interpolation` ('bicubic' | 'bilinear') and
    antialias, as torchvision's resized_crop does."""
    return torch.cat([F.interpolate(x[k][None, :, t:t + h, l:l + w].float(), size=(size, size), mode=interpolation,
                                    align_corners=False, antialias=True)
                      for k, (t, l, h, w) in enumerate(boxes.tolist())])


def resized_crops_batched(x, boxes, size, interpolation="bicubic"):
    """resized_crops for a (B, C, H, W) batch in two batched matrix products, without a resize per image. Resizing is
    linear and separable: a crop's rows resized to `size` are R @ crop with R the (size, h) matrix of the resize's
    weights (resize_weights), its columns crop @ C^T likewise; a box is R and C placed at its offsets in (size, H) and
    (size, W) matrices of zeros. The same weights as F.interpolate's, summed in another order: equal to float rounding
    (tests/test_exact_forms.py). -> (B, C, size, size) float."""
    B, C, H, W = x.shape
    rows, cols = x.new_zeros(B, size, H, dtype=torch.float32), x.new_zeros(B, size, W, dtype=torch.float32)
    for k, (t, l, h, w) in enumerate(boxes.tolist()):
        rows[k, :, t:t + h] = resize_weights(h, size, interpolation)
        cols[k, :, l:l + w] = resize_weights(w, size, interpolation)
    return rows[:, None] @ x.float() @ cols[:, None].transpose(-1, -2)                    # (B, C, size, size)


@functools.lru_cache(maxsize=None)
def resize_weights(n, size, interpolation="bicubic"):
    """(size, n): the weights with which F.interpolate (antialias) resizes a length-n signal to `size`, read off by
    resizing the n x n identity along its rows (its columns n -> n: unchanged)."""
    return F.interpolate(torch.eye(n)[None, None], size=(size, n), mode=interpolation, align_corners=False,
                         antialias=True)[0, 0]                                           # (size, n)


# ----------------------------------------------------------------------------------------------
# --loader gpu: the workers only read file bytes; a whole batch is decoded and augmented on the device


def read_bytes(path, where=None):
    """The file's bytes, undecoded, as an (n,) uint8 tensor. Missing or unreadable: load_rgb's one-line error."""
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError:
        load_rgb(path, where)                                    # raises the same DataError as --loader pil
        raise


def device_decodable(data):
    """True when the bytes (an (n,) uint8 tensor) are a JPEG the batched device decoder handles: the SOI
    marker FF D8, then a baseline, extended or progressive frame header (SOF0-2) of 8-bit samples with 1
    (grey) or 3 (YCbCr) components. False for CMYK/YCCK JPEGs (4 components: libjpeg converts them to RGB,
    nvjpeg need not), PNGs saved as .JPEG, other formats and broken files: load_rgb decodes those on the
    CPU, as --loader pil does."""
    b = memoryview(data.numpy())
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return False
    i = 2
    while i + 9 < len(b) and b[i] == 0xFF:                       # segments: FF, marker, 2-byte length, body
        marker = b[i + 1]
        if marker == 0xFF:                                       # fill byte before a marker
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # a frame header (SOFn)
            return marker <= 0xC2 and b[i + 4] == 8 and b[i + 9] in (1, 3)  # precision, component count
        else:
            i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return False


def decode_jpegs(files, device):
    """[B] JPEG files' bytes, (n,) uint8 tensors -> [B] (3, H_k, W_k) uint8 RGB images on `device`, in one call of
    TorchCodec's decoder: libjpeg-turbo on a CPU (the pixels PIL gives, BENCHMARKS.md), nvjpeg on CUDA (the batch
    at once). RuntimeError when a file is not a JPEG it decodes."""
    from torchcodec.decoders import decode_jpeg                  # imported here: only --loader gpu needs it
    return decode_jpeg(list(files), mode="RGB", device=device)


class FileBytes(torch.utils.data.Dataset):
    """(file bytes, label, path, "file:line") of one Split's image files, undecoded: what --loader gpu's
    workers read. DeviceTransform decodes the batch."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        path, where = self.split.images[i], self.split.lines[i] if self.split.lines else None
        return read_bytes(path, where), int(self.split.labels[i]), path, where


def collate_files(batch):
    """[(bytes, label, path, where)] -> (the batch's files end to end in one (n,) uint8 tensor, (B,) their
    lengths, (B,) labels, [B] paths, [B] wheres). One tensor, not B: a worker hands each tensor over with a
    file descriptor that stays open, and 8 workers x 2 batches x 256 files would pass the usual limit of 1024."""
    files, labels, paths, wheres = zip(*batch)
    return torch.cat(files), torch.tensor([len(f) for f in files]), torch.tensor(labels), list(paths), list(wheres)


class DeviceTransform:
    """transform(files, paths, wheres): a batch of image files' bytes -> (B, 3, S, S) float on `device`: the
    PIL path's Transform with decoding and augmentation moved from the CPU workers to the device.

    Decoding: the JPEGs in one call of TorchCodec's decoder (decode_jpegs: nvjpeg on CUDA, libjpeg-turbo on a
    CPU, as PIL), converted to RGB; whatever that decoder does not handle (CMYK, a PNG named .JPEG, a file it
    refuses) goes through load_rgb on the CPU, image by image, with its error messages.
    Train: a RandomResizedCrop box drawn from each image's own H x W (random_crop_boxes), resized as
    Transform.batch resizes (resized_crops: bicubic or bilinear, antialias, rounded to uint8 levels), mirrored with
    probability 1/2; eval: Transform's own resize of the short side and centre crop, image by image. Then
    normalised with the CLIP mean and std. The random draws come from torch's global generator in the main
    process, in order, so --resume continues them exactly (as --workers 0 does for --loader pil).
    Given the same boxes and decoder it matches Transform to within a few uint8 levels: Transform's uint8
    resize rounds and clips between its two 1-D passes, this one once at the end (test_gpu_loader.py)."""

    def __init__(self, transform, device):
        if getattr(transform, "randaug", False):
            raise DataError("--loader gpu decodes and crops on the device, where RandAugment does not run: pass "
                            "--augment crop-flip with it, or --loader pil")
        self.transform, self.device = transform, torch.device(device)

    def decode(self, files, paths, wheres):
        """[B] file bytes -> [B] (3, H_k, W_k) uint8 RGB images on the device."""
        images = [None] * len(files)
        jpeg = [k for k, data in enumerate(files) if device_decodable(data)]
        try:
            decoded = decode_jpegs([files[k] for k in jpeg], self.device) if jpeg else []
        except RuntimeError:                                     # one file spoils the call: decode one by one
            decoded = []
            for k in jpeg:
                try:
                    decoded += decode_jpegs([files[k]], self.device)
                except RuntimeError:
                    decoded.append(None)
        for k, img in zip(jpeg, decoded):
            images[k] = img
        for k, img in enumerate(images):
            if img is None:                                      # PIL on the CPU, as --loader pil
                rgb = np.array(load_rgb(paths[k], wheres[k]))   # (H, W, 3)
                images[k] = torch.from_numpy(rgb).permute(2, 0, 1).to(self.device)
        return images

    def augment(self, images, boxes, flip):
        """[B] (3, H_k, W_k) uint8, (B, 4) crop boxes, (B,) bool mirror -> (B, 3, S, S) normalised float."""
        return self.transform.normalise(self.transform.crop_flip(images, boxes, flip))

    def __call__(self, files, paths, wheres):
        images = self.decode(files, paths, wheres)
        t = self.transform
        if not t.train:
            return t.normalise(torch.stack([t.geometry(img) for img in images]).float())   # (B, 3, S, S)
        sizes = torch.tensor([img.shape[1:] for img in images])                            # (B, 2) H, W
        boxes = random_crop_boxes(len(images), sizes[:, 0], sizes[:, 1], t.crop_scale)     # (B, 4)
        return self.augment(images, boxes, torch.rand(len(images)) < 0.5)


class DeviceLoader:
    """--loader gpu: iterates a DataLoader of FileBytes batches and decodes + augments each on the device
    (DeviceTransform): yields (x (B, 3, S, S) float on the device, y (B,) labels), as the PIL path's
    DataLoader does. `sampler`: the training ResumableSampler (engine.fit sets its skip) or None."""

    def __init__(self, files, transform, sampler=None):
        self.files, self.transform, self.sampler = files, transform, sampler

    def __len__(self):
        return len(self.files)

    def __iter__(self):
        batches = iter(self.files)                               # now, before engine.fit restores the generator
        return ((self.transform(list(files.split(lengths.tolist())), paths, wheres), y)
                for files, lengths, y, paths, wheres in batches)


def contact_sheet(split, counts, path, per_row=20, cell=48, max_classes=400):
    """One image of each class of `split` (a data.Split) with its count (C,), head (top left) to tail (bottom
    right), as a PNG. More than max_classes classes (iNat's 8,142 would make a 960 x 24,480 px sheet): that many,
    evenly spaced from head to tail."""
    from PIL import ImageDraw
    order = np.argsort(-counts, kind="stable")
    if len(order) > max_classes:
        order = order[np.linspace(0, len(order) - 1, max_classes).round().astype(int)]
    rows = math.ceil(len(order) / per_row)
    sheet = Image.new("RGB", (per_row * cell, rows * (cell + 12)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    first = {int(c): i for i, c in reversed(list(enumerate(split.labels)))}
    for j, c in enumerate(order):
        x, y = (j % per_row) * cell, (j // per_row) * (cell + 12)
        if c in first:
            i = first[c]
            im = (Image.fromarray(split.images[i]) if isinstance(split.images, np.ndarray)
                  else load_rgb(split.images[i], split.lines[i] if split.lines else None))
            sheet.paste(im.resize((cell - 4, cell - 4), Image.NEAREST), (x + 2, y + 2))
        draw.text((x + 2, y + cell - 2), f"{counts[c]}", fill=(0, 0, 0))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    return path
