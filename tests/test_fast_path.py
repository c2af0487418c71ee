"""The fast single-GPU path is the same maths: trimmed text (clip_models.encode_text_trimmed), the packed one-pass text
(clip_models.encode_text_packed), the cached teacher text (cvlp.run), the step that reads nothing from the device
before backward (engine.Training.one_epoch), the teacher's weights cast once, RN50 in channels_last and --compile,
each against the plain computation it replaces. Tolerances, fp32: values to 1e-5 (relative and absolute), gradients
to 1e-4 relative and 1e-5 of the largest entry absolute (another summation order, no more); bitwise where the same
kernels get the same numbers (the teacher's cast)."""
import argparse
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cvlp
from util import clip_models, engine
from util.errors import DivergedError

SOT, EOT = 49406, 49407


def sentences_of_lengths(lengths, context=32, seed=0):
    """(N, context) int32 tokens: SOT, `n` random words, EOT, zero padding, for each n in lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context, dtype=torch.int32)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, n + 1] = SOT, EOT
        tokens[i, 1:n + 1] = torch.randint(1, 49000, (n,), generator=g)
    return tokens


def tiny(kind):
    torch.manual_seed(0)
    if kind == "CLIP":                                            # what clip_models.create_clip builds (flat text tower)
        return clip_models.create_clip("shapes-tiny", 32)
    return open_clip.CustomTextCLIP(**clip_models.TINY_CLIP)          # text tower as a TextTransformer in .text


@pytest.mark.parametrize("kind, groups, positions", [
    ("CLIP", 1, [14]),                     # longest: SOT + 12 words + EOT = 14 positions
    ("CLIP", 3, [5, 9, 14]),               # positions 3 5 | 7 9 | 14 in length order: each group cut to its longest
    ("CustomTextCLIP", 1, [14]),
])
def test_trimmed_text_equals_the_full_forward_for_sentences_of_different_lengths(kind, groups, positions):
    model = tiny(kind)
    tokens = sentences_of_lengths([3, 7, 1, 12, 5])              # 5, 9, 3, 14, 7 positions
    seen = []
    transformer = getattr(model, "text", model).transformer
    hook = transformer.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    w = torch.randn(5, 64)                                       # a loss that weighs every output value

    trimmed = clip_models.encode_text_trimmed(model, tokens, groups)
    (trimmed * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model.encode_text(tokens.long())                      # the plain open_clip forward, all 32 positions
    (full * w).sum().backward()
    hook.remove()

    assert seen == positions + [32]                              # the trimmed forward really ran fewer positions
    assert trimmed.shape == full.shape == (5, 64)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=n)


def test_encode_texts_sorts_by_length_but_returns_corpus_order():
    model = tiny("CLIP")
    tokens = sentences_of_lengths([9, 2, 15, 2, 6, 30, 1])       # 7 sentences, chunks of 3, out of length order
    expected = F.normalize(model.encode_text(tokens.long()), dim=-1).detach()   # naive: one full forward
    got = clip_models.encode_texts(model, tokens, "cpu", batch=3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_distillation_loss_is_the_same_with_the_cached_teacher_text(variant):
    student, teacher = tiny("CLIP"), tiny("CLIP")
    with torch.no_grad():                                        # the teacher differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval().requires_grad_(False)
    corpus = sentences_of_lengths([4, 11, 2, 7, 20, 3, 9, 5])    # 8 sentences; the batch draws 4 of them
    k = torch.tensor([6, 1, 1, 4])                               # (N,) sentence index of each image
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 2])
    args = argparse.Namespace(lam=0.5, variant=variant)

    cache = clip_models.encode_texts(teacher, corpus, "cpu", batch=3)              # (S, D), once before training
    loss_cached, parts_cached = cvlp.cvlp_loss(student, teacher, x, y, corpus[k], args, cache[k])
    loss_live, parts_live = cvlp.cvlp_loss(student, teacher, x, y, corpus[k], args)

    # naive reference: Eq. (3) on the teacher's plain full-length forward of the same sentences
    with torch.no_grad():
        S_t = cvlp.cosine_similarity_matrix(teacher.encode_image(x), teacher.encode_text(corpus[k].long()))
        S = cvlp.cosine_similarity_matrix(student.encode_image(x), student.encode_text(corpus[k].long()))
        tau = cvlp.temperature(student.logit_scale)
        L_dis = cvlp.distillation_loss(S, S_t, tau, variant)
    assert parts_cached["L_dis"].item() > 0
    torch.testing.assert_close(parts_cached["L_dis"], parts_live["L_dis"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts_cached["L_dis"].detach(), L_dis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)


def test_compiled_tiny_model_trains_a_step_and_its_checkpoint_loads_uncompiled(shapes_env, tmp_path, monkeypatch):
    """--compile with the cheap "aot_eager" backend: the default inductor backend takes about a minute to compile
    this tiny step on a 2-core CPU. The plumbing is the same: Dynamo traces the loss through both encoders and the
    teacher (cvlp.compiled_loss), AOTAutograd its backward."""
    real_compile, compiled = torch.compile, []

    def cheap_compile(fn, *a, **k):
        compiled.append(fn.__name__)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", cheap_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cvlp.main(["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--out", str(tmp_path), "--device", "cpu",
               "--clip-weights", str(shapes_env["clip"]), "--batch", "16", "--epochs", "1", "--stop-after-steps", "2",
               "--compile"])
    assert compiled == ["cvlp_loss"]                                       # the whole loss, once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1     # one graph for both batches' lengths
    saved = torch.load(tmp_path / "cvlp.pt", weights_only=True)["model"]
    assert not [key for key in saved if "_orig_mod" in key]
    fresh = clip_models.create_clip("shapes-tiny", 32)
    fresh.load_state_dict(saved)                                 # strict: every key of the uncompiled model
    start = torch.load(shapes_env["clip"], weights_only=True)
    assert not torch.equal(saved["visual.conv1.weight"], start["visual.conv1.weight"])   # the steps trained it
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# The text tower in one pass: packed sentences against open_clip's full-context forward


def clip_77(quick_gelu):
    """A CLIP with OpenAI's 77-token text context at a small width (2 layers): open_clip's plain encode_text of it is
    the reference, all 77 positions."""
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
                          quick_gelu=quick_gelu)


def full_context(lengths, context, seed=0):
    """Sentences of `lengths` words, and one longer than the context, cut as tokenize_exact cuts it (EOT last)."""
    tokens = sentences_of_lengths([min(n, context - 2) for n in lengths], context, seed)
    tokens[-1, 1:] = torch.randint(1, 49000, (context - 1,), generator=torch.Generator().manual_seed(seed + 1))
    tokens[-1, -1] = EOT
    return tokens


def grads_of(model, out, w):
    model.zero_grad()
    (out * w).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, expected):
    """Every gradient to 1e-4 relative, 1e-5 of its largest entry absolute; the bias of RN50's attention-pool keys,
    whose exact gradient is 0 (a shift of every key moves all of a query's scores alike, which the softmax ignores),
    to 1e-5 of the largest gradient of all: rounding noise either way."""
    assert got.keys() == expected.keys()
    largest = max(g.abs().max().item() for g in expected.values())
    for n, g in expected.items():
        atol = 1e-5 * (largest if n.endswith("attnpool.k_proj.bias") else g.abs().max().item())
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("kind", ["CLIP", "CustomTextCLIP", "CLIP-77-QuickGELU"])
def test_packed_text_equals_the_plain_full_context_forward(kind):
    model = clip_77(quick_gelu=True) if kind == "CLIP-77-QuickGELU" else tiny(kind)
    context = clip_models.context_length(model)
    tokens = full_context([3, 7, 0, 12, 5, 20, 0], context)      # an empty sentence (SOT EOT), and one cut at the context
    assert clip_models.packable(model)
    seen = []
    tower = getattr(model, "text", model)
    hook = tower.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    w = torch.randn(len(tokens), clip_models.embed_dim(model), generator=torch.Generator().manual_seed(2))

    packed = clip_models.pack_sentences(tokens)
    out = clip_models.encode_text_packed(model, packed)
    got = grads_of(model, out, w)
    hook.remove()
    full = model.encode_text(tokens.long())                      # the plain open_clip forward, every position
    expected = grads_of(model, full, w)

    lengths = [5, 9, 2, 14, 7, 22, context]
    assert seen == [(sum(lengths), tower.transformer.width)]               # one pass, over the sentences' own tokens only
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, expected)


def test_packed_text_gives_bitwise_the_same_gradients_every_time_on_two_threads():
    """A run is repeatable on the CPU only if no gradient is summed in the order threads happen to finish. The packed
    rows read the positional table at repeated positions (every sentence has a position 0); read by indexing, its
    backward adds those rows atomically across threads and two runs differed after a few steps (seen: cvlp.pt 4e-3
    apart after 5 epochs on 2 threads). F.embedding's backward sums them in a fixed order."""
    model = tiny("CLIP")
    tokens = sentences_of_lengths([3, 7, 1, 12, 5, 20, 9, 2] * 64)    # 512 sentences: thousands of repeated positions
    w = torch.randn(len(tokens), clip_models.embed_dim(model), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(8):
            model.zero_grad()
            (clip_models.encode_text_packed(model, clip_models.pack_sentences(tokens)) * w).sum().backward()
            runs.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert "positional_embedding" in runs[0]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0]), \
            [k for k in runs[0] if not torch.equal(runs[0][k], other[k])]


def test_pack_sentences_lays_out_the_rows_as_worked_by_hand():
    tokens = sentences_of_lengths([1, 0, 3], context=12)         # 3, 2 and 5 tokens (SOT .. EOT)
    p = clip_models.pack_sentences(tokens)
    assert p.tokens.tolist() == [t for row, n in zip(tokens.tolist(), (3, 2, 5)) for t in row[:n]]
    assert p.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert p.width == 8                                          # the longest (5) rounded up to 8
    assert p.rows.tolist() == [0, 1, 2, 8, 9, 16, 17, 18, 19, 20]
    assert p.eot.tolist() == [2, 4, 9] and p.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert p.cu_seqlens.dtype == torch.int32 and not p.varlen   # flash's variable-length kernel: CUDA only
    assert clip_models.pack_sentences(sentences_of_lengths([30], context=32)).width == 32   # never past the context


def block_diagonal_causal_attention(qkv, packed):
    """The reference: all P packed rows as one sequence, each row attending to the rows before it of its own sentence
    (a block-diagonal causal mask), (P, 3, H, d) -> (P, H, d)."""
    P = qkv.shape[0]
    sentence = torch.repeat_interleave(torch.arange(len(packed.eot)), packed.cu_seqlens.diff().long())
    allowed = (sentence[:, None] == sentence[None, :]) & torch.ones(P, P, dtype=torch.bool).tril()   # (P, P)
    q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)                  # 3 x (H, P, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(0, 1)


def test_padded_causal_attention_equals_a_block_diagonal_causal_mask():
    packed = clip_models.pack_sentences(sentences_of_lengths([4, 0, 9, 2], context=16))
    qkv = torch.randn(len(packed.tokens), 3, 2, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(len(packed.tokens), 2, 8, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, attention in (("padded", clip_models.padded_causal_attention), ("mask", block_diagonal_causal_attention)):
        qkv.grad = None
        y = attention(qkv, packed)
        (y * w).sum().backward()
        out[name] = y.detach(), qkv.grad.clone()
    torch.testing.assert_close(out["padded"][0], out["mask"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["padded"][1], out["mask"][1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# One CVLP step: packed against the readable forms, values and gradients; nothing read before backward


def loss_and_grads(student, teacher, x, y, T, args, cache=None, loss_fn=cvlp.cvlp_loss):
    student.zero_grad()
    loss, parts = loss_fn(student, teacher, x, y, T, args, cache)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_cvlp_loss_with_packed_text_equals_the_plain_forward(variant="official"):
    student, teacher = tiny("CLIP"), tiny("CLIP")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval().requires_grad_(False)
    corpus = sentences_of_lengths([4, 11, 2, 7, 20, 3, 9, 30])
    text = {"tokens": corpus, "offsets": torch.tensor([0, 3, 5, 8])}          # 3 classes: 3, 2 and 3 sentences
    x, y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 0, 1, 2, 2, 1])
    args = argparse.Namespace(lam=0.5, variant=variant, device="cpu", text_pass="packed")
    cache = clip_models.encode_texts(teacher, corpus, "cpu")
    T, y_dev, E_T_teacher = cvlp.batch_text(student, text, cache, y, torch.Generator().manual_seed(4), args)
    assert isinstance(T, clip_models.PackedText) and torch.equal(y_dev, y)
    k = cvlp.sample_sentences(text["offsets"], y, torch.Generator().manual_seed(4))       # the same draw
    assert torch.equal(E_T_teacher, cache[k])

    packed = loss_and_grads(student, teacher, x, y, T, args, E_T_teacher)
    groups = loss_and_grads(student, teacher, x, y, corpus[k], args, E_T_teacher)        # the readable form

    def plain(student, teacher, x, y, T, args, cache):        # Eq. (1)-(3), (8) on open_clip's full-context forwards
        S = cvlp.cosine_similarity_matrix(student.encode_image(x), student.encode_text(T.long()))
        tau = cvlp.temperature(student.logit_scale)
        with torch.no_grad():
            S_t = cvlp.cosine_similarity_matrix(teacher.encode_image(x), teacher.encode_text(T.long()))
        return cvlp.pretraining_loss(cvlp.class_wise_contrastive_loss(S, y, y, tau, variant),
                                     cvlp.distillation_loss(S, S_t, tau, variant), 0.5), {}
    reference = loss_and_grads(student, teacher, x, y, corpus[k], args, loss_fn=plain)
    for other in (groups, reference):
        torch.testing.assert_close(packed[0], other[0], rtol=1e-5, atol=1e-6)
        assert_same_grads(packed[1], other[1])


def test_the_compiled_loss_equals_the_eager_one_for_batches_of_other_lengths():
    """cvlp.compiled_loss as --compile builds it, with the "aot_eager" backend (Dynamo's graph and AOTAutograd's
    backward, without inductor's kernels): the eager values and gradients, one graph for two batches whose
    sentences differ in total length."""
    student, teacher = tiny("CLIP"), tiny("CLIP").eval().requires_grad_(False)
    args = argparse.Namespace(lam=0.5, variant="paper")
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 2])
    real_compile = torch.compile
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        torch.compile = lambda fn: real_compile(fn, backend="aot_eager")
        compiled = cvlp.compiled_loss()
    finally:
        torch.compile = real_compile
    for lengths in ([3, 9, 1, 12], [6, 2, 13, 1]):               # 32 and 30 rows, both 16 wide
        T = clip_models.pack_sentences(sentences_of_lengths(lengths))
        eager = loss_and_grads(student, teacher, x, y, T, args)
        fast = loss_and_grads(student, teacher, x, y, T, args, loss_fn=compiled)
        torch.testing.assert_close(fast[0], eager[0], rtol=1e-5, atol=1e-6)
        assert_same_grads(fast[1], eager[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


class ValueReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value on the host (item(), float(t), int(t), bool(t)): on a GPU,
    each one waits for the device to finish all that was queued before it."""
    reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
        return func(*args, **(kwargs or {}))


def test_the_cvlp_step_reads_no_value_before_backward():
    student, teacher = tiny("CLIP"), tiny("CLIP").eval().requires_grad_(False)
    corpus = sentences_of_lengths([4, 11, 2, 7, 20, 3])
    text = {"tokens": corpus, "offsets": torch.tensor([0, 2, 4, 6])}
    cache = clip_models.encode_texts(teacher, corpus, "cpu")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 2])
    counts = {}
    for text_pass in ("packed", "groups"):
        args = argparse.Namespace(lam=0.5, variant="paper", device="cpu", text_pass=text_pass)
        with ValueReads() as mode:
            T, y_dev, E_T_teacher = cvlp.batch_text(student, text, cache, y, torch.Generator(), args)
            loss, _ = cvlp.cvlp_loss(student, teacher, x, y_dev, T, args, E_T_teacher)
            loss.backward()
        counts[text_pass] = mode.reads
    assert counts["packed"] == 0 and counts["groups"] > 0      # the length groups read each group's longest sentence


class Watched(torch.Tensor):
    """A loss that notes, in order, when it is read on the host and when its backward() starts."""
    log = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy", "backward"):
            cls.log.append("backward" if name == "backward" else "read")
        return super().__torch_function__(func, types, args, kwargs or {})


class Batches(list):
    """A loader as Training reads one: its batches, and the sampler whose skip start_epoch sets."""
    sampler = argparse.Namespace(skip=0)


def training_run(tmp_path, fused, nan_at=None, batches=3):
    """engine.Training of a linear model with AdamW (fused or not), a loader of `batches` batches and the
    batch_loss of engine.fit, the loss of batch `nan_at` (0-based) NaN: (Training, loader, batch_loss)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    loader = Batches([(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)][:batches])
    args = argparse.Namespace(device="cpu", batch=2, accum=1, epochs=1, clip_grad=0, stop_after_steps=0, save_every=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    run = engine.Training(model, opt, sched, args, str(tmp_path / "t.pt"), {"stage": "t"}, {"sampler": torch.Generator()})

    def batch_loss(x, y):
        assert y.device.type == "cpu"                           # the loader's labels, on the host
        nan = nan_at is not None and torch.equal(x, loader[nan_at][0])
        loss = F.cross_entropy(model(x), y) * (float("nan") if nan else 1.0)
        return loss.as_subclass(Watched), {"scale": torch.tensor(2.0)}
    return run, loader, batch_loss


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adamw", "adamw"])
def test_a_training_step_reads_its_loss_only_after_backward_and_a_nan_never_reaches_the_weights(tmp_path, fused):
    """fused AdamW skips the update of a non-finite step itself (engine.skip_if_not_finite: GradScaler's found_inf),
    so the loss is read when the device has it; a plain AdamW cannot, and the loss is read before its step. Either
    way the value is read after backward() is queued, and a NaN stops the run with the weights as they were."""
    run, loader, batch_loss = training_run(tmp_path, fused)
    Watched.log = []
    means = run.one_epoch(0, loader, batch_loss)
    assert Watched.log[0] == "backward" and Watched.log.count("backward") == 3, Watched.log
    assert means["scale"] == 2.0 and math.isfinite(means["loss"]) and run.n == 3

    run, loader, batch_loss = training_run(tmp_path, fused, batches=1)
    run.one_epoch(0, loader, batch_loss)                        # batch 0 alone: the weights after one good step
    after_one = copy.deepcopy(run.model.state_dict())
    run, loader, batch_loss = training_run(tmp_path, fused, nan_at=1)
    with pytest.raises(DivergedError, match="loss is nan at epoch 1, batch 2"):
        run.one_epoch(0, loader, batch_loss)
    for k, v in after_one.items():
        assert torch.equal(run.model.state_dict()[k], v), k     # the NaN step left them as they were
    assert not hasattr(run.opt, "found_inf")


# ----------------------------------------------------------------------------------------------
# What a GPU wants, its maths held on the CPU: the teacher's weights cast once, RN50 in channels_last


def small_clip(backbone):
    """A CLIP of RN50's kind (open_clip's ModifiedResNet: BatchNorm, an attention pool) or of ViT-B/16's, one block a
    stage (two for the ViT), 64 px: every kind of layer the real ones have, cheaply."""
    torch.manual_seed(0)
    vision = (dict(image_size=64, layers=(1, 1, 1, 1), width=8) if backbone == "RN50"
              else dict(image_size=64, patch_size=16, layers=2, width=64, head_width=32))
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, quick_gelu=True,
                          text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2))


@pytest.mark.parametrize("backbone", ["RN50", "ViT-B-16"])
def test_the_teachers_weights_cast_once_give_bitwise_what_autocast_computes(backbone):
    """cvlp.prepare_step on a GPU, here under a CPU bf16 autocast. nn.MultiheadAttention takes its fast path under a
    CPU autocast (not under CUDA's), a kernel chosen by the weights' dtype: it is turned off here so that the ViT's
    attention weights are cast as on a GPU (with it on, cast_frozen_weights sees the outputs change and casts none)."""
    teacher = small_clip(backbone).eval().requires_grad_(False)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), bf16():
            expected = teacher.encode_image(x)
        cast = clip_models.cast_frozen_weights(teacher, lambda: teacher.encode_image(x[:2]), bf16())
        with torch.no_grad(), bf16():
            got = teacher.encode_image(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    params = dict(teacher.named_parameters())
    assert torch.equal(got, expected)                            # bitwise
    assert cast and all(params[n].dtype == torch.bfloat16 for n in cast)
    assert "visual.conv1.weight" in cast and not [n for n in cast if "ln_" in n or ".bn" in n or "text" in n
                                                  or n.startswith(("token_embedding", "transformer."))]
    with torch.no_grad():                                        # autocast off (a CPU's training): nothing to cast
        fp32 = small_clip(backbone).eval().requires_grad_(False)
        assert clip_models.cast_frozen_weights(fp32, lambda: fp32.encode_image(x[:2]), engine.autocast("cpu")) == {}


def test_rn50_in_channels_last_is_the_same_maths():
    """cvlp.prepare_step's layout for RN50 on a GPU, on the CPU: the image embeddings, every gradient and the batch
    norms' running statistics of a training step as in NCHW; a ViT is left as it is."""
    nchw = small_clip("RN50").train()
    nhwc = copy.deepcopy(nchw)
    assert clip_models.channels_last(nhwc) and not clip_models.channels_last(small_clip("ViT-B-16"))
    assert nhwc.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    out = {}
    for name, model in (("nchw", nchw), ("nhwc", nhwc)):
        E = model.encode_image(x)
        out[name] = E.detach(), grads_of(model, E, w), {k: v.clone() for k, v in model.visual.state_dict().items()
                                                          if "running" in k}
    torch.testing.assert_close(out["nhwc"][0], out["nchw"][0], rtol=1e-5, atol=1e-5)
    assert_same_grads(out["nhwc"][1], out["nchw"][1])
    for k, v in out["nchw"][2].items():
        torch.testing.assert_close(out["nhwc"][2][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_resumed_optimiser_state_takes_its_parameters_layout():
    """Fused AdamW reads a parameter and its states as flat arrays: a state loaded in another layout than its
    parameter's (an RN50 checkpoint saved from channels_last, resumed in NCHW, or the reverse) would step the wrong
    entries. engine.states_like_params, as Training.restore calls it, gives the steps of the same layouts."""
    torch.manual_seed(0)
    w, g = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)

    def step_from_saved(memory_format, fix):
        p = torch.nn.Parameter(w.clone().contiguous(memory_format=memory_format))
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        saved = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": g.clone(), "exp_avg_sq": g.square()}},
                 "param_groups": [{**opt.state_dict()["param_groups"][0]}]}   # states saved in NCHW
        opt.load_state_dict(saved)
        if fix:
            engine.states_like_params(opt)
        p.grad = g.clone().contiguous(memory_format=memory_format)
        opt.step()
        return p.detach().contiguous()

    expected = step_from_saved(torch.contiguous_format, fix=False)
    assert torch.equal(step_from_saved(torch.channels_last, fix=True), expected)   # torch 2.14 without it: 5e-2 off
