"""Images for VL-LTR: reading any image file, CLIP's augmentation, and the Dataset the loaders draw from.

Train: RandomResizedCrop + horizontal flip; eval: resize + centre crop; both normalised with CLIP's mean
and std (the paper fine-tunes CLIP, so its input statistics). Images held in memory (shapes_lt) are
augmented a whole batch at a time (`Transform.batch`), image files one at a time in the loader's workers.
Which images belong to which split and class is data.py's business.
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from engine import DataError, progress, rank_world


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
            rank, world_size = rank_world()      # torchrun: draw for the global batch, keep this rank's share
            share = slice(rank * len(x), (rank + 1) * len(x))
            boxes = random_crop_boxes(len(x) * world_size, x.shape[-2], x.shape[-1], self.crop_scale)[share]  # (B, 4)
            x = resized_crops(x.float(), boxes, self.size).clamp_(0, 255).round_()             # (B, 3, S, S)
            flip = (torch.rand(len(x) * world_size) < 0.5)[share]
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
