"""Command-line flags: the parser every script uses, and the range of every number a flag takes.

A numeric flag declares its range where it is declared, as its type:

    p.add_argument("--batch", type=flags.count, default=None, ...)

so a bad value stops at parse time with one line that names the flag, the value and the range,

    error: argument --batch: 0 is out of range: an integer >= 1

and never reaches torch (a batch of -5 fails deep inside the DataLoader, a negative lr inside AdamW) or, worse, a
run that goes on with it (lam 2 trains the student away from its teacher; -1 epochs writes an untrained model as
finished). Where 0 means "off" (--save-every, --clip-grad, --stop-after-steps) 0 is inside the range and the help
says so. No value means "the default": a flag whose default comes from elsewhere (data.DATASETS) defaults to None
and data.fill_defaults fills in only None.

The types live here, in one small file whose only concern is flags, so that a flag added later picks one of them
(or makes its own with Range); tests/test_flags.py walks every script's parser and fails on a numeric flag
declared without a range. The image size also has to fit the backbone, which is known only after parsing:
check_image_size, called by data.fill_defaults.

This file imports only the standard library at its top (the rest where it is used), so that tools/gpu_check.py,
which runs before open_clip may be installed, parses its flags with it too.
"""
import argparse
import math


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, a value out of range, an unknown choice) end as every other
    error of a stage does: one line "error: ...", exit status 2 (util.errors.fail), not the usage block (--help
    prints that)."""

    def error(self, message):
        from util.errors import fail
        fail(message)


class Range:
    """A flag's type: the text read as `kind` (int or float) and accepted when it lies in [lo, hi], a bound left
    out when None, open where lo_open / hi_open. Floats must be finite. The range reads in the error message and
    in tests/test_flags.py: str(Range(int, 1)) is "an integer >= 1"."""

    def __init__(self, kind, lo=None, hi=None, lo_open=False, hi_open=False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__                    # argparse names a type by it in its own messages

    def __call__(self, text):
        noun = "an integer" if self.kind is int else "a number"
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; expected {self}")
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {self}")
        return value

    def contains(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def __str__(self):
        noun = "an integer" if self.kind is int else "a number"
        lo, hi = (f"{x:g}" if isinstance(x, float) else f"{x}" for x in (self.lo, self.hi))   # 4294967295 in full
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {hi}"
        return "a finite number" if self.kind is float else noun

    def __repr__(self):
        return f"Range({str(self)!r})"


# The ranges the scripts' flags use. A count is how many of something (epochs, batch, M, k, accumulation steps).
count = Range(int, 1)
count_or_zero = Range(int, 0)                  # loader workers; a count where 0 means none or "off" (its help says)
positive = Range(float, 0, lo_open=True)       # learning rate, temperature tau, seconds
non_negative = Range(float, 0)                 # weight decay, warm-up epochs; minutes or a norm where 0 is "off"
unit_interval = Range(float, 0, 1)             # a weight between two terms: lam of Eq. (8), alpha of Eq. (7)
seed = Range(int, 0, 2 ** 32 - 1)              # numpy's seeds are 32-bit and not negative
image_size = count                             # and a multiple of the backbone's stride: check_image_size


def backbone_stride(backbone):
    """The step, in pixels, by which the backbone's input size may grow: the patch size of a ViT (its patch grid must
    tile the image), 32 for a ResNet (five halvings before the attention pool, whose position embedding is made
    for size / 32); None when open_clip's config does not tell (a timm tower), so only positivity is checked."""
    import open_clip
    from util.clip_models import TINY_CLIP
    if backbone == "shapes-tiny":
        return TINY_CLIP["vision_cfg"]["patch_size"]
    vision = (open_clip.get_model_config(backbone) or {}).get("vision_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)):      # ModifiedResNet: layers per stage
        return 32
    return vision.get("patch_size")


def check_image_size(size, backbone):
    """--image-size must be a multiple of the backbone's stride (backbone_stride): refused in one line otherwise."""
    from util.errors import DataError
    stride = backbone_stride(backbone)
    if stride and size % stride:
        below, above = size - size % stride, size - size % stride + stride
        raise DataError(f"--image-size {size} does not fit --backbone {backbone}: it takes multiples of {stride} "
                        f"(e.g. {below or stride} or {above})")
