"""Speed of the VL-LTR code paths in one run, side by side; BENCHMARKS.md holds the results.

    python bench.py --backbone shapes-tiny --device cpu      # about a minute on a 2-core CPU
    python bench.py --backbone RN50 --batch 256              # one GPU; likewise --backbone ViT-B-16 (add --compile)

1. One CVLP step (student image + text forward and backward, frozen teacher forward, Eq. 2, 3, 8, AdamW):
   plain = open_clip's full-context text forward and the teacher's text forward every step;
   fast = cvlp.py's path: the batch's sentences in 4 length groups, each cut to its own longest sentence
   (clip_models.encode_text_trimmed), the teacher's text looked up in a cache made once (clip_models.encode_texts),
   + torch.compile of both image encoders with --compile.
   Both in bf16 autocast with fused AdamW on CUDA, fp32 on a CPU. Samples/s, ms/step, peak memory, achieved
   TFLOP/s (torch.utils.flop_counter, counted once per path) and the loss difference on the same batch.
2. The loader: data.make_loader with args.loader "pil" (decode and augment in worker processes) or "gpu"
   (workers read JPEG bytes; decode and augment on args.device), over generated ImageNet-sized JPEGs.
3. AnSS: embedding S sentences (full vs trimmed, length-sorted) and scoring them (anss.anchor_scores)
   against N' images, in fp32 as anss.py embeds them (engine.eval_precision).
4. Inference of the LGR head (C classes, M = 64 anchors) against the FC head: latency at batch 1,
   throughput at batch 256 (paper Sec. 4.4: 1.3 ms vs 1.1 ms per image), in fp32 as evaluate.py runs them.
5. One training step of the LGR head alone (forward, Eq. 9, backward), batch 128: plain = Eq. (4)-(7) as
   written (lgr.lgr_head_plain: K = W_k LN(E^T) and G (B, C, D) in every step), cheap = LGRHead.forward (the
   same values and gradients from the anchor side made once). ms/step, peak memory, GFLOP. The dataset shapes:
       prlimit --as=$((16 << 30)) python bench.py --backbone shapes-tiny --device cpu --loaders \
           --head-shapes imagenet_lt inat2018 inat2018_vit      # the plain form at iNat needs ~33 GiB: --head-batch 16

Synthetic data and random weights (clip_models.create_clip): nothing is downloaded, and speed does not depend
on the weights. Timings are medians after warm-up iterations, with torch.cuda.synchronize() on CUDA.
"""
import argparse
import copy
import ctypes
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import clip_models
import cvlp
import data
import engine
import images
import lgr
from anss import anchor_scores

SECTIONS = ("cvlp", "loader", "anss", "heads", "head-step")
PATHS = ("plain", "fast", "fast+compile")
# (C, D) of the LGR heads timed in section 5; M = 64 anchors. D: RN50 1024, ViT-B/16 512.
HEAD_SHAPES = {"imagenet_lt": (1000, 1024), "inat2018": (8142, 1024), "inat2018_vit": (8142, 512)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VL-LTR benchmarks: CVLP step plain vs fast, loader, AnSS, LGR head")
    p.add_argument("--backbone", default="RN50", help="RN50 | ViT-B-16 | shapes-tiny (random weights)")
    p.add_argument("--image-size", type=int, default=None, help="default 224; 32 for shapes-tiny")
    p.add_argument("--batch", type=int, default=256, help="CVLP batch (Sec. 4.3: 256) and loader batch")
    p.add_argument("--steps", type=int, default=None, help="timed CVLP steps per path (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compiling included (default 3 CUDA, 1 CPU)")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                   help="which sections to run (default all): cvlp loader anss heads head-step")
    p.add_argument("--paths", nargs="*", default=None, choices=PATHS,
                   help="CVLP step paths to time (default plain fast; with --compile plain fast+compile)")
    p.add_argument("--compile", action="store_true", help="the fast path also torch.compiles the image encoders")
    p.add_argument("--profile", action="store_true", help="after timing, torch.profiler over 3 steps of the last "
                   "path: the operators that take the most device time")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file, after "
                   "each section (a run cut short keeps what it measured)")
    p.add_argument("--loaders", nargs="*", default=["pil", "gpu"], help="loaders to time (none: skip the section)")
    p.add_argument("--loader-batches", type=int, default=None, help="batches per loader (default 20 CUDA, 4 CPU)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count()), help="loader processes")
    p.add_argument("--anss-sentences", type=int, default=None,
                   help="sentences to embed and score (default 127000 = ImageNet-LT's wiki corpus on CUDA; 4096 CPU)")
    p.add_argument("--anss-images", type=int, default=None,
                   help="images in I' (default 50000 = 50 per class x 1000 on CUDA; 2048 CPU)")
    p.add_argument("--classes", type=int, default=1000, help="C for AnSS and the heads (ImageNet-LT: 1000)")
    p.add_argument("--head-shapes", nargs="*", default=["run"], choices=["run", *HEAD_SHAPES],
                   help="LGR head training step, plain Eq. 4-7 vs LGRHead.forward, at these (C, D): run = --classes and "
                   "the backbone's D; imagenet_lt 1000, 1024; inat2018 8142, 1024 (RN50); inat2018_vit 8142, 512 "
                   "(ViT-B/16); none: skip the section")
    p.add_argument("--head-batch", type=int, default=128, help="batch of the LGR head step (Sec. 4.3: 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's; 1 on a shared machine "
                   "keeps many-small-op paths from stalling on preempted threads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.paths = args.paths or ["plain", "fast+compile" if args.compile else "fast"]
    cuda = str(args.device).startswith("cuda")
    args.image_size = args.image_size or (32 if args.backbone == "shapes-tiny" else 224)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.loader_batches = args.loader_batches or (20 if cuda else 4)
    args.anss_sentences = args.anss_sentences or (127000 if cuda else 4096)
    args.anss_images = args.anss_images or (50000 if cuda else 2048)
    return args


# ----------------------------------------------------------------------------------------------
# Measuring


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device, repeat, warmup=1):
    """Median wall time of fn() over `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device):
    """(result of fn(), peak memory in GiB, how it was measured). CUDA: torch.cuda.max_memory_allocated.
    CPU (best effort): the growth of the process's resident set, sampled every millisecond from /proc, after
    glibc's malloc_trim hands the memory that earlier work freed back to the system."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        return out, torch.cuda.max_memory_allocated() / 2**30, "max_memory_allocated"
    page, statm = os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    if not os.path.exists(statm):
        return fn(), float("nan"), "n/a"
    rss = lambda: int(open(statm).read().split()[1]) * page
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    return out, (max(peak[0], rss()) - start) / 2**30, "RSS growth"


def row(name, *values):
    print(f"  {name:<34}" + "".join(f"{v:>16}" for v in values))


# ----------------------------------------------------------------------------------------------
# Synthetic inputs


def synthetic_sentences(n, context, generator):
    """(n, context) int32 tokens: SOT, random words, EOT, zero padding. Lengths (SOT and EOT included) are
    log-normal with mean 29 and s.d. 15 tokens (ImageNet-LT's wiki sentences average 29 tokens, paper
    Table 7; the spread is our assumption), cut at the context as the tokenizer cuts."""
    sigma2 = np.log(1 + (15 / 29) ** 2)
    lengths = np.exp(np.log(29) - sigma2 / 2 + np.sqrt(sigma2) * torch.randn(n, generator=generator).numpy())
    lengths = np.clip(np.round(lengths), 3, context).astype(int)
    tokens = torch.randint(1, 49000, (n, context), generator=generator, dtype=torch.int32)
    tokens[torch.arange(context)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
    tokens[:, 0] = 49406
    tokens[torch.arange(n), torch.from_numpy(lengths - 1)] = 49407
    return tokens


def text_positions(T, groups=1):
    """Positions per sentence the text tower runs: each of `groups` length groups cut to its longest sentence."""
    lengths = (T.argmax(dim=-1) + 1).sort().values               # (N,)
    return sum(len(g) * int(g.max()) for g in lengths.chunk(groups)) / len(lengths)


def write_jpegs(folder, n, seed):
    """n ImageNet-sized JPEGs (500 x 375, quality 90): smooth random colour fields plus noise, which compress
    and decode like photographs rather than like pure noise."""
    from PIL import Image

    def one(i):
        rng = np.random.default_rng(seed + i)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        path = os.path.join(folder, f"{i:05d}.JPEG")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        return path

    with ThreadPoolExecutor() as pool:
        return list(pool.map(one, range(n)))


# ----------------------------------------------------------------------------------------------
# 1. One CVLP step, plain and fast


def plain_loss(student, teacher, x, y, T, lam=0.5):
    """Eq. (1)-(3), (8) as a plain open_clip port computes them: every text forward over the full context,
    the frozen teacher's text forward in every step. T (N, L) tokens on the device."""
    S = cvlp.cosine_similarity_matrix(student.encode_image(x).float(), student.encode_text(T).float())   # (N, N)
    tau = 1 / student.logit_scale.exp().clamp(max=100)
    with torch.no_grad():
        S_t = cvlp.cosine_similarity_matrix(teacher.encode_image(x).float(), teacher.encode_text(T).float())
    L_ccl, L_dis = cvlp.class_wise_contrastive_loss(S, y, y, tau), cvlp.distillation_loss(S, S_t, tau)
    return cvlp.pretraining_loss(L_ccl, L_dis, lam)


def cvlp_step_bench(args, student0, teacher, x, y, k, corpus, done=lambda results: None):
    """Each of args.paths from the same initial weights (student0, teacher on the CPU: only the path being timed
    is on the device). Returns {path: {measure: value}}; done(results) is called after each path."""
    on_device = lambda model: copy.deepcopy(model).to(args.device)
    frozen = on_device(teacher)
    cache = clip_models.encode_texts(frozen, corpus, args.device, training_precision=True)   # the fast path's teacher
                                                                                             # text, made once (S, D)
    T_device = corpus[k].long().to(args.device)
    loss_args = argparse.Namespace(lam=0.5, variant="paper")
    plain = lambda s, t: plain_loss(s, t, x, y, T_device)
    fast = lambda s, t: cvlp.cvlp_loss(s, t, x, y, corpus[k], loss_args, cache[k.to(args.device)])[0]
    losses = {"plain": plain, "fast": fast, "fast+compile": fast}
    student = on_device(student0)
    with torch.no_grad(), engine.autocast(args.device):          # the losses on the same weights and batch
        values = {name: losses[name](student, frozen).float().item() for name in args.paths}
    del student, frozen

    def run_path(name):
        student, frozen = on_device(student0), on_device(teacher)
        opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.05,
                                fused=str(args.device).startswith("cuda"))

        def step():
            with engine.autocast(args.device):
                loss = losses[name](student, frozen)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as counter:          # forward + backward, counted once, uncompiled
            step()
        if name == "fast+compile":
            student.visual.compile()
            frozen.visual.compile()
        t0 = time.perf_counter()
        seconds = median_seconds(step, args.device, args.steps, args.warmup)
        first = time.perf_counter() - t0 - seconds * args.steps   # the warm-up steps: compiling, for fast+compile
        if args.profile and name == args.paths[-1]:
            profile_steps(step, args.device)
        return seconds, counter.get_total_flops(), first

    results = {}
    for name in args.paths:
        (seconds, flop, warmup_s), peak, how = peak_memory(lambda: run_path(name), args.device)
        results[name] = {"seconds": seconds, "samples_s": args.batch / seconds, "peak_gib": peak, "memory": how,
                         "flop": flop, "tflop_s": flop / seconds / 1e12, "warmup_s": warmup_s, "loss": values[name]}
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
        done(results)
    return results


def profile_steps(step, device, steps=3, rows=15):
    """torch.profiler over `steps` steps: the operators that take the most time on the device (on a CPU, of
    the CPU), printed as a table; where a step's time goes when a target is missed."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"\n  profile of {steps} steps, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


# ----------------------------------------------------------------------------------------------
# 2. The loader


def loader_bench(args, kind, split):
    """Images/s of data.make_loader with args.loader = kind, training transform at 224 px, timed from the
    first batch (worker start-up excluded) to the last on the device."""
    transform = images.make_transform(224, **clip_models.clip_preprocess(args.backbone), train=True)
    load_args = argparse.Namespace(batch=args.batch, workers=args.workers, device=args.device, loader=kind)
    loader = data.make_loader(split, transform, load_args, sampling="instance", generator=torch.Generator().manual_seed(0))
    if (kind == "gpu" and type(getattr(loader, "dataset", None)) is images.ImageDataset
            and loader.dataset.transform is transform):
        return None                                              # a checkout whose make_loader has no GPU path
    batches = iter(loader)
    x, _ = next(batches)
    x.to(args.device)
    sync(args.device)
    t0, n = time.perf_counter(), 0
    for x, _ in batches:
        x = x.to(args.device, non_blocking=True)                 # the "gpu" loader's x is there already
        n += len(x)
    sync(args.device)
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# 3. AnSS


def full_text_embeddings(model, tokens, device, batch=1024):
    """The plain way: open_clip's encode_text over the full context, chunks in corpus order, in AnSS's fp32."""
    out = []
    with torch.no_grad(), engine.eval_precision(device):
        for i in range(0, len(tokens), batch):
            out.append(F.normalize(model.encode_text(tokens[i:i + batch].long().to(device)).float(), dim=-1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# 4. LGR head vs FC head


def head_bench(args, visual, D):
    """{head: {"latency_ms": batch 1, "img_s": batch 256}} for the whole Recognizer and the head alone."""
    g = torch.Generator().manual_seed(args.seed)
    anchors = F.normalize(torch.randn(args.classes, 64, D, generator=g), dim=-1)   # (C, M, D)
    mask = torch.ones(args.classes, 64, dtype=torch.bool)
    out = {}
    for head in ("fc", "lgr"):
        model = lgr.Recognizer(visual, D, args.classes, head, anchors=anchors, mask=mask).to(args.device).eval()
        head_only = lambda E: (model.head(E) if head == "fc" else   # as Recognizer.forward calls it
                               model.head(E, model.anchors, model.mask, model.anchor_side()))
        for batch in (1, 256):
            x = torch.randn(batch, 3, args.image_size, args.image_size, device=args.device)
            E = torch.randn(batch, D, device=args.device)
            with torch.no_grad(), engine.eval_precision(args.device):   # as evaluate.py runs the heads
                t_model = median_seconds(lambda: model(x), args.device, repeat=20 if batch == 1 else 3, warmup=2)
                t_head = median_seconds(lambda: head_only(E), args.device, repeat=20 if batch == 1 else 3, warmup=2)
            out[head, batch] = (t_model, t_head)
    return out


# ----------------------------------------------------------------------------------------------
# 5. The LGR head in a training step: the plain Eq. (4)-(7) against LGRHead.forward

def head_step_inputs(C, D, B, device, M=64):
    """A fresh LGRHead, random unit anchors E^T (C, M, D) with half the anchors of every fourth class padded,
    E^I (B, D) that wants a gradient (the visual encoder is fine-tuned) and labels (B,), all on `device`
    (the meta device too: shapes only)."""
    head = lgr.LGRHead(D, C).to(device)
    anchors = F.normalize(torch.randn(C, M, D, device=device), dim=-1)
    mask = torch.ones(C, M, dtype=torch.bool, device=device)
    mask[::4, M // 2:] = False
    E_I = torch.randn(B, D, device=device).requires_grad_()
    return head, anchors, mask, E_I, torch.randint(0, C, (B,), device=device)


def head_step(form, head, anchors, mask, E_I, y, anchor_side):
    """One training step of the head alone: forward, Eq. (9), backward into the head and E^I. Both forms in fp32:
    LGRHead.forward runs in fp32 also under lgr.py's bf16 autocast, and plain_head_memory_gib counts fp32."""
    if form == "plain":
        logits_I, logits_T, _ = lgr.lgr_head_plain(head, E_I, anchors, mask)
    else:
        logits_I, logits_T, _ = head(E_I, anchors, mask, anchor_side)
    lgr.recognition_loss(logits_I, logits_T, y).backward()
    head.zero_grad(set_to_none=True)
    E_I.grad = None


def plain_head_memory_gib(B, C, D, M=64):
    """lgr_head_plain's peak in a training step worked out from the shapes, fp32: LN(E^T) and K, (C, M, D) each,
    and about 7 (B, C, D): G, F.cosine_similarity's normalised copies and their gradients. (The 7: CPU RSS
    growth at C 1000, D 1024, B 32 and 128, and C 8142, D 512, B 16, agrees within 5%.)"""
    return (2 * C * M * D + 7 * B * C * D) * 4 / 2**30


def head_step_bench(args, C, D, B):
    """{form: {measure: value}} for head_step, plain and cheap, at C classes, width D, batch B. The cheap
    form's anchor side is made once first (Recognizer's buffers), timed apart. GFLOP: the matmuls of one step,
    counted on the meta device (no memory). A form that runs out of memory gets None for time and memory."""
    out = {}
    for form in ("plain", "cheap"):
        head, anchors, mask, E_I, y = head_step_inputs(C, D, B, "meta")
        anchor_side = head.anchor_side(anchors) if form == "cheap" else None
        with FlopCounterMode(display=False) as counter:
            head_step(form, head, anchors, mask, E_I, y, anchor_side)
        out[form] = {"flop": counter.get_total_flops(), "seconds": None, "peak_gib": None, "once": None}
        try:
            head, anchors, mask, E_I, y = head_step_inputs(C, D, B, args.device)
            if form == "cheap":                                  # made once: timed apart from the step
                t0 = time.perf_counter()
                with torch.no_grad():
                    anchor_side = head.anchor_side(anchors)
                sync(args.device)
                out[form]["once"] = time.perf_counter() - t0
            step = lambda: head_step(form, head, anchors, mask, E_I, y, anchor_side)
            seconds = median_seconds(step, args.device, args.steps, args.warmup)
            _, peak, _ = peak_memory(step, args.device)
            out[form].update(seconds=seconds, peak_gib=peak)
        except (MemoryError, RuntimeError) as e:                 # CUDA's OutOfMemoryError is a RuntimeError
            if not engine.out_of_memory(e):
                raise
        head = anchors = mask = E_I = y = step = None       # free the inputs before the next form
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    name = (torch.cuda.get_device_name() if cuda else f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads, "
            f"load average {os.getloadavg()[0]:.1f})")
    print(f"bench: {args.backbone} {args.image_size} px, batch {args.batch}, {name}, torch {torch.__version__}, "
          f"{'bf16 autocast, fused AdamW' if cuda else 'fp32'}")
    record = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
              "args": {k: v for k, v in vars(args).items() if k != "json"}}

    def save(section, value):                                    # --json: every number so far, after each section
        record[section] = value
        if args.json:
            engine.atomic_write(args.json, lambda f: f.write(json.dumps(record, indent=1, default=str)), "w")

    student0 = clip_models.create_clip(args.backbone, args.image_size)                 # on the CPU until used
    teacher = copy.deepcopy(student0).eval().requires_grad_(False)
    with torch.no_grad():                                        # a teacher unlike the student, as after training
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    D, context = student0.text_projection.shape[1], clip_models.context_length(student0)
    g = torch.Generator().manual_seed(args.seed)

    # 1. One CVLP step
    if "cvlp" in args.sections:
        corpus = synthetic_sentences(max(4096, 4 * args.batch), context, g)          # (S, L)
        k = torch.randint(0, len(corpus), (args.batch,), generator=g)                # (N,) one sentence per image
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(args.device)
        y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
        res = cvlp_step_bench(args, student0, teacher, x, y, k, corpus, lambda r: save("cvlp", r))
        print(f"\n1. CVLP step: student image+text fwd+bwd, teacher fwd, Eq. 2+3+8, AdamW "
              f"(median of {args.steps} steps after {args.warmup})")
        row("", *res)
        row("samples/s", *(f"{r['samples_s']:.0f}" for r in res.values()))
        row("ms/step", *(f"{1e3 * r['seconds']:.1f}" for r in res.values()))
        row(f"peak memory GiB ({next(iter(res.values()))['memory']})", *(f"{r['peak_gib']:.2f}" for r in res.values()))
        row("GFLOP/step (flop_counter)", *(f"{r['flop'] / 1e9:.1f}" for r in res.values()))
        row("achieved TFLOP/s", *(f"{r['tflop_s']:.3f}" for r in res.values()))
        row("warm-up steps (compiling), s", *(f"{r['warmup_s']:.1f}" for r in res.values()))
        row("text positions per sentence", *(f"{context}" if p == "plain" else f"{text_positions(corpus[k], groups=4):.1f}"
                                             for p in res))
        print(f"  (sentence lengths: mean {text_positions(corpus[k], len(k)):.1f} tokens; the longest in the batch "
              f"{text_positions(corpus[k]):.0f}; cvlp.py runs 4 length groups)")
        row("L_pre on the same batch", *(f"{r['loss']:.6f}" for r in res.values()))
        if "plain" in res and len(res) > 1:
            print(f"  |L_pre plain - fast| = {abs(res['plain']['loss'] - list(res.values())[-1]['loss']):.2e}")

    # 2. The loader
    if "loader" in args.sections and args.loaders:
        n = args.loader_batches * args.batch
        rates = {}
        with tempfile.TemporaryDirectory() as folder:
            paths = write_jpegs(folder, min(n, 512), args.seed)   # distinct files; the list cycles through them
            split = data.Split([paths[i % len(paths)] for i in range(n)], np.arange(n) % args.classes)
            print(f"\n2. Loader: {n} images ({len(paths)} distinct 500x375 JPEGs, quality 90) -> 224 px training "
                  f"crops on {args.device}, batch {args.batch}, {args.workers} workers")
            for kind in args.loaders:
                rates[kind] = rate = loader_bench(args, kind, split)
                row(f"--loader {kind}", "not available" if rate is None else f"{rate:.0f} img/s")
                save("loader", {"images_s": rates, "images": n, "workers": args.workers})

    student0 = student0.to(args.device)
    # 3. AnSS
    if "anss" in args.sections:
        S, N = args.anss_sentences, args.anss_images
        sentences = synthetic_sentences(S, context, g)
        t_full = median_seconds(lambda: full_text_embeddings(student0, sentences, args.device), args.device, 1, 0)
        t_trim = median_seconds(lambda: clip_models.encode_texts(student0, sentences, args.device), args.device, 1, 0)
        E_T = clip_models.encode_texts(student0, sentences, args.device)                         # (S, D)
        E_I = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(args.device)           # (N', D)
        y_I = (torch.arange(N) % args.classes).to(args.device)
        t = torch.randint(0, args.classes, (S,), generator=g).to(args.device)
        t_score = median_seconds(lambda: anchor_scores(E_I, y_I, E_T, t, 0.01, args.classes), args.device, 3)
        print(f"\n3. AnSS: {S} sentences, {N} images, D {D}, {args.classes} classes")
        row("", "full text", "trimmed text")
        row("embed the sentences, s", f"{t_full:.2f}", f"{t_trim:.2f}")
        row("score them (anchor_scores), s", f"{t_score:.2f}", "")
        save("anss", {"sentences": S, "images": N, "embed_full_s": t_full, "embed_trimmed_s": t_trim, "score_s": t_score})

    # 4. LGR head vs FC head
    if "heads" in args.sections:
        res = head_bench(args, student0.visual, D)
        print(f"\n4. Inference: visual encoder + head, {args.classes} classes, M = 64 anchors (paper: LGR 1.3 ms, FC 1.1 ms)")
        row("", "FC head", "LGR head")
        row("batch 1 latency, ms", *(f"{1e3 * res[h, 1][0]:.2f}" for h in ("fc", "lgr")))
        row("batch 256 throughput, img/s", *(f"{256 / res[h, 256][0]:.0f}" for h in ("fc", "lgr")))
        row("head alone: batch 1 latency, ms", *(f"{1e3 * res[h, 1][1]:.3f}" for h in ("fc", "lgr")))
        row("head alone: batch 256, ms", *(f"{1e3 * res[h, 256][1]:.2f}" for h in ("fc", "lgr")))
        save("heads", {h: {"latency_ms": 1e3 * res[h, 1][0], "images_s_256": 256 / res[h, 256][0],
                           "head_latency_ms": 1e3 * res[h, 1][1], "head_ms_256": 1e3 * res[h, 256][1]}
                       for h in ("fc", "lgr")})

    # 5. The LGR head in a training step
    if "head-step" in args.sections and args.head_shapes:
        print(f"\n5. LGR head training step (forward, Eq. 9, backward into the head and E^I), batch {args.head_batch}, "
              f"M = 64, median of {args.steps} after {args.warmup}\n   plain = Eq. 4-7 as written (lgr.lgr_head_plain), "
              f"cheap = LGRHead.forward on the anchor side made once")
        shown = lambda v, fmt: "out of memory" if v is None else fmt.format(v)
        ms = lambda seconds: None if seconds is None else 1e3 * seconds
        steps = {}
        for name in args.head_shapes:
            C, D_head = HEAD_SHAPES.get(name, (args.classes, D))
            steps[name] = res = head_step_bench(args, C, D_head, args.head_batch)
            row(f"{name}: C {C}, D {D_head}", "plain", "cheap")
            row("ms/step", *(shown(ms(r["seconds"]), "{:.0f}") for r in res.values()))
            row(f"peak memory GiB ({'max_memory_allocated' if cuda else 'RSS growth'})",
                *(shown(r["peak_gib"], "{:.2f}") for r in res.values()))
            row("peak memory worked out, GiB", f"{plain_head_memory_gib(args.head_batch, C, D_head):.1f}", "")
            row("GFLOP/step (matmuls, flop_counter)", *(f"{r['flop'] / 1e9:.1f}" for r in res.values()))
            row("anchor side, made once, ms", "", shown(ms(res["cheap"]["once"]), "{:.0f}"))
            save("head_step", steps)


if __name__ == "__main__":
    main()
