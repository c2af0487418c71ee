"""The project's faster exact forms against the plain ones, on seeded random inputs, values and gradients (as
open_clip's tests/test_siglip_chunked_loss.py holds its chunked loss): AnSS's L_lin in blocks against L_lin as
Sec. 3.3 writes it, the LGR head's gram form against Eq. (4)-(7) as written (K and G built), the KNN vote in blocks
against the whole similarity matrix, the zero-shot classifier in groups of classes against open_clip's forward.
The equations themselves against hand-worked values: test_equations.py."""
import collections
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anss import anchor_scores, sentence_scores
from data import prompt_sentences
from evaluate import knn_predict, zero_shot_classifier
from lgr import LGRHead, Recognizer, recognition_loss
from util.clip_models import create_clip, tokenize_exact


def test_blocked_anchor_scores_equal_l_lin_as_written_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    E_I = F.normalize(torch.randn(37, 8, generator=g, dtype=torch.float64), dim=-1)   # N' = 37 images, D = 8
    E_T = F.normalize(torch.randn(23, 8, generator=g, dtype=torch.float64), dim=-1)   # S = 23 sentences
    y, t = torch.randint(0, 5, (37,), generator=g), torch.randint(0, 6, (23,), generator=g)   # class 5: no image
    y[:5] = torch.arange(5)                                                            # classes 0-4 have images
    for chunk in (1, 4, 10, 4096):                                                     # ragged blocks, one block
        blocked = anchor_scores(E_I, y, E_T, t, 0.07, num_classes=6, chunk=chunk)
        assert torch.allclose(blocked, sentence_scores(E_I, y, E_T, t, 0.07), rtol=1e-10, atol=1e-12)
    assert sentence_scores(E_I, y, E_T, t, 0.07)[t == 5].eq(0).all()                 # no image: score 0


# LGRHead's two forms. Three heads: the paper's default with a learnable tau (the project's option), the official
# variant (1/tau unclamped), and the official iNat models' detached norm of G, which changes only gradients.
HEADS = {"paper, tau learned": dict(variant="paper", learn_tau=True),
         "official": dict(variant="official"),
         "official, norm of G detached": dict(variant="official", detach_norm=True)}


def random_lgr_case(head_args):
    """Seeded float64 inputs: an LGRHead (D=8, C=4) with every weight moved off its init (LayerNorm gains and
    shifts, W_q, W_k, the MLP), E^I (B=3, D), and E^T (C, M=5, D) whose class 1 has 3 real anchors and 2 padded rows
    of large values, class 2 a single real anchor and zero rows (the released format's padding)."""
    torch.manual_seed(0)                                                 # the MLP's initialisation
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    head = LGRHead(D=8, C=4, tau=0.1, **head_args).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5 * randn(*p.shape) if p.requires_grad else 0)      # a fixed tau stays 0.1
    E_I = randn(3, 8)
    E_T = randn(4, 5, 8)
    E_T[1, 3:] = 50.0
    E_T[2, 1:] = 0.0
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5])
    return head, E_I, E_T, mask


def in_form(head, form):
    """head's forward in the given form ("paper": Eq. (4)-(7) as written; "gram"), with its own weights."""
    def forward(E_I, E_T, mask):
        before, head.form = head.form, form
        try:
            return head(E_I, E_T, mask)
        finally:
            head.form = before
    return forward


def head_outputs_and_gradients(forward, head, E_I, E_T, mask):
    """(logits_I, logits_T, A) of forward(E_I, E_T, mask) and the gradients of a loss that reaches all three
    (Eq. 9 plus a fixed weighting of A) w.r.t. every parameter of the head, E^I and E^T."""
    head.zero_grad(set_to_none=True)
    E_I, E_T = E_I.clone().requires_grad_(), E_T.clone().requires_grad_()
    logits_I, logits_T, A = forward(E_I, E_T, mask)
    weights = torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (recognition_loss(logits_I, logits_T, torch.tensor([0, 1, 2]))[0] + (weights * A).sum()).backward()
    grads = {name: p.grad for name, p in head.named_parameters()} | {"E_I": E_I.grad, "E_T": E_T.grad}
    return (logits_I.detach(), logits_T.detach(), A.detach()), grads


@pytest.mark.parametrize("case", HEADS)
def test_lgr_head_gram_form_equals_eq_4_to_7_as_written_in_values_and_gradients(case):
    head, E_I, E_T, mask = random_lgr_case(HEADS[case])
    cheap, cheap_grads = head_outputs_and_gradients(in_form(head, "gram"), head, E_I, E_T, mask)
    plain, plain_grads = head_outputs_and_gradients(in_form(head, "paper"), head, E_I, E_T, mask)
    for name, ours, want in zip(("logits_I", "logits_T", "A"), cheap, plain):
        assert torch.allclose(ours, want, rtol=1e-9, atol=1e-12), name
    A = cheap[2]
    assert A[:, 1, 3:].eq(0).all() and A[:, 2, 1:].eq(0).all()          # padding: exactly zero attention
    assert A[:, 2, 0].eq(1).all()                                        # a single real anchor takes all of it
    assert torch.allclose(A.sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=1e-12)
    # LN_k's shift adds Q.(W_k beta_k) to every score of an image, the same for all its anchors: the softmax over M
    # ignores it, so its gradient is zero (to rounding) in both forms
    assert cheap_grads.keys() == plain_grads.keys()
    for name, want in plain_grads.items():
        if want is None:                                                 # a fixed tau is not learned
            assert name == "log_inv_tau" and not HEADS[case].get("learn_tau") and cheap_grads[name] is None
            continue
        assert cheap_grads[name] is not None, name
        if name == "ln_k.bias":
            assert cheap_grads[name].abs().max() < 1e-12 and want.abs().max() < 1e-12, name
        else:
            assert want.abs().max() > 1e-3, name                         # the loss reaches every tensor compared
            assert torch.allclose(cheap_grads[name], want, rtol=1e-9, atol=1e-12), name


def test_detaching_the_norm_of_g_changes_gradients_only():
    """The official iNat models' v_detach: the same logits, other gradients (so the switch is not a no-op)."""
    _, E_I, E_T, mask = random_lgr_case({})
    outs = {}
    for detach in (False, True):
        head = random_lgr_case({"variant": "official", "detach_norm": detach})[0]
        outs[detach] = head_outputs_and_gradients(in_form(head, "paper"), head, E_I, E_T, mask)
    for a, b in zip(outs[False][0], outs[True][0]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outs[False][1]["E_T"], outs[True][1]["E_T"])


def test_lgr_recognizer_makes_the_anchor_side_once_as_buffers_outside_the_checkpoint():
    torch.manual_seed(0)
    clip = create_clip("shapes-tiny", 32)
    anchors = 3 * torch.randn(3, 2, 64)                                # (C, M, D) frozen, norms about 24
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    model = Recognizer(clip.visual, 64, 3, "lgr", anchors, mask, form="gram")
    E_T = model.anchors.double().numpy()                               # (3, 2, 64)
    assert model.anchors_mean.numpy() == pytest.approx(E_T.mean(-1), rel=1e-5, abs=1e-7)          # LayerNorm's mean
    assert model.anchors_std.numpy() == pytest.approx(np.sqrt(E_T.var(-1) + 1e-5), rel=1e-5)      # and its std, eps
    assert model.anchors_gram.numpy() == pytest.approx(np.einsum("cmd,cnd->cmn", E_T, E_T), rel=1e-5, abs=1e-4)
    assert {"anchors", "mask", "anchors_mean", "anchors_std", "anchors_gram"} <= dict(model.named_buffers()).keys()
    assert not any(k.startswith(("anchors", "mask")) for k in model.state_dict())   # lgr.pt keys unchanged
    assert dict(copy.deepcopy(model).to("meta").named_buffers())["anchors_gram"].is_meta   # they follow .to()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        E_I = model.visual(x).float()                                  # (3, 64)
        ours = model.head(E_I, model.anchors, model.mask, model.anchor_side())
        plain = in_form(model.head, "paper")(E_I, model.anchors, model.mask)
    for name, a, b in zip(("logits_I", "logits_T", "A"), ours, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


@torch.no_grad()
def test_zero_shot_classifier_in_groups_of_classes_is_the_mean_of_each_classs_80_prompts():
    """Zero-shot CLIP: class c's weight is the normalised mean of its 80 normalised prompt embeddings, whatever
    the grouping of classes (here 2 at a time, the last group of 1); reference: open_clip's full text forward."""
    torch.manual_seed(0)
    model = create_clip("shapes-tiny", 32).eval()
    names = ["red ring", "blue star", "green heart"]
    W = zero_shot_classifier(model, names, "cpu", classes_at_once=2)                      # (3, D)
    for c, name in enumerate(names):
        E = F.normalize(model.encode_text(tokenize_exact(prompt_sentences(name), 32)[0]), dim=-1)   # (80, D)
        assert torch.allclose(W[c], F.normalize(E.mean(0), dim=-1), atol=1e-5), name


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_knn_in_blocks_votes_as_counter_most_common_over_the_whole_matrix(chunk):
    """Blocks of images x sentences with a running top k give the vote of the plain (N, S) matrix counted as the
    official evaluation counts it (collections.Counter over the k nearest classes, nearest first). Few classes and
    k = 4, so ties happen and the tie rule is exercised."""
    g = torch.Generator().manual_seed(0)
    E_I = F.normalize(torch.randn(40, 4, generator=g), dim=-1)
    E_T = F.normalize(torch.randn(23, 4, generator=g), dim=-1)
    t = torch.randint(0, 3, (23,), generator=g)
    nearest = (E_I @ E_T.T).topk(4, dim=1).indices                                    # (40, 4) at once
    want = [collections.Counter(t[row].tolist()).most_common(1)[0][0] for row in nearest]
    ties = sum(len({c for c, n in collections.Counter(t[row].tolist()).items()
                    if n == max(collections.Counter(t[row].tolist()).values())}) > 1 for row in nearest)
    assert ties > 0
    assert knn_predict(E_I, E_T, t, k=4, num_classes=3, chunk=chunk).tolist() == want


@pytest.mark.parametrize("interpolation, size, scale", [("bicubic", 32, (0.5, 1.0)), ("bilinear", 24, (0.08, 1.0))])
def test_batched_resized_crops_equal_one_resize_per_image(interpolation, size, scale):
    """Transform.batch crops and resizes a whole batch in two matrix products (images.resized_crops_batched) where
    the plain form calls F.interpolate once per image: the same weights, so equal to float rounding before the uint8
    rounding, and after it at most one level apart on the rare pixel that sat on a .5 boundary."""
    from util import images
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 32, 40), dtype=torch.uint8, generator=g)      # not square: rows and columns
    torch.manual_seed(0)
    boxes = images.random_crop_boxes(48, 32, 40, scale)                              # up- and downscaling boxes
    plain = images.resized_crops(x, boxes, size, interpolation)
    batched = images.resized_crops_batched(x, boxes, size, interpolation)
    assert batched.shape == plain.shape == (48, 3, size, size)
    assert (batched - plain).abs().max() < 2e-4
    levels = (batched.clamp(0, 255).round() - plain.clamp(0, 255).round()).abs()
    assert levels.max() <= 1 and (levels > 0).float().mean() < 1e-3
