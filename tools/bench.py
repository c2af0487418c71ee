"""Speed of the VL-LTR training and data paths in one run, side by side; BENCHMARKS.md holds the results.
The LGR head against the FC head, and its two forms, are tools/bench_heads.py's.

    python -m tools.bench --backbone shapes-tiny --device cpu     # about a minute on a 2-core CPU
    python -m tools.bench --backbone RN50 --batch 256 --compile   # one GPU; likewise --backbone ViT-B-16
    python -m tools.bench --sections cvlp --paths plain packed+compile --profile --json out.json
    python -m tools.bench --backbone RN50 --narrow --device cpu --sections cvlp --count-ops   # operators per step

1. cvlp: one CVLP step (student image + text forward and backward, frozen teacher forward, Eq. 2, 3, 8, AdamW):
   plain = open_clip's full-context text forward and the teacher's text forward every step;
   fast = the step cvlp.py ran before: the batch's sentences in 4 length groups, each cut to its own longest sentence
   (clip_models.encode_text_trimmed), the teacher's text looked up in a cache made once (clip_models.encode_texts),
   and the training loop's host reads; fast+compile = fast with both image encoders torch.compiled;
   packed = the step cvlp.py runs: the sentences in one packed pass (clip_models.encode_text_packed), no host
   waits, on CUDA the layouts of cvlp.prepare_step; packed+compile = with the whole loss compiled (--compile).
   All in bf16 autocast on CUDA, fp32 on a CPU, fused AdamW on both. Samples/s, ms/step, peak memory, achieved
   TFLOP/s (torch.utils.flop_counter, counted once per path), the first call's time (compiling), operator calls
   per step (--count-ops) and the loss on the same batch (cvlp_step_bench).
2. loader: data.make_loader with args.loader "pil" (decode and augment in worker processes) or "gpu"
   (workers read JPEG bytes; decode and augment on args.device), over generated ImageNet-sized JPEGs.
3. decode: one JPEG decoder against another on the same files, one thread: PIL (the "pil" loader's), TorchCodec
   (the "gpu" loader's, images.decode_jpegs) and torchvision.io (what that loader used before TorchCodec):
   images/s and the largest pixel difference from PIL.
4. anss: embedding S sentences (full vs trimmed, length-sorted) and scoring them (anss.anchor_scores)
   against N' images, in fp32 as anss.py embeds them (engine.eval_precision).

Synthetic data and random weights (clip_models.create_clip): nothing is downloaded, and speed does not depend
on the weights. Timings are medians after warm-up iterations, with torch.cuda.synchronize() on CUDA (the CVLP
step's after each block of 5 steps run in a row, as training runs them: steps_in_a_row).
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
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from anss import anchor_scores
import cvlp
import data
from util import clip_models, engine, flags, images

SECTIONS = ("cvlp", "loader", "decode", "anss")
PATHS = ("plain", "fast", "fast+compile", "packed", "packed+compile")


def common_args(p):
    """The options bench.py and bench_heads.py share: the model, the device, the sizes of a timing, the output."""
    p.add_argument("--backbone", default="RN50", help="RN50 | ViT-B-16 | shapes-tiny (random weights)")
    p.add_argument("--image-size", type=flags.image_size, default=None, help="default 224; 32 for shapes-tiny")
    p.add_argument("--steps", type=flags.count, default=None, help="timed steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=flags.count_or_zero, default=None,
                   help="untimed steps first, compiling included (0: none; default 3 CUDA, 1 CPU)")
    p.add_argument("--classes", type=flags.count, default=1000, help="C (ImageNet-LT: 1000)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file, after "
                   "each section (a run cut short keeps what it measured)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=flags.count, default=None, help="torch CPU threads (default torch's; 1 on a "
                   "shared machine keeps many-small-op paths from stalling on preempted threads)")
    p.add_argument("--seed", type=flags.seed, default=0)


def fill_common(args):
    cuda = str(args.device).startswith("cuda")
    if args.image_size is None:
        args.image_size = 32 if args.backbone == "shapes-tiny" else 64 if getattr(args, "narrow", False) else 224
    if args.steps is None:
        args.steps = 20 if cuda else 3
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR benchmarks: CVLP step plain vs fast, loader, decoders, AnSS")
    common_args(p)
    p.add_argument("--batch", type=flags.count, default=256, help="CVLP batch (Sec. 4.3: 256) and loader batch")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                   help=f"which sections to run (default all): {' '.join(SECTIONS)}")
    p.add_argument("--paths", nargs="*", default=None, choices=PATHS, help="CVLP step paths to time, in this order "
                   "(default plain fast packed; with --compile plain fast+compile packed+compile)")
    p.add_argument("--compile", action="store_true", help="default paths: the compiled ones")
    p.add_argument("--compile-backend", default=None, help="torch.compile's backend for the +compile paths (default "
                   "inductor; aot_eager: the same graphs without inductor's kernels, in seconds on a CPU)")
    p.add_argument("--profile", nargs="*", default=None, metavar="PATH", help="after timing, torch.profiler over 3 steps "
                   "of these paths (alone: the last): the operators that take the most device time")
    p.add_argument("--count-ops", action="store_true", help="also count each path's operator calls per step "
                   "(torch.profiler on the host: count_ops)")
    p.add_argument("--narrow", action="store_true", help="--backbone RN50 / ViT-B-16 at a small width, the same layers "
                   "(narrow_clip; image size default 64): a step's operators on a CPU")
    p.add_argument("--loaders", nargs="*", default=["pil", "gpu"], help="loaders to time (none: skip the section)")
    p.add_argument("--loader-batches", type=flags.count, default=None,
                   help="batches per loader (default 20 CUDA, 4 CPU)")
    p.add_argument("--workers", type=flags.count_or_zero, default=min(16, os.cpu_count()), help="loader processes")
    p.add_argument("--decode-images", type=flags.count, default=200, help="JPEGs each decoder decodes (section decode)")
    p.add_argument("--anss-sentences", type=flags.count, default=None,
                   help="sentences to embed and score (default 127000 = ImageNet-LT's wiki corpus on CUDA; 4096 CPU)")
    p.add_argument("--anss-images", type=flags.count, default=None,
                   help="images in I' (default 50000 = 50 per class x 1000 on CUDA; 2048 CPU)")
    args = fill_common(p.parse_args(argv))
    args.paths = args.paths or (["plain", "fast+compile", "packed+compile"] if args.compile else ["plain", "fast", "packed"])
    if args.profile == []:
        args.profile = args.paths[-1:]
    cuda = str(args.device).startswith("cuda")
    defaults = {"loader_batches": 20 if cuda else 4, "anss_sentences": 127000 if cuda else 4096,
                "anss_images": 50000 if cuda else 2048}
    for k, v in defaults.items():                                # None, never 0, means the default
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
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


def narrow_clip(backbone, image_size=64):
    """`backbone`'s open_clip architecture (RN50, ViT-B-16) at a small width: the same layers, so the same operators
    in a step, for counting them on a CPU and for the tests. RN50: stem width 8 (4 attention-pool heads of 64),
    ViT-B-16: width 64 (2 heads), the text tower: width 64 (2 heads), 12 layers, 77 tokens; D 64; QuickGELU."""
    cfg = copy.deepcopy(open_clip.get_model_config(backbone))
    vision = cfg["vision_cfg"]
    vision.update(image_size=image_size, **({"width": 8} if isinstance(vision["layers"], (list, tuple))
                                             else {"width": 64, "head_width": 32}))
    cfg["text_cfg"].update(width=64, heads=2)
    return open_clip.CLIP(**{**cfg, "embed_dim": 64}, quick_gelu=True)


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
# 1. One CVLP step: plain, fast (the step of before), packed (the step cvlp.py runs)


def plain_loss(student, teacher, x, y, T, lam=0.5):
    """Eq. (1)-(3), (8) as a plain open_clip port computes them: every text forward over the full context,
    the frozen teacher's text forward in every step. T (N, L) tokens on the device."""
    S = cvlp.cosine_similarity_matrix(student.encode_image(x).float(), student.encode_text(T).float())   # (N, N)
    tau = cvlp.temperature(student.logit_scale)
    with torch.no_grad():
        S_t = cvlp.cosine_similarity_matrix(teacher.encode_image(x).float(), teacher.encode_text(T).float())
    L_ccl, L_dis = cvlp.class_wise_contrastive_loss(S, y, y, tau), cvlp.distillation_loss(S, S_t, tau)
    return cvlp.pretraining_loss(L_ccl, L_dis, lam), {}


def read_before_backward(loss, stats):
    """What the training loop of before read on the host ahead of backward(), for its log: loss.item() and each
    logged value (a port of the official code reads loss.item() there too). On a GPU each read waits for the device."""
    return [loss.item()] + [float(v) for v in stats.values()]


def cvlp_step_bench(args, student0, teacher, x, y, corpus, offsets, done=lambda results: None):
    """Each of args.paths from the same initial weights (student0, teacher on the CPU: only the path being timed
    is on the device). x, y: the batch on the device; each step draws its sentences anew from y's classes
    (corpus (S, L) tokens, offsets (C + 1,): class c owns corpus[offsets[c]:offsets[c + 1]]), as cvlp.py does.
    Returns {path: {measure: value}}; done(results) is called after each path.
      plain: plain_loss, and loss.item() before backward;
      fast, fast+compile: the step of before: the labels read back from the device to draw the sentences, their
        rows of the teacher-text cache looked up by indices copied from pageable memory, the text in 4 length groups
        (clip_models.encode_text_trimmed), loss.item() and every logged value read before backward; +compile: both
        image encoders compiled;
      packed, packed+compile: the step cvlp.py runs: cvlp.batch_text (sentences drawn from the host labels, packed,
        copied from pinned memory), cvlp.prepare_step (on CUDA: cuDNN's autotuner, RN50 in channels_last, the
        teacher's weights cast once; +compile: the whole loss compiled), the logged values copied to the host without
        a wait (engine.values_to_host), and fused AdamW told to skip a non-finite step (engine.skip_if_not_finite)."""
    cuda = str(args.device).startswith("cuda")
    on_device = lambda model: copy.deepcopy(model).to(args.device)
    frozen = on_device(teacher)
    cache = clip_models.encode_texts(frozen, corpus, args.device, training_precision=True)   # the teacher's text, (S, D)
    text, y_host = {"tokens": corpus, "offsets": offsets}, y.cpu()
    k = cvlp.sample_sentences(offsets, y_host, torch.Generator().manual_seed(args.seed))      # (N,) for the loss check
    loss_args = argparse.Namespace(lam=0.5, variant="paper", device=args.device, image_size=args.image_size,
                                   compile=False, text_pass="packed")
    g = torch.Generator().manual_seed(args.seed)

    def plain(s, t, compiled):
        T = corpus[cvlp.sample_sentences(offsets, y_host, g)].long().to(args.device)
        return plain_loss(s, t, x, y, T)

    def fast(s, t, compiled):
        k = cvlp.sample_sentences(offsets, y.cpu(), g)
        return cvlp.cvlp_loss(s, t, x, y, corpus[k], loss_args, cache[k.to(args.device)])

    def packed(s, t, compiled):
        T, y_device, E_T_teacher = cvlp.batch_text(s, text, cache, y_host, g, loss_args)
        return (compiled or cvlp.cvlp_loss)(s, t, x, y_device, T, loss_args, E_T_teacher)

    losses = {"plain": plain, "fast": fast, "fast+compile": fast, "packed": packed, "packed+compile": packed}
    T_k = {"plain": corpus[k].long().to(args.device), "fast": corpus[k],     # the loss check's sentences, each path's way
           "packed": clip_models.pack_sentences(corpus[k], args.device)}
    same_batch = {"plain": lambda s, t, compiled: plain_loss(s, t, x, y, T_k["plain"]),
                  "fast": lambda s, t, compiled: cvlp.cvlp_loss(s, t, x, y, T_k["fast"], loss_args, cache[k.to(args.device)]),
                  "packed": lambda s, t, compiled: (compiled or cvlp.cvlp_loss)(s, t, x, y, T_k["packed"], loss_args,
                                                                                cache[k.to(args.device)])}

    def run_path(name):
        torch.backends.cudnn.benchmark = False                   # the paths of before ran without it
        student, frozen = on_device(student0), on_device(teacher)
        opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.05, fused=True)   # CPU too (torch 2.4+)
        new = name.startswith("packed")
        compiled = None
        if new:
            compiled = with_backend(args.compile_backend, cvlp.prepare_step, student, frozen,
                                    argparse.Namespace(**{**vars(loss_args), "compile": name.endswith("+compile")}))

        def step():
            with engine.autocast(args.device):
                loss, stats = losses[name](student, frozen, compiled)
            if new:
                engine.values_to_host({"loss": loss, **stats})
            else:
                read_before_backward(loss, stats)
            loss.backward()
            if new:
                engine.skip_if_not_finite(opt, [loss.detach()])
            opt.step()
            opt.__dict__.pop("found_inf", None)
            opt.zero_grad(set_to_none=True)

        if name.endswith("+compile") and not new:
            for model in (student, frozen):
                model.visual.compile(**({"backend": args.compile_backend} if args.compile_backend else {}))
        t0 = time.perf_counter()
        with engine.autocast(args.device):                       # L_pre on the same weights and sentences as every path;
            loss = same_batch[name.split("+")[0]](student, frozen, compiled)[0].float().item()   # a compiled one compiles
        first_s = time.perf_counter() - t0                       # here (forward and backward graphs), timed
        with FlopCounterMode(display=False) as counter:          # forward + backward, counted once
            with torch.compiler.set_stance("force_eager"):     # uncompiled
                step()
        t0 = time.perf_counter()
        seconds = steps_in_a_row(step, args.device, args.steps, args.warmup)
        warmup_s = time.perf_counter() - t0 - seconds * args.steps
        ops = count_ops(step, args.device) if args.count_ops else None
        if name in (args.profile or []):
            profile_steps(step, args.device, min(3, args.steps))
        return seconds, counter.get_total_flops(), loss, first_s, warmup_s, ops

    results = {}
    for name in args.paths:
        (seconds, flop, loss, first_s, warmup_s, ops), peak, how = peak_memory(lambda: run_path(name), args.device)
        results[name] = {"seconds": seconds, "samples_s": args.batch / seconds, "peak_gib": peak, "memory": how,
                         "flop": flop, "tflop_s": flop / seconds / 1e12, "loss": loss,
                         "first_call_s": first_s, "warmup_s": warmup_s, **({"ops": ops} if ops else {})}
        if cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        done(results)
    torch.backends.cudnn.benchmark = False
    return results


def with_backend(backend, fn, *args):
    """fn(*args) with torch.compile's backend set to `backend` (None: torch's default, inductor)."""
    if not backend:
        return fn(*args)
    real = torch.compile
    torch.compile = lambda f, **k: real(f, **{**k, "backend": backend})
    try:
        return fn(*args)
    finally:
        torch.compile = real


def steps_in_a_row(step, device, steps, warmup=1):
    """Seconds per step, the median of blocks of steps run in a row as training runs them, one sync after each block
    (on CUDA blocks of 5: the host may run ahead of the device within a block, as it can in training; on a CPU,
    where every operation is done when it returns, blocks of 1)."""
    inner = 5 if str(device).startswith("cuda") and steps >= 5 else 1
    return median_seconds(lambda: [step() for _ in range(inner)], device, max(1, steps // inner), warmup) / inner


# Operators that only make a view or an allocation, no kernel: left out of the operator count.
NO_KERNEL = {"aten::" + n for n in ("view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided",
                                    "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes", "chunk",
                                    "unbind", "detach", "alias", "empty", "empty_like", "empty_strided", "resize_",
                                    "lift_fresh", "unflatten", "flatten", "narrow", "diagonal", "contiguous", "numpy_T",
                                    "result_type", "is_nonzero", "set_", "_reshape_alias", "view_as", "expand_as")}


def count_ops(step, device, steps=2):
    """Operator calls per step, from torch.profiler on the host: the aten operators called from Python or by
    autograd's backward, not from inside another operator (a fair proxy for a GPU's kernel launches; an operator that
    only makes a view or an allocation, NO_KERNEL, left out); at every level, the matmuls (mm, addmm, bmm, baddbmm),
    copies (copy_), in-place adds (add_) and convolutions; and the reads of a value on the host outside the optimiser
    (item(), float(t), int(t)), each of which waits for a GPU."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        sync(device)

    def under(e, prefix):
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name.startswith(prefix):
                return True
        return False
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    count = lambda *ops: sum(e.name in ops for e in aten) / steps
    return {"operators": sum(e.name not in NO_KERNEL and not under(e, "aten::") for e in aten) / steps,
            "matmul": count("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
            "copy_": count("aten::copy_"), "add_": count("aten::add_"),
            "convolution": count("aten::convolution", "aten::convolution_backward"),
            "host_reads": sum(e.name == "aten::_local_scalar_dense" and not under(e, "Optimizer.step") for e in aten) / steps}


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
# 3. The JPEG decoders


def decode_bench(n, seed, repeat=3):
    """{decoder: {"images_s", "max_diff", "mean_diff"}}: n ImageNet-sized JPEGs (write_jpegs) decoded to RGB on one
    CPU thread, the files' bytes read beforehand; differences in uint8 levels from PIL's pixels."""
    import io

    from PIL import Image
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, n, seed)
        files = [images.read_bytes(p) for p in paths]            # (n,) uint8 tensors
    blobs = [f.numpy().tobytes() for f in files]

    def torchvision_io():                                        # deprecated since torchvision 0.29: warns each call
        from torchvision.io import ImageReadMode, decode_jpeg
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(files, mode=ImageReadMode.RGB)

    decoders = {"PIL": lambda: [torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                                for b in blobs],
                "TorchCodec": lambda: images.decode_jpegs(files, "cpu"),
                "torchvision.io": torchvision_io}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, out = decoders["PIL"](), {}
        for name, decode in decoders.items():
            seconds = median_seconds(decode, "cpu", repeat)
            diff = torch.stack([(a.int() - b.int()).abs().max() for a, b in zip(decode(), reference)])
            out[name] = {"images_s": n / seconds, "max_diff": int(diff.max()), "mean_diff": float(diff.float().mean())}
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------
# 4. AnSS


def full_text_embeddings(model, tokens, device, batch=1024):
    """The plain way: open_clip's encode_text over the full context, chunks in corpus order, in AnSS's fp32."""
    out = []
    with torch.no_grad(), engine.eval_precision(device):
        for i in range(0, len(tokens), batch):
            out.append(F.normalize(model.encode_text(tokens[i:i + batch].long().to(device)).float(), dim=-1))
    return torch.cat(out)


def start(args, title):
    """Seeds, TF32, threads; prints what runs where; returns save(section, value), which keeps every number of the
    run in `record` and, with --json PATH, writes them there after each section (a run cut short keeps them)."""
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    name = (torch.cuda.get_device_name() if cuda else f"{os.cpu_count()}-core CPU ({torch.get_num_threads()} torch threads, "
            f"load average {os.getloadavg()[0]:.1f})")
    print(f"{title}: {args.backbone} {args.image_size} px, {name}, torch {torch.__version__}, "
          f"{'bf16 autocast, fused AdamW' if cuda else 'fp32'}")
    record = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
              "args": {k: v for k, v in vars(args).items() if k != "json"}}

    def save(section, value):
        record[section] = value
        if args.json:
            engine.atomic_write(args.json, lambda f: f.write(json.dumps(record, indent=1, default=str)), "w")
    return save


def main(argv=None):
    args = get_args(argv)
    save = start(args, f"bench, batch {args.batch}")
    student0 = (narrow_clip(args.backbone, args.image_size) if args.narrow            # on the CPU until used
                else clip_models.create_clip(args.backbone, args.image_size))
    teacher = copy.deepcopy(student0).eval().requires_grad_(False)
    with torch.no_grad():                                        # a teacher unlike the student, as after training
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    D, context = student0.text_projection.shape[1], clip_models.context_length(student0)
    g = torch.Generator().manual_seed(args.seed)

    # 1. One CVLP step
    if "cvlp" in args.sections:
        corpus = synthetic_sentences(max(4096, 4 * args.batch), context, g)          # (S, L)
        offsets = torch.linspace(0, len(corpus), args.classes + 1).round().long()    # (C + 1,) each class's sentences
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(args.device)
        y = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
        res = cvlp_step_bench(args, student0, teacher, x, y, corpus, offsets, lambda r: save("cvlp", r))
        T = corpus[cvlp.sample_sentences(offsets, y.cpu(), torch.Generator().manual_seed(args.seed))]   # (N, L)
        print(f"\n1. CVLP step: student image+text fwd+bwd, teacher fwd, Eq. 2+3+8, AdamW "
              f"(median of {args.steps} steps after {args.warmup}{', in blocks of 5 in a row' if args.steps >= 5 and 'cuda' in str(args.device) else ''})")
        row("", *res)
        row("samples/s", *(f"{r['samples_s']:.0f}" for r in res.values()))
        row("ms/step", *(f"{1e3 * r['seconds']:.1f}" for r in res.values()))
        row(f"peak memory GiB ({next(iter(res.values()))['memory']})", *(f"{r['peak_gib']:.2f}" for r in res.values()))
        row("GFLOP/step (flop_counter)", *(f"{r['flop'] / 1e9:.1f}" for r in res.values()))
        row("achieved TFLOP/s", *(f"{r['tflop_s']:.3f}" for r in res.values()))
        row("first call (compiling), s", *(f"{r['first_call_s']:.1f}" for r in res.values()))
        positions = {"plain": f"{context}", "fast": f"{text_positions(T, groups=4):.1f}", "packed": f"{text_positions(T, len(T)):.1f}"}
        row("text positions per sentence", *(positions[p.split("+")[0]] for p in res))
        print(f"  (sentence lengths: mean {text_positions(T, len(T)):.1f} tokens; the longest in the batch "
              f"{text_positions(T):.0f}; fast: 4 length groups; packed: every sentence to its EOT, one pass)")
        for key in ("operators", "matmul", "copy_", "add_", "convolution", "host_reads"):
            if any("ops" in r for r in res.values()):
                row(f"{key} per step (profiler)", *(f"{r['ops'][key]:.0f}" if "ops" in r else "" for r in res.values()))
        row("L_pre on the same batch", *(f"{r['loss']:.6f}" for r in res.values()))
        if "plain" in res and len(res) > 1:
            print("  |L_pre plain - other| = " + ", ".join(f"{p} {abs(res['plain']['loss'] - r['loss']):.2e}"
                                                       for p, r in res.items() if p != "plain"))

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

    # 3. The JPEG decoders
    if "decode" in args.sections:
        res = decode_bench(args.decode_images, args.seed)
        print(f"\n3. JPEG decoding: {args.decode_images} distinct 500x375 JPEGs (quality 90) to RGB, one CPU thread")
        row("", "images/s", "max diff to PIL", "mean")
        for name, r in res.items():
            row(name, f"{r['images_s']:.0f}", f"{r['max_diff']}", f"{r['mean_diff']:.2f}")
        save("decode", res)

    student0 = student0.to(args.device)
    # 4. AnSS
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
        print(f"\n4. AnSS: {S} sentences, {N} images, D {D}, {args.classes} classes")
        row("", "full text", "trimmed text")
        row("embed the sentences, s", f"{t_full:.2f}", f"{t_trim:.2f}")
        row("score them (anchor_scores), s", f"{t_score:.2f}", "")
        save("anss", {"sentences": S, "images": N, "embed_full_s": t_full, "embed_trimmed_s": t_trim, "score_s": t_score})


if __name__ == "__main__":
    main()
