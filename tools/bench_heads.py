"""Speed of the LGR head, in one run: against the FC head at inference, and its two forms in a training step;
BENCHMARKS.md holds the results. The training and data paths are tools/bench.py's.

    python -m tools.bench_heads --backbone shapes-tiny --device cpu
    python -m tools.bench_heads --backbone RN50 --head-shapes imagenet_lt inat2018 inat2018_vit     # one GPU

1. heads: inference of the LGR head (C classes, M = 64 anchors) against the FC head: latency at batch 1,
   throughput at batch 256 (paper Sec. 4.4: 1.3 ms vs 1.1 ms per image), in fp32 as evaluate.py runs them.
2. head-step: one training step of the LGR head alone (forward, Eq. 9, backward), batch 128, in its two forms:
   paper = Eq. (4)-(7) as written (K = W_k LN(E^T) and G (B, C, D) in every step), gram = what training runs (the
   same values and gradients from the anchor side made once). ms/step, peak memory, GFLOP. The dataset shapes:
       prlimit --as=$((16 << 30)) python -m tools.bench_heads --backbone shapes-tiny --device cpu \
           --head-shapes imagenet_lt inat2018 inat2018_vit      # the paper form at iNat needs ~33 GiB: --head-batch 16
"""
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import lgr
from util import clip_models, engine, flags
from util.errors import out_of_memory
from tools.bench import common_args, fill_common, median_seconds, peak_memory, row, start, sync

SECTIONS = ("heads", "head-step")
# (C, D) of the LGR heads timed in section 2; M = 64 anchors. D: RN50 1024, ViT-B/16 512.
HEAD_SHAPES = {"imagenet_lt": (1000, 1024), "inat2018": (8142, 1024), "inat2018_vit": (8142, 512)}


def get_args(argv=None):
    p = flags.Parser(description="VL-LTR benchmarks: the LGR head against the FC head, and its two forms")
    common_args(p)
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                   help=f"which sections to run (default all): {' '.join(SECTIONS)}")
    p.add_argument("--head-shapes", nargs="*", default=["run"], choices=["run", *HEAD_SHAPES],
                   help="LGR head training step, paper vs gram form, at these (C, D): run = --classes and the "
                   "backbone's D; imagenet_lt 1000, 1024; inat2018 8142, 1024 (RN50); inat2018_vit 8142, 512 "
                   "(ViT-B/16); none: skip the section")
    p.add_argument("--head-batch", type=flags.count, default=128, help="batch of the LGR head step (Sec. 4.3: 128)")
    return fill_common(p.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# 1. Inference: the LGR head against the FC head


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
# 2. The LGR head in a training step: its two forms, Eq. (4)-(7) as written and the gram form


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
    """One training step of the head alone in LGRHead form `form` ("paper" | "gram"): forward, Eq. (9), backward
    into the head and E^I. Both forms run in fp32, also under lgr.py's bf16 autocast; paper_head_memory_gib
    counts fp32."""
    head.form = form
    logits_I, logits_T, _ = head(E_I, anchors, mask, anchor_side)
    lgr.recognition_loss(logits_I, logits_T, y)[0].backward()
    head.zero_grad(set_to_none=True)
    E_I.grad = None


def paper_head_memory_gib(B, C, D, M=64):
    """The paper form's peak in a training step worked out from the shapes, fp32: LN(E^T) and K, (C, M, D) each,
    and about 7 (B, C, D): G, F.cosine_similarity's normalised copies and their gradients. (The 7: CPU RSS
    growth at C 1000, D 1024, B 32 and 128, and C 8142, D 512, B 16, agrees within 5%.)"""
    return (2 * C * M * D + 7 * B * C * D) * 4 / 2**30


def head_step_bench(args, C, D, B):
    """{form: {measure: value}} for head_step, paper and gram, at C classes, width D, batch B. The gram form's
    anchor side is made once first (Recognizer's buffers), timed apart. GFLOP: the matmuls of one step,
    counted on the meta device (no memory). A form that runs out of memory gets None for time and memory."""
    out = {}
    for form in ("paper", "gram"):
        head, anchors, mask, E_I, y = head_step_inputs(C, D, B, "meta")
        anchor_side = head.anchor_side(anchors) if form == "gram" else None
        with FlopCounterMode(display=False) as counter:
            head_step(form, head, anchors, mask, E_I, y, anchor_side)
        out[form] = {"flop": counter.get_total_flops(), "seconds": None, "peak_gib": None, "once": None}
        try:
            head, anchors, mask, E_I, y = head_step_inputs(C, D, B, args.device)
            if form == "gram":                                   # made once: timed apart from the step
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
            if not out_of_memory(e):
                raise
        head = anchors = mask = E_I = y = step = None       # free the inputs before the next form
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    args = get_args(argv)
    save = start(args, "bench_heads")
    cuda = str(args.device).startswith("cuda")
    clip = clip_models.create_clip(args.backbone, args.image_size)                   # random weights
    visual, D = clip.visual.to(args.device), clip_models.embed_dim(clip)

    # 1. Inference: the LGR head against the FC head
    if "heads" in args.sections:
        res = head_bench(args, visual, D)
        print(f"\n1. Inference: visual encoder + head, {args.classes} classes, M = 64 anchors (paper: LGR 1.3 ms, FC 1.1 ms)")
        row("", "FC head", "LGR head")
        row("batch 1 latency, ms", *(f"{1e3 * res[h, 1][0]:.2f}" for h in ("fc", "lgr")))
        row("batch 256 throughput, img/s", *(f"{256 / res[h, 256][0]:.0f}" for h in ("fc", "lgr")))
        row("head alone: batch 1 latency, ms", *(f"{1e3 * res[h, 1][1]:.3f}" for h in ("fc", "lgr")))
        row("head alone: batch 256, ms", *(f"{1e3 * res[h, 256][1]:.2f}" for h in ("fc", "lgr")))
        save("heads", {h: {"latency_ms": 1e3 * res[h, 1][0], "images_s_256": 256 / res[h, 256][0],
                           "head_latency_ms": 1e3 * res[h, 1][1], "head_ms_256": 1e3 * res[h, 256][1]}
                       for h in ("fc", "lgr")})

    # 2. The LGR head in a training step, its two forms
    if "head-step" in args.sections and args.head_shapes:
        print(f"\n2. LGR head training step (forward, Eq. 9, backward into the head and E^I), batch {args.head_batch}, "
              f"M = 64, median of {args.steps} after {args.warmup}\n   paper = Eq. 4-7 as written (LGRHead form "
              f"\"paper\": K and G built), gram = the form training runs, on the anchor side made once")
        shown = lambda v, fmt: "out of memory" if v is None else fmt.format(v)
        ms = lambda seconds: None if seconds is None else 1e3 * seconds
        steps = {}
        for name in args.head_shapes:
            C, D_head = HEAD_SHAPES.get(name, (args.classes, D))
            steps[name] = res = head_step_bench(args, C, D_head, args.head_batch)
            row(f"{name}: C {C}, D {D_head}", "paper", "gram")
            row("ms/step", *(shown(ms(r["seconds"]), "{:.0f}") for r in res.values()))
            row(f"peak memory GiB ({'max_memory_allocated' if cuda else 'RSS growth'})",
                *(shown(r["peak_gib"], "{:.2f}") for r in res.values()))
            row("peak memory worked out, GiB", f"{paper_head_memory_gib(args.head_batch, C, D_head):.1f}", "")
            row("GFLOP/step (matmuls, flop_counter)", *(f"{r['flop'] / 1e9:.1f}" for r in res.values()))
            row("anchor side, made once, ms", "", shown(ms(res["gram"]["once"]), "{:.0f}"))
            save("head_step", steps)



if __name__ == "__main__":
    main()
