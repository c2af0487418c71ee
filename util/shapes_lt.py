"""shapes_lt, the embedded long-tailed world (docs/design.md §4): generated from a seed, no download.

    python data.py --data shapes_lt          # generates it (a few seconds), prints the summary, writes a contact sheet

100 classes, each a colour x shape composition ("white heart"), 32 px images; ImageNet-LT-like train counts
500 -> 5; training photos taken in sittings of five that share a scene (so a tail class shows one scene);
per class the description sentences, about half informative and half noise, with a ground-truth flag.
`make_world` returns plain arrays and lists; data.py turns them into an LTData like any real dataset.
`--data shapes_lt_coined` is the same world with every class called by a made-up name (`coined_names`).

The world also brings its own CLIP: a small open_clip model trained on image-caption pairs of all 100
compositions (`train_clip_standin`), which stands in for OpenAI's CLIP as initial weights and frozen teacher.
"""
import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from util.clip_models import STANDIN_TAG, clip_preprocess, context_length, tokenize_exact
from util.errors import warn
from util.files import atomic_write
from util.progress import progress

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
CAPTIONS = ["a {c} {s}.", "a photo of a {c} {s}.", "a {s} coloured {c}.", "{c} {s} on a plain background."]  # stand-in's
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]   # coined class names (shapes_lt_coined)
TRAIN_SESSION = 5   # training photos come in sittings of 5 that share a scene; val / test photos do not
PLACES = ["Lisbon", "Kyoto", "Oslo", "Lima", "Cairo", "Perth", "Quebec", "Tartu", "Accra", "Hanoi"]


def shapes_classes(seed):
    """Class c -> (shape index, colour index), head to tail, and the (C,) train counts.

    Counts follow an exponential profile 500 -> 5 (imbalance 100), like ImageNet-LT's Pareto profile.
    The 10 head classes form a Latin diagonal (shape i, colour i), so every single attribute appears
    in a head class: tail classes are new combinations of well-known words (docs/design.md §4).
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
    r = np.hypot(x, y)
    th = np.arctan2(y, x) if shape in ("triangle", "star") else None      # the angle only where a shape needs it
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
            cover = mask.reshape(-1, size, 2, size, 2).sum((2, 4), dtype=np.uint8).astype(np.float32)[..., None] / 4
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
    small CLIP stand-in (docs/design.md §4), like the web pairs CLIP saw. Returns (N, H, W, 3) uint8, [N] str."""
    rng = np.random.default_rng([seed, 2])
    colours = list(COLOURS)
    s_idx, k_idx = rng.integers(len(SHAPES), size=n), rng.integers(len(COLOURS), size=n)
    images = render_shapes(s_idx, k_idx, rng, size)
    captions = [CAPTIONS[rng.integers(len(CAPTIONS))].format(c=colours[k], s=SHAPES[s]) for s, k in zip(s_idx, k_idx)]
    return images, captions


def coined_names(n, seed, context_length=77):
    """n distinct made-up class names of 2-3 syllables ("vizeva", "kigi"), for shapes_lt_coined: the world
    with every class renamed, like iNaturalist's Latin species names that CLIP barely knows. A
    candidate is refused when one of its BPE tokens occurs in the stand-in's captions (CAPTIONS over every
    colour and shape), so the CLIP stand-in never read any piece of a name; the description sentences, which
    speak of colour and shape, are then the only text that says what a class looks like."""
    rng = np.random.default_rng([seed, 3])
    captions = [f.format(c=c, s=s) for f in CAPTIONS for c in COLOURS for s in SHAPES]
    seen = set(tokenize_exact(captions, context_length)[0].flatten().tolist())    # token ids the stand-in read
    names = []
    while len(names) < n:                                        # candidates drawn and tokenised 4n at a time
        draws = ["".join(SYLLABLES[i] for i in rng.integers(len(SYLLABLES), size=rng.integers(2, 4)))
                 for _ in range(4 * n)]
        for name, tokens in zip(draws, tokenize_exact(draws, context_length)[0]):
            pieces = set(tokens[1:int(tokens.argmax())].tolist())      # between [SOS] and [EOS] (the largest id)
            if len(names) < n and name not in names and not pieces & seen:
                names.append(name)
    return names


def sessions(per_class, size):
    """Scene ids of images listed class by class, (C,) per_class -> (N,): the k-th image of a class is in
    that class's sitting k // size, so a class with `size` images or fewer was photographed in one."""
    per_class = np.asarray(per_class)
    rank = np.arange(per_class.sum()) - np.repeat(np.cumsum(per_class) - per_class, per_class)   # (N,) k
    return np.repeat(np.arange(len(per_class)), per_class) * (per_class.max() // size + 1) + rank // size



def make_world(seed=0, n_val=10, n_test=20, size=32):
    """Generate the whole world in memory (a few seconds on a 2-core CPU): {"classnames": [C] str,
    "descriptions": [C][k] str, "informative": [C][k] bool, "<split>_images": (N, size, size, 3) uint8,
    "<split>_labels": (N,) int64 for split in train, val, test}."""
    combos, counts = shapes_classes(seed)
    colours = list(COLOURS)
    shape_of, colour_of = np.array([s for s, _ in combos]), np.array([k for _, k in combos])
    descriptions, flags = shapes_corpus(combos, seed)
    world = {"classnames": [f"{colours[k]} {SHAPES[s]}" for s, k in combos], "descriptions": descriptions,
             "informative": flags}
    for name, per_class, stream, session_size in (("train", counts, 10, TRAIN_SESSION), ("val", n_val, 11, None),
                                                  ("test", n_test, 12, None)):
        rng = np.random.default_rng([seed, stream])
        labels = np.repeat(np.arange(len(combos)), per_class)
        session = sessions(per_class, session_size) if session_size else None
        world[f"{name}_images"] = render_shapes(shape_of[labels], colour_of[labels], rng, size, session)
        world[f"{name}_labels"] = labels.astype(np.int64)
    return world


def load_world(root, seed):
    """make_world, cached under root as a plain dict of tensors and lists, keyed by generator version and seed."""
    path = os.path.join(root, f"shapes_lt_world_v{SHAPES_VERSION}_seed{seed}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            return {k: v.numpy() if torch.is_tensor(v) else v for k, v in blob.items()}
        except Exception:
            warn(f"cache {path} unreadable, regenerating")
    world = make_world(seed)
    try:
        atomic_write(path, lambda f: torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                                 for k, v in world.items()}, f))
    except OSError as e:   # read-only checkout: fine, the world is regenerated in memory next time
        warn(f"could not cache shapes_lt at {path} ({e.strerror})")
    return world


# ----------------------------------------------------------------------------------------------
# The world's CLIP: a small stand-in for OpenAI's, trained on first use

STANDIN_VERSION = 4   # bump when the stand-in's recipe changes: cached weights are keyed by it and the world's
# Seed 0's stand-in, trained once and kept in the repository (a megabyte: the token rows its captions never use are
# left out), so that the first command does not spend minutes training it. `python -m tools.standin` remakes it and
# prints the hash to write here; a file that does not match is not used (the stand-in is trained instead).
STANDIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes_lt_standin_seed0.pt")
STANDIN_SHA256 = "748cda6ff5b16738ed18ba9777f456691b65726fc76268de0ff53e0407a22b9c"
STANDIN_UNUSED_ROWS_SEED = 0   # the token rows left out of the file are drawn again from N(0, 0.02^2) with this seed


def standin_path(root, seed):
    return os.path.join(root, f"clip_standin_v{SHAPES_VERSION}.{STANDIN_VERSION}_seed{seed}.pt")


def ensure_standin(root, seed, model, device):
    """The path of the world's stand-in weights (a full state dict, cached under root): there already; seed 0's from
    the repository's file (STANDIN_FILE, hash checked); else trained now into `model` (train_clip_standin)."""
    path = standin_path(root, seed)
    if os.path.exists(path):
        return path
    if seed == 0 and os.path.exists(STANDIN_FILE):
        if file_sha256(STANDIN_FILE) == STANDIN_SHA256:
            sd = expand_standin(torch.load(STANDIN_FILE, weights_only=True), model)
            os.makedirs(root, exist_ok=True)
            atomic_write(path, lambda f: torch.save(sd, f))
            return path
        warn(f"{STANDIN_FILE} does not match its hash in util/shapes_lt.py; training the stand-in instead "
             f"(`python -m tools.standin` remakes the file)")
    train_clip_standin(model, path, seed, device)
    return path


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compact_standin(sd, used_tokens, seed):
    """A trained stand-in's state dict -> the repository's file: every tensor but the token embedding, and of the
    token embedding only the rows of `used_tokens` (the tokens of the captions it was trained on; the others were
    never in a batch, so training left them near their random start)."""
    rows = torch.as_tensor(sorted(set(used_tokens)), dtype=torch.long)
    embedding = sd["token_embedding.weight"]
    return {"state": {k: v for k, v in sd.items() if k != "token_embedding.weight"},
            "token_rows": rows, "token_embedding_rows": embedding[rows].clone(), "vocab": embedding.shape[0],
            "seed": seed, "version": f"{SHAPES_VERSION}.{STANDIN_VERSION}"}


def expand_standin(blob, model):
    """The repository's file -> a full state dict for `model`: the stored rows of the token embedding in place, the
    others drawn from N(0, 0.02^2), open_clip's initialisation, with a fixed seed (the same on every machine)."""
    width = blob["token_embedding_rows"].shape[1]
    g = torch.Generator().manual_seed(STANDIN_UNUSED_ROWS_SEED)
    embedding = torch.randn(blob["vocab"], width, generator=g) * 0.02
    embedding[blob["token_rows"]] = blob["token_embedding_rows"]
    sd = {**blob["state"], "token_embedding.weight": embedding}
    model.load_state_dict(sd)                                    # every key, every shape: the file fits the model
    return sd


def clip_loss(E_I, E_T, pair, tau=0.07):
    """CLIP's contrastive loss on N image-caption pairs: E_I (N, D), E_T (N, D), pair (N,) pair ids. The mean
    of the image->text and text->image cross-entropies. Pairs are drawn with replacement, so one pair can sit
    in a batch twice: its copies are positives of each other, each with weight 1/|positives|. That is
    VL-LTR's Eq. (2) with one class per pair, halved (test_equations.py checks it against cvlp.py)."""
    logits = F.normalize(E_I, dim=-1) @ F.normalize(E_T, dim=-1).T / tau          # (N, N)
    pos = (pair[:, None] == pair[None, :]).to(logits.dtype)                       # (N, N)
    image_to_text = -(pos / pos.sum(dim=1, keepdim=True) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(pos / pos.sum(dim=0, keepdim=True) * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (image_to_text + text_to_image) / 2


def train_clip_standin(model, path, seed, device, n_pairs=20000, steps=380, batch=256):
    """Train the small CLIP stand-in on image-caption pairs of the shapes world (docs/design.md §4).

    Instance-wise CLIP training (clip_loss) of the fresh `model`, whose weights are then written to `path`.
    Deliberately short: 380 steps give about 59% zero-shot top-1 on shapes_lt (seed 0, 8 px patches), as OpenAI
    CLIP RN50 gets on ImageNet-LT (59.8%, Table 8); 450 steps gave 64%, and a longer schedule passes 80%.
    No augmentation: every pair is already a fresh random rendering."""
    print(f"training the shapes_lt CLIP stand-in ({steps} steps), cached at {path}")
    g = torch.Generator().manual_seed(seed)
    images, captions = shapes_caption_pairs(n_pairs, seed, model.visual.image_size[0])
    tokens = tokenize_exact(captions, context_length(model))[0]                                  # (n, L)
    preprocess = clip_preprocess("shapes-tiny", STANDIN_TAG)                                    # OpenAI's mean, std
    mean, std = (torch.tensor(preprocess[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)                                       # (n, 3, H, W) uint8
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for step in progress(range(steps), desc="stand-in CLIP", unit="step"):
        idx = torch.randint(len(captions), (batch,), generator=g)
        x = ((pixels[idx].float() / 255 - mean) / std).to(device)
        loss = clip_loss(model.encode_image(x), model.encode_text(tokens[idx].to(device)), idx.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"  stand-in step {step + 1}/{steps}  CLIP loss {loss.item():.3f}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))


def first_images(split, divisor):
    """Each class's first max(1, n_c // divisor) images in the world's order (shapes_lt_small): its first sittings
    of five (the last one maybe cut short), so a head class keeps 10 scenes of 100 and a tail class one photo."""
    counts = np.bincount(split.labels)
    return split.subset(np.concatenate([np.flatnonzero(split.labels == c)[:max(1, n // divisor)]
                                        for c, n in enumerate(counts)]))
