"""Remake the shapes_lt CLIP stand-in kept in the repository (util/shapes_lt_standin_seed0.pt).

    python -m tools.standin                 # trains seed 0's stand-in (380 steps, shapes_lt.train_clip_standin),
                                            # writes the file and prints the line to put in util/shapes_lt.py

The stand-in is trained as the first run of a stage trains it when the file is missing (shapes_lt.train_clip_standin),
then compacted (shapes_lt.compact_standin): the token rows its captions never use are left out and drawn again from a
fixed seed when the file is read, so the file is about a megabyte instead of thirteen.
"""
import argparse
import os
import tempfile

import torch

from util import shapes_lt
from util.clip_models import context_length, create_clip, tokenize_exact
from util.files import atomic_write


def get_args(argv=None):
    p = argparse.ArgumentParser(description="remake the shapes_lt CLIP stand-in kept in the repository")
    p.add_argument("--out", default=shapes_lt.STANDIN_FILE, help="where to write it (default: the repository's file)")
    p.add_argument("--from-weights", default=None, metavar="PATH", help="compact these trained weights (a state dict "
                   "of shapes_lt.train_clip_standin, seed 0) instead of training them again")
    return p.parse_args(argv)


def caption_tokens(seed, model, n_pairs=20000):
    """The tokens of the captions the stand-in trains on (shapes_lt.shapes_caption_pairs' defaults)."""
    _, captions = shapes_lt.shapes_caption_pairs(n_pairs, seed, model.visual.image_size[0])
    return torch.unique(tokenize_exact(sorted(set(captions)), context_length(model))[0]).tolist()


def main(argv=None):
    args = get_args(argv)
    seed = 0
    torch.manual_seed(seed)
    model = create_clip("shapes-tiny", 32)
    path = args.from_weights
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), "standin.pt")
        shapes_lt.train_clip_standin(model, path, seed, "cpu")
    sd = torch.load(path, weights_only=True)
    blob = shapes_lt.compact_standin(sd, caption_tokens(seed, model), seed)
    atomic_write(args.out, lambda f: torch.save(blob, f))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB, {len(blob['token_rows'])} token rows kept); "
          f"in util/shapes_lt.py set\nSTANDIN_SHA256 = \"{shapes_lt.file_sha256(args.out)}\"")


if __name__ == "__main__":
    main()
