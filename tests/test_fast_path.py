"""The fast single-GPU path is the same maths: trimmed text (clip_models.encode_text_trimmed), the cached teacher text
(cvlp.run) and --compile, each against the plain computation it replaces."""
import argparse

import open_clip
import pytest
import torch
import torch.nn.functional as F

import cvlp
from util import clip_models

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
    """--compile with the cheap "aot_eager" backend: the default inductor backend takes ~50 s to compile this
    tiny model on a 2-core CPU. The plumbing is the same: Dynamo traces the encoder, AOTAutograd its backward."""
    real_compile, compiled = torch.nn.Module.compile, []

    def cheap_compile(module, *a, **k):
        compiled.append(type(module).__name__)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", cheap_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cvlp.main(["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--out", str(tmp_path), "--device", "cpu",
               "--clip-weights", str(shapes_env["clip"]), "--batch", "16", "--epochs", "1", "--stop-after-steps", "1",
               "--compile"])
    assert compiled == ["VisionTransformer", "VisionTransformer"]          # student's and teacher's image encoders
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1     # the compiled forward ran
    saved = torch.load(tmp_path / "cvlp.pt", weights_only=True)["model"]
    assert not [key for key in saved if "_orig_mod" in key]
    fresh = clip_models.create_clip("shapes-tiny", 32)
    fresh.load_state_dict(saved)                                 # strict: every key of the uncompiled model
    start = torch.load(shapes_env["clip"], weights_only=True)
    assert not torch.equal(saved["visual.conv1.weight"], start["visual.conv1.weight"])   # one step trained it
    torch._dynamo.reset()
