"""The CUDA path against the CPU and fp32 paths it stands in for. Skipped without a CUDA GPU.

    python -m pytest -q test_cuda.py            # on a GPU machine, about a minute (torch.compile included)

Each test runs the project's own code on the GPU and compares with a reference the CPU tests already trust:
bf16 autocast against fp32 (within bf16's rounding), the LGR head's gram form against Eq. (4)-(7) as written,
fused AdamW against the plain loop, nvjpeg decoding against PIL, torch.compile against eager, evaluation on the
GPU against evaluation on the CPU, and a GPU out of memory ending in the one-line error of every stage. And the step
cvlp.py runs (the CPU tests hold its maths, tests/test_fast_path.py): the packed text tower with flash's
variable-length attention, a step that waits for nothing, the teacher's weights cast once, RN50 in channels_last,
the whole loss compiled (BatchNorm's running statistics included).
"""
import argparse
import copy

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import cvlp
import data
import lgr
from tools.bench import narrow_clip
from util import clip_models, engine, images
from tests.test_data import make_imagenet_tree
from tests.test_gpu_loader import save_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"
SOT, EOT = 49406, 49407


@pytest.fixture(autouse=True)
def strict_fp32():
    """Plain fp32 matmuls (no TF32) unless a test asks for them, so that fp32 references are fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def random_clip(seed=0):
    torch.manual_seed(seed)
    return clip_models.create_clip("shapes-tiny", 32)


def sentences(n, C, context=32, seed=0):
    """(n, context) int32 tokens, 1 to 20 random words each, and (n,) labels in 0..C-1."""
    g = torch.Generator().manual_seed(seed)
    T = torch.zeros(n, context, dtype=torch.int32)
    for i, m in enumerate(torch.randint(1, 21, (n,), generator=g).tolist()):
        T[i, 0], T[i, m + 1] = SOT, EOT
        T[i, 1:m + 1] = torch.randint(1, 49000, (m,), generator=g)
    return T, torch.randint(0, C, (n,), generator=g)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ----------------------------------------------------------------------------------------------
# Training precision: one CVLP step in bf16 autocast against the same step in fp32


def test_bf16_autocast_cvlp_step_matches_fp32_within_bf16_rounding():
    student, teacher = random_clip(0).to(DEVICE), random_clip(1).to(DEVICE).eval().requires_grad_(False)
    T, y = sentences(32, 6)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y = y.to(DEVICE)
    args = argparse.Namespace(lam=0.5, variant="paper")
    out = {}
    for precision in ("fp32", "bf16"):
        student.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, parts = cvlp.cvlp_loss(student, teacher, x, y, T, args)
        loss.backward()
        out[precision] = loss.item(), grads(student)
    (loss32, g32), (loss16, g16) = out["fp32"], out["bf16"]
    assert np.isfinite(loss16) and abs(loss16 - loss32) <= 2e-2 * abs(loss32), (loss16, loss32)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation): the gradient as a whole
    # moves by a few percent at most and keeps its direction.
    assert relative_error(g16, g32) < 0.1 and F.cosine_similarity(g16, g32, dim=0) > 0.99
    print(f"bf16 vs fp32: loss {loss16:.6f} vs {loss32:.6f}, gradient relative error {relative_error(g16, g32):.2e}")


# ----------------------------------------------------------------------------------------------
# The LGR head: the gram form the training runs against Eq. (4)-(7) as the paper writes them


def test_lgr_head_gram_form_equals_the_paper_form_on_cuda():
    torch.manual_seed(0)
    C, M, D, B = 50, 16, 64, 8
    head = lgr.LGRHead(D, C).to(DEVICE)
    E_T = F.normalize(torch.randn(C, M, D, device=DEVICE), dim=-1)
    mask = torch.ones(C, M, dtype=torch.bool, device=DEVICE)
    mask[::3, M // 2:] = False                                   # every third class with half its anchors padded
    E_I = torch.randn(B, D, device=DEVICE, requires_grad=True)
    y = torch.randint(0, C, (B,), device=DEVICE)
    out = {}
    for form in ("paper", "gram"):
        head.zero_grad(set_to_none=True)
        E_I.grad = None
        head.form = form
        logits_I, logits_T, A = head(E_I, E_T, mask, head.anchor_side(E_T))
        lgr.recognition_loss(logits_I, logits_T, y)[0].backward()
        out[form] = logits_T.detach(), A.detach(), torch.cat([E_I.grad.flatten(), grads(head)])
    for a, b in zip(out["gram"], out["paper"]):
        assert relative_error(a, b) < 1e-4
    # Under the training's bf16 autocast the gram form still computes in fp32 (LGRHead.forward turns it off).
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_I, logits_T, _ = head(E_I, E_T, mask, head.anchor_side(E_T))
    assert logits_T.dtype == torch.float32 and relative_error(logits_T.detach(), out["paper"][0]) < 1e-4


# ----------------------------------------------------------------------------------------------
# Fused AdamW (cvlp.py and lgr.py on CUDA) against torch's plain loop


def test_fused_adamw_steps_equal_the_unfused_ones():
    model = random_clip(0).to(DEVICE)
    models = {"fused": model, "plain": copy.deepcopy(model)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05,
                                 fused=k == "fused", foreach=False if k == "plain" else None)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        gradients = [torch.randn(p.shape, generator=g) for p in model.parameters()]
        for k, m in models.items():
            for p, grad in zip(m.parameters(), gradients):
                p.grad = grad.to(DEVICE)
            opts[k].step()
    for (name, a), b in zip(models["fused"].named_parameters(), models["plain"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# --loader gpu: nvjpeg on the device against PIL on the CPU


def test_gpu_loader_decodes_on_the_device_like_pil(tmp_path, monkeypatch):
    paths = save_images(tmp_path)                                # RGB, grey, CMYK and a PNG named .JPEG
    files = [images.read_bytes(p) for p in paths]
    on_cpu, load_rgb = [], images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda path, where=None: on_cpu.append(path) or load_rgb(path, where))
    decoded = images.DeviceTransform(None, DEVICE).decode(files, paths, [None] * len(paths))
    monkeypatch.undo()
    assert on_cpu == paths[5:], on_cpu                           # nvjpeg decoded the RGB and grey JPEGs; PIL the rest
    levels = []
    for img, path in zip(decoded, paths):
        ref = torch.from_numpy(np.array(images.load_rgb(path))).permute(2, 0, 1)     # (3, H, W) PIL
        assert img.device.type == "cuda" and img.dtype == torch.uint8 and img.shape == ref.shape
        levels.append((img.cpu().int() - ref.int()).abs().float())
    d = torch.cat([v.flatten() for v in levels])
    shift = torch.stack([(img.cpu().float() - torch.from_numpy(np.array(images.load_rgb(p))).permute(2, 0, 1)).mean((1, 2))
                         for img, p in zip(decoded, paths)])               # (7, 3) mean difference per channel
    print(f"nvjpeg vs PIL: mean {d.mean():.3f} levels, 99.9th percentile {d.quantile(0.999):.0f}, max {d.max():.0f}; "
          f"per image {[round(v.mean().item(), 2) for v in levels]}; largest channel shift {shift.abs().max():.2f}")
    # nvjpeg and libjpeg-turbo round the inverse DCT and upsample the half-resolution chroma differently: on these
    # small images with strong per-pixel noise, 3.0 levels on average, up to 35 at single pixels (H200, 2026-12-04).
    # A wrong colour conversion (channel order, YCbCr matrix, range) would move whole channels by tens of levels.
    assert d.mean() < 4.0 and shift.abs().max() < 1.5
    # The whole eval loader: batches on the device, within those levels of the PIL loader's.
    split = data.Split(paths, np.arange(len(paths)) % 3, [f"s.txt:{k + 1}" for k in range(len(paths))])
    transform = images.make_transform(32, (0.5,) * 3, (0.25,) * 3, train=False)
    out = {}
    for kind in ("pil", "gpu"):
        args = argparse.Namespace(batch=4, workers=0, device=DEVICE, loader=kind)
        out[kind] = torch.cat([x.to(DEVICE) for x, _ in data.make_loader(split, transform, args)])
    assert out["gpu"].device.type == "cuda" and out["gpu"].shape == out["pil"].shape == (len(paths), 3, 32, 32)
    in_levels = (out["gpu"] - out["pil"]).abs() * 0.25 * 255
    print(f"eval loader, gpu vs pil: mean {in_levels.mean():.3f} levels, max {in_levels.max():.1f}")
    assert in_levels.mean() < 2.0                                # the resize to 32 px averages the decoders' noise


# ----------------------------------------------------------------------------------------------
# --compile against eager


def test_compiled_image_encoder_step_equals_eager():
    eager = random_clip(0).to(DEVICE)
    compiled = copy.deepcopy(eager)
    compiled.visual.compile()                                    # as cvlp.py and lgr.py do with --compile
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        E = model.encode_image(x)
        (E * w).sum().backward()
        out[name] = E.detach(), torch.cat([p.grad.flatten() for p in model.visual.parameters()])
    (E_c, g_c), (E_e, g_e) = out["compiled"], out["eager"]
    assert relative_error(E_c, E_e) < 1e-4 and relative_error(g_c, g_e) < 1e-3   # another summation order, no more


# ----------------------------------------------------------------------------------------------
# Evaluation: the same weights give the same predictions on the GPU as on the CPU


def test_evaluation_predictions_on_cuda_equal_the_cpus():
    torch.manual_seed(0)
    C, M, D = 12, 8, 64
    anchors = F.normalize(torch.randn(C, M, D), dim=-1)
    mask = torch.ones(C, M, dtype=torch.bool)
    model = lgr.Recognizer(random_clip(0).visual, D, C, "lgr", anchors=anchors, mask=mask)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, C, (16,))) for _ in range(4)]
    preds = {}
    for device in ("cpu", DEVICE):
        args = argparse.Namespace(device=device, variant="paper", data="imagenet_lt")
        preds[device], y = lgr.predict(copy.deepcopy(model).to(device), batches, args)
    for k in preds["cpu"]:
        assert torch.equal(preds["cpu"][k], preds[DEVICE][k]), k
    # evaluate.py runs with TF32 matmuls (engine.run_stage): near-ties aside, the same predictions.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tf32, _ = lgr.predict(copy.deepcopy(model).to(DEVICE), batches, args)
    agree = (tf32["P"] == preds["cpu"]["P"]).float().mean().item()
    print(f"predictions with TF32 matmuls equal to the CPU's: {agree:.1%}")
    assert agree >= 0.95


# ----------------------------------------------------------------------------------------------
# The stages on CUDA: a real run with --loader gpu, and a GPU out of memory


def test_cvlp_anss_and_lgr_run_on_cuda_with_the_gpu_loader(tmp_path, tiny_clip):
    import anss
    root = make_imagenet_tree(tmp_path / "imagenet")
    common = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
              "--workers", "0", "--device", DEVICE, "--out", str(tmp_path / "run")]
    train = ["--epochs", "1", "--batch", "2", "--loader", "gpu", "--augment", "crop-flip"]
    cvlp.main([*common, *train, "--clip-weights", str(tiny_clip), "--text", "prompt"])
    anss.main([*common, "--text", "prompt"])
    lgr.main([*common, *train])
    ckpt = torch.load(tmp_path / "run" / "lgr.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_gpu_out_of_memory_ends_in_one_line_not_a_traceback(tmp_path, tiny_clip, monkeypatch, capsys):
    real_loss = cvlp.cvlp_loss

    def loss_that_asks_too_much(*a, **k):
        torch.empty(1 << 50, dtype=torch.uint8, device=DEVICE)  # 1 PiB: no GPU has it
        return real_loss(*a, **k)

    monkeypatch.setattr(cvlp, "cvlp_loss", loss_that_asks_too_much)
    root = make_imagenet_tree(tmp_path / "imagenet")
    with pytest.raises(SystemExit) as e:
        cvlp.main(["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
                   "--clip-weights", str(tiny_clip), "--text", "prompt", "--epochs", "1", "--batch", "2",
                   "--workers", "0", "--device", DEVICE, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert errors == ["error: GPU out of memory with --batch 2; pass a smaller --batch, or --batch 1 --accum 2 to "
                      "keep the effective batch"], err
    assert not any("Traceback" in line for line in err)


# ----------------------------------------------------------------------------------------------
# The CVLP step cvlp.py runs: packed text, no host waits, the layouts and casts the GPU wants, the compiled loss


def packed_and_plain(model, tokens, w, precision):
    """{"varlen" | "padded" | "plain": (the text embeddings (N, D), the gradients of (E * w).sum())} on CUDA."""
    out = {}
    packed = clip_models.pack_sentences(tokens, DEVICE)
    forms = {"varlen": lambda: clip_models.encode_text_packed(model, packed),
             "padded": lambda: clip_models.encode_text_packed(model, packed._replace(varlen=False)),
             "plain": lambda: model.encode_text(tokens.long().to(DEVICE))}
    for name, form in forms.items():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            E = form()
        (E.float() * w).sum().backward()
        out[name] = E.detach().float(), grads(model)
    return packed, out


def test_packed_text_on_cuda_equals_the_full_context_forward():
    model = clip_models.create_clip("shapes-tiny", 32).to(DEVICE)
    T, _ = sentences(24, 4)
    T[-1, 1:] = torch.randint(1, 49000, (31,), generator=torch.Generator().manual_seed(3))
    T[-1, -1] = EOT                                              # one sentence cut at the context
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, fp32 = packed_and_plain(model, T, w, "fp32")              # fp32: the padded form (flash's kernel needs bf16)
    assert relative_error(fp32["padded"][0], fp32["plain"][0]) < 1e-5
    assert relative_error(fp32["padded"][1], fp32["plain"][1]) < 1e-4
    packed, bf16 = packed_and_plain(model, T, w, "bf16")
    print(f"packed text, bf16: flash variable-length kernel {'used' if packed.varlen else 'not available'}; "
          f"relative error against fp32 (values, gradients): varlen {relative_error(bf16['varlen'][0], fp32['plain'][0]):.1e}, "
          f"{relative_error(bf16['varlen'][1], fp32['plain'][1]):.1e}; open_clip's forward "
          f"{relative_error(bf16['plain'][0], fp32['plain'][0]):.1e}, {relative_error(bf16['plain'][1], fp32['plain'][1]):.1e}")
    assert packed.varlen == (torch.cuda.get_device_capability()[0] >= 8 and clip_models.VARLEN_CAUSAL is not None)
    for name in ("varlen", "padded"):                            # within bf16's rounding, as open_clip's own forward
        E, g = bf16[name]
        assert relative_error(E, fp32["plain"][0]) < 2e-2 and relative_error(g, fp32["plain"][1]) < 5e-2, name
        assert relative_error(E, fp32["plain"][0]) < 2 * relative_error(bf16["plain"][0], fp32["plain"][0]) + 1e-3, name


def test_a_cvlp_step_on_cuda_waits_for_nothing():
    """The step as Training.one_epoch and cvlp.py's batch_loss run it: sentences drawn from the host labels and
    packed, copied from pinned memory, the loss, its logged values on their way to the host, backward, fused AdamW
    told to skip a non-finite step; under torch.cuda.set_sync_debug_mode("error"), which raises at any host wait."""
    student, teacher = random_clip(0).to(DEVICE), random_clip(1).to(DEVICE).eval().requires_grad_(False)
    T, t = sentences(64, 8)
    order = t.argsort()
    text = {"tokens": T[order], "offsets": torch.searchsorted(t[order], torch.arange(9))}   # class c's sentences
    cache = clip_models.encode_texts(teacher, text["tokens"], DEVICE, training_precision=True)
    args = argparse.Namespace(lam=0.5, variant="paper", device=DEVICE, text_pass="packed")
    x, y = torch.randn(16, 3, 32, 32, device=DEVICE), torch.randint(0, 8, (16,)).pin_memory()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)

    def step():
        with engine.autocast(DEVICE):
            T, y_device, E_T_teacher = cvlp.batch_text(student, text, cache, y, g, args)
            loss, stats = cvlp.cvlp_loss(student, teacher, x, y_device, T, args, E_T_teacher)
        names, host, event = engine.values_to_host({"loss": loss, **stats})
        loss.backward()
        assert engine.skip_if_not_finite(opt, [loss.detach()])
        opt.step()
        del opt.found_inf
        opt.zero_grad(set_to_none=True)
        return host, event

    step()                                                       # the first step initialises the libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        host, event = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    event.synchronize()
    assert np.isfinite(host.tolist()).all()


@pytest.mark.parametrize("backbone", ["RN50", "ViT-B-16"])
def test_the_step_layouts_on_cuda_are_the_same_maths(backbone):
    """cvlp.prepare_step on CUDA: the teacher's image embeddings bitwise what autocast computes from its fp32 weights
    (in the same layout), and the student's (RN50 in channels_last, cuDNN's autotuner on) embeddings and gradients
    as in NCHW, in fp32."""
    torch.manual_seed(0)
    student = narrow_clip(backbone, 64).to(DEVICE)
    teacher = narrow_clip(backbone, 64).to(DEVICE).eval().requires_grad_(False)
    nchw, fp32_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    args = argparse.Namespace(lam=0.5, device=DEVICE, image_size=64, compile=False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        assert cvlp.prepare_step(student, teacher, args) is None and torch.backends.cudnn.benchmark
        assert clip_models.channels_last(fp32_teacher) == (backbone == "RN50")           # the same layout, fp32
        with torch.no_grad(), engine.autocast(DEVICE):
            assert torch.equal(teacher.encode_image(x), fp32_teacher.encode_image(x))   # bitwise
        assert teacher.visual.conv1.weight.dtype == torch.bfloat16
        assert student.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last) == (backbone == "RN50")
        out = {}
        for name, model in (("nchw", nchw), ("prepared", student)):
            E = model.encode_image(x)
            (E * w).sum().backward()
            out[name] = E.detach(), grads(model)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert relative_error(out["prepared"][0], out["nchw"][0]) < 1e-5
    assert relative_error(out["prepared"][1], out["nchw"][1]) < 1e-4


def test_the_compiled_loss_on_cuda_equals_eager_with_batchnorm_statistics():
    """--compile (cvlp.compiled_loss, inductor) against eager, in fp32: a small RN50-like CLIP (BatchNorm in training
    mode, channels_last once prepared) on two batches of other packed lengths: the losses, the gradients and the
    running statistics after both, one compiled graph."""
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=8),
                           text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2),
                           quick_gelu=True).to(DEVICE).train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    args = argparse.Namespace(lam=0.5, variant="paper", device=DEVICE, image_size=32, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    benchmark, runs = torch.backends.cudnn.benchmark, {}
    try:
        for name in ("eager", "compiled"):
            student = copy.deepcopy(model)
            # prepare_step casts its teacher's weights for the training's bf16 autocast: this fp32 test keeps its own
            loss_fn = cvlp.prepare_step(student, copy.deepcopy(teacher), args) if name == "compiled" else cvlp.cvlp_loss
            losses, gradients = [], []
            for seed in (0, 1):
                T, y = sentences(16, 4, seed=seed)
                x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
                student.zero_grad(set_to_none=True)
                loss, _ = loss_fn(student, teacher, x, y.to(DEVICE), clip_models.pack_sentences(T, DEVICE), args, None)
                loss.backward()
                losses.append(loss.item())
                gradients.append(grads(student))
            stats = {k: v.float() for k, v in student.state_dict().items() if "running" in k}
            runs[name] = losses, gradients, stats
    finally:
        torch.backends.cudnn.benchmark = benchmark
    (l_e, g_e, s_e), (l_c, g_c, s_c) = runs["eager"], runs["compiled"]
    assert np.allclose(l_c, l_e, rtol=1e-5), (l_c, l_e)
    assert all(relative_error(c, e) < 1e-3 for c, e in zip(g_c, g_e))     # another summation order, no more
    assert s_e.keys() == s_c.keys() and all(relative_error(s_c[k], s_e[k]) < 1e-5 for k in s_e)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
