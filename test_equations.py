"""Every equation of VL-LTR (paper Sec. 3.2-3.4, Eq. 1-9; SPEC.md §2-3) against numbers worked out by hand.

    python -m pytest -q test_equations.py        # CPU, no data, a few seconds

Each test writes its tiny inputs out in full and computes the expected value in plain Python
(`math`) or numpy with the arithmetic visible: never by calling the function under test, nor
torch's own softmax / cross-entropy. S matrices have images as rows and sentences as columns.
"""
import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anss import anchor_scores, description_precision, select_anchors, sentence_scores
from cvlp import (class_wise_contrastive_loss, cosine_similarity_matrix, distillation_loss, pretraining_loss,
                  sample_sentences, temperature)
from data import Corpus, accuracy_by_shot, official_accuracy, prompt_sentences
from evaluate import knn_predict, zero_shot_classifier
from lgr import (LGRHead, Recognizer, class_text_logits, class_text_logits_via_gram, language_guided_attention,
                 lgr_probabilities, logit_sum_prediction, recognition_loss)
from util.clip_models import create_clip, interpolate_pos_embed, tokenize_exact
from util.errors import DataError
from util.shapes_lt import clip_loss
from tools.experiments import TABLE4, TABLE8, mean_std, regroup, table_markdown


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a busy 2-core CPU (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lse(*xs):
    """log(exp(x_1) + ... + exp(x_n)), the softmax denominator, by hand."""
    return math.log(sum(math.exp(x) for x in xs))


def T(rows):
    """A float64 tensor from nested lists (float64 so that hand values match to 1e-9)."""
    return torch.tensor(rows, dtype=torch.float64)


# The 3x3 similarity matrix used by the Eq. 2 and Eq. 3 tests: rows are images, columns sentences.
S3 = [[0.5, 0.2, -0.1],
      [0.3, 0.4, 0.0],
      [-0.2, 0.1, 0.6]]


# ----------------------------------------------------------------------------------------------
# Eq. (1)-(2): cosine similarities and the class-wise contrastive loss


def test_cosine_similarity_matrix_normalises_both_sides():
    E_I = T([[3.0, 4.0], [1.0, 0.0]])                 # lengths 5 and 1
    E_T = T([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])     # lengths 1, 2, sqrt(2)
    S = cosine_similarity_matrix(E_I, E_T)
    expected = [[3 / 5, 8 / (5 * 2), 7 / (5 * math.sqrt(2))],
                [1.0, 0.0, 1 / math.sqrt(2)]]
    assert S.tolist() == [pytest.approx(row, rel=1e-9) for row in expected]


def test_ccl_averages_log_prob_over_all_positives_of_a_row_and_a_column():
    # y = t = [0, 0, 1]: images 0 and 1 share class 0 with sentences 0 and 1; image 2 / sentence 2 are class 1.
    tau = 0.5
    a = [[s / tau for s in row] for row in S3]        # S / tau = [[1, .4, -.2], [.6, .8, 0], [-.4, .2, 1.2]]
    # L_vis: row softmax; rows 0 and 1 have 2 positives (columns 0, 1), row 2 has one (column 2).
    row = [lse(*a[i]) for i in range(3)]
    L_vis = (-((a[0][0] - row[0]) + (a[0][1] - row[0])) / 2
             - ((a[1][0] - row[1]) + (a[1][1] - row[1])) / 2
             - (a[2][2] - row[2])) / 3
    # L_lin: column softmax; columns 0 and 1 have 2 positive images (rows 0, 1), column 2 has one (row 2).
    col = [lse(a[0][j], a[1][j], a[2][j]) for j in range(3)]
    L_lin = (-((a[0][0] - col[0]) + (a[1][0] - col[0])) / 2
             - ((a[0][1] - col[1]) + (a[1][1] - col[1])) / 2
             - (a[2][2] - col[2])) / 3
    y = torch.tensor([0, 0, 1])
    L_ccl = class_wise_contrastive_loss(T(S3), y, y, tau)
    assert L_ccl.item() == pytest.approx(L_vis + L_lin, rel=1e-9)
    assert L_vis + L_lin == pytest.approx(1.5232, abs=1e-4)   # the number itself, for a reader checking by hand


def test_ccl_uses_image_labels_for_rows_and_sentence_labels_for_columns():
    # Images y = [0, 0, 1], sentences t = [0, 1, 1]: class 0 has 2 images but 1 sentence, class 1 the reverse,
    # so |T_i^+| (per row) and |I_j^+| (per column) differ. Images 0, 1 have the one positive sentence 0;
    # image 2 has sentences 1 and 2. Sentence 0 has the positive images 0, 1; sentences 1, 2 have image 2.
    tau = 0.5
    a = [[s / tau for s in row] for row in S3]
    row = [lse(*a[i]) for i in range(3)]
    col = [lse(a[0][j], a[1][j], a[2][j]) for j in range(3)]
    L_vis = (-(a[0][0] - row[0])
             - (a[1][0] - row[1])
             - ((a[2][1] - row[2]) + (a[2][2] - row[2])) / 2) / 3
    L_lin = (-((a[0][0] - col[0]) + (a[1][0] - col[0])) / 2
             - (a[2][1] - col[1])
             - (a[2][2] - col[2])) / 3
    L_ccl = class_wise_contrastive_loss(T(S3), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), tau)
    assert L_ccl.item() == pytest.approx(L_vis + L_lin, rel=1e-9)


def test_ccl_with_all_labels_distinct_is_twice_the_clip_loss():
    tau = 0.5
    a = [[s / tau for s in row] for row in S3]
    CE_rows = -sum(a[i][i] - lse(*a[i]) for i in range(3)) / 3                       # image -> text
    CE_cols = -sum(a[j][j] - lse(a[0][j], a[1][j], a[2][j]) for j in range(3)) / 3   # text -> image
    clip_loss = (CE_rows + CE_cols) / 2                                              # CLIP's symmetric loss
    y = torch.tensor([0, 1, 2])
    assert class_wise_contrastive_loss(T(S3), y, y, tau).item() == pytest.approx(2 * clip_loss, rel=1e-9)


def test_shapes_standin_clip_loss_is_clips_loss_with_repeated_pairs_as_positives():
    # E^I = E^T = the 3 unit vectors, so S = identity and S / tau = 2 I at tau = 0.5.
    E, tau = torch.eye(3, dtype=torch.float64), 0.5
    # All pairs distinct: every row and column is -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) = 0.2395.
    assert clip_loss(E, E, torch.tensor([4, 7, 9]), tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    # Pair 4 drawn twice (rows / columns 0 and 1 are copies): each of those rows averages -log p over both copies.
    p_self, p_other = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    copies = -(math.log(p_self) + math.log(p_other)) / 2
    expected = (2 * copies + -math.log(p_self)) / 3                 # rows (image -> text); columns are the same
    assert clip_loss(E, E, torch.tensor([4, 4, 9]), tau).item() == pytest.approx(expected, rel=1e-12)
    # In general it is Eq. (2) with one class per pair, halved: the same function of the same inputs.
    g = torch.Generator().manual_seed(0)
    E_I, E_T, pair = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor([0, 3, 3, 1, 0, 2])
    S = cosine_similarity_matrix(E_I, E_T)
    assert clip_loss(E_I, E_T, pair) == class_wise_contrastive_loss(S, pair, pair, 0.07) / 2   # bitwise


def test_ccl_official_smooths_the_normalised_multi_hot_target_by_0_1_and_halves_the_sum():
    tau, N, eps = 0.5, 3, 0.1
    a = np.array(S3) / tau
    logp_row = a - np.log(np.exp(a).sum(axis=1, keepdims=True))     # log softmax over each row
    logp_col = a - np.log(np.exp(a).sum(axis=0, keepdims=True))     # log softmax over each column
    # y = t = [0, 0, 1]: positives, each row (column) normalised to sum 1, then 0.9 * that + 0.1 / N.
    pos = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    target_vis = (1 - eps) * pos / pos.sum(axis=1, keepdims=True) + eps / N   # row 0: [.4833, .4833, .0333]
    target_lin = (1 - eps) * pos / pos.sum(axis=0, keepdims=True) + eps / N
    assert target_vis[0].tolist() == pytest.approx([0.45 + 0.1 / 3, 0.45 + 0.1 / 3, 0.1 / 3])
    L_vis = -(target_vis * logp_row).sum(axis=1).mean()
    L_lin = -(target_lin * logp_col).sum(axis=0).mean()
    y = torch.tensor([0, 0, 1])
    L = class_wise_contrastive_loss(T(S3), y, y, tau, variant="official")
    assert L.item() == pytest.approx((L_vis + L_lin) / 2, rel=1e-6)   # the targets are built in float32


# ----------------------------------------------------------------------------------------------
# Eq. (3): distillation from the frozen CLIP teacher

S3_TEACHER = [[0.03, 0.01, 0.00],       # teacher cosines; * 100 (official) gives logits [[3, 1, 0], ...]
              [0.00, 0.02, -0.01],
              [0.01, 0.00, 0.02]]


def test_distillation_paper_form_weights_diagonal_log_probs_by_teacher_diagonal_probs_at_student_tau():
    tau = 0.5
    a = [[s / tau for s in row] for row in S3]           # student logits
    b = [[s / tau for s in row] for row in S3_TEACHER]   # teacher logits, same tau (Eq. 3 has one tau)
    terms = []
    for i in range(3):
        p_row = math.exp(b[i][i]) / sum(math.exp(b[i][k]) for k in range(3))          # softmax_row(S'/tau)[i, i]
        p_col = math.exp(b[i][i]) / sum(math.exp(b[k][i]) for k in range(3))          # softmax_col(S'/tau)[i, i]
        logp_row = a[i][i] - lse(a[i][0], a[i][1], a[i][2])
        logp_col = a[i][i] - lse(a[0][i], a[1][i], a[2][i])
        terms.append(-p_row * logp_row - p_col * logp_col)
    L = distillation_loss(T(S3), T(S3_TEACHER), torch.tensor(tau, dtype=torch.float64))
    assert L.item() == pytest.approx(sum(terms) / 3, rel=1e-9)


def test_distillation_paper_form_detaches_tau_on_the_teacher_side():
    # d/dtau of -p'_ii * log p_ii, with p' constant: log p_ii = S_ii/tau - lse_k(S_ik/tau), so
    # d log p_ii / d tau = (-S_ii + sum_k p_ik S_ik) / tau^2  (rows; columns the same with S^T).
    tau = 0.5
    S, St = np.array(S3), np.array(S3_TEACHER)
    p_t_row = np.exp(St / tau) / np.exp(St / tau).sum(axis=1, keepdims=True)
    p_t_col = np.exp(St / tau) / np.exp(St / tau).sum(axis=0, keepdims=True)
    p_row = np.exp(S / tau) / np.exp(S / tau).sum(axis=1, keepdims=True)
    p_col = np.exp(S / tau) / np.exp(S / tau).sum(axis=0, keepdims=True)
    dlogp_row = (-np.diag(S) + (p_row * S).sum(axis=1)) / tau ** 2
    dlogp_col = (-np.diag(S) + (p_col * S).sum(axis=0)) / tau ** 2
    expected = -(np.diag(p_t_row) * dlogp_row + np.diag(p_t_col) * dlogp_col).mean()
    tau_t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    distillation_loss(T(S3), T(S3_TEACHER), tau_t).backward()
    assert tau_t.grad.item() == pytest.approx(expected, rel=1e-9)


def test_distillation_official_is_full_soft_target_cross_entropy_with_teacher_at_scale_100():
    tau = 0.5
    a = np.array(S3) / tau
    b = np.array(S3_TEACHER) * 100                       # [[3, 1, 0], [0, 2, -1], [1, 0, 2]]
    q_row = np.exp(b) / np.exp(b).sum(axis=1, keepdims=True)
    q_col = np.exp(b) / np.exp(b).sum(axis=0, keepdims=True)
    assert q_row[0].tolist() == pytest.approx([math.exp(3) / (math.exp(3) + math.e + 1),
                                               math.e / (math.exp(3) + math.e + 1), 1 / (math.exp(3) + math.e + 1)])
    logp_row = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
    logp_col = a - np.log(np.exp(a).sum(axis=0, keepdims=True))
    rows = -(q_row * logp_row).sum(axis=1).mean()       # -sum_j p'_ij log p_ij, averaged over images
    cols = -(q_col * logp_col).sum(axis=0).mean()       # the same over each sentence's column
    L = distillation_loss(T(S3), T(S3_TEACHER), torch.tensor(tau, dtype=torch.float64), variant="official")
    assert L.item() == pytest.approx((rows + cols) / 2, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Eq. (8): mixing


def test_pretraining_loss_mixes_lam_ccl_and_one_minus_lam_dis():
    L_ccl, L_dis = torch.tensor(2.0), torch.tensor(0.6)
    assert pretraining_loss(L_ccl, L_dis, 0.5).item() == pytest.approx(0.5 * 2.0 + 0.5 * 0.6)    # 1.3
    assert pretraining_loss(L_ccl, L_dis, 0.3).item() == pytest.approx(0.3 * 2.0 + 0.7 * 0.6)    # 1.02


def test_pretraining_loss_with_lam_1_ignores_the_distillation_loss():
    L_ccl, L_dis = torch.tensor(2.0, requires_grad=True), torch.tensor(123.0, requires_grad=True)
    L = pretraining_loss(L_ccl, L_dis, 1.0)
    L.backward()
    assert L.item() == 2.0
    assert L_ccl.grad.item() == 1.0 and L_dis.grad.item() == 0.0


# ----------------------------------------------------------------------------------------------
# AnSS (Sec. 3.3): sentence scores and selection

# I': 4 unit image embeddings, classes [0, 0, 1, 1]; 3 unit sentence embeddings, classes [0, 1, 0].
ANSS_E_I = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]]
ANSS_Y = [0, 0, 1, 1]
ANSS_E_T = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
ANSS_T = [0, 1, 0]


def test_anchor_score_is_l_lin_of_the_sentence_over_its_own_class_images():
    tau = 0.5
    # Column k of S / tau = E_I @ E_T[k] / tau, a softmax over all 4 images; average -log p over the class's images.
    s0 = [1.0 / tau, 0.6 / tau, 0.0 / tau, -0.6 / tau]                           # sentence 0 (class 0)
    s1 = [0.0 / tau, 0.8 / tau, 1.0 / tau, 0.8 / tau]                            # sentence 1 (class 1)
    s2 = [0.8 / tau, (0.48 + 0.48) / tau, 0.6 / tau, (-0.48 + 0.48) / tau]       # sentence 2 (class 0)
    expected = [-((s0[0] - lse(*s0)) + (s0[1] - lse(*s0))) / 2,     # images 0, 1 are class 0
                -((s1[2] - lse(*s1)) + (s1[3] - lse(*s1))) / 2,     # images 2, 3 are class 1
                -((s2[0] - lse(*s2)) + (s2[1] - lse(*s2))) / 2]
    args = torch.tensor(ANSS_E_I), torch.tensor(ANSS_Y), torch.tensor(ANSS_E_T), torch.tensor(ANSS_T), tau
    assert sentence_scores(*args).tolist() == pytest.approx(expected, rel=1e-6)     # L_lin as Sec. 3.3 writes it
    scores = anchor_scores(*args, num_classes=2)                     # the blocked form anss.py runs; float32, as
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)      # anss.run passes them


def test_blocked_anchor_scores_equal_l_lin_as_written_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    E_I = F.normalize(torch.randn(37, 8, generator=g, dtype=torch.float64), dim=-1)   # N' = 37 images, D = 8
    E_T = F.normalize(torch.randn(23, 8, generator=g, dtype=torch.float64), dim=-1)   # S = 23 sentences
    y, t = torch.randint(0, 5, (37,), generator=g), torch.randint(0, 6, (23,), generator=g)   # class 5: no image
    y[:5] = torch.arange(5)                                                            # classes 0-4 have images
    for chunk in (4, 10, 4096):                                                        # ragged blocks, one block
        blocked = anchor_scores(E_I, y, E_T, t, 0.07, num_classes=6, chunk=chunk)
        assert torch.allclose(blocked, sentence_scores(E_I, y, E_T, t, 0.07), rtol=1e-10, atol=1e-12)
    assert sentence_scores(E_I, y, E_T, t, 0.07)[t == 5].eq(0).all()                 # no image: score 0


@pytest.mark.parametrize("chunk", [1, 2, 3])                       # 4 images, 3 sentences: ragged last blocks too
def test_chunked_anchor_scores_equal_unchunked(chunk):
    args = torch.tensor(ANSS_E_I), torch.tensor(ANSS_Y), torch.tensor(ANSS_E_T), torch.tensor(ANSS_T), 0.5, 2
    whole = anchor_scores(*args, chunk=4096)
    assert anchor_scores(*args, chunk=chunk).tolist() == pytest.approx(whole.tolist(), rel=1e-6)


def test_a_class_without_images_in_i_prime_scores_zero_and_keeps_corpus_order():
    # Class 2 has sentences but no image in I' (L_lin has no image to average over): its sentences score 0, so
    # select_anchors keeps them in corpus order, as --select cutoff would. Classes 0 and 1 score as above.
    E_T, t = torch.tensor(ANSS_E_T + [[0.6, 0.8], [1.0, 0.0]]), torch.tensor(ANSS_T + [2, 2])
    args = torch.tensor(ANSS_E_I), torch.tensor(ANSS_Y)
    scores = anchor_scores(*args, E_T, t, 0.5, num_classes=3)
    assert scores[3:].tolist() == [0.0, 0.0]
    assert scores[:3].tolist() == anchor_scores(*args, E_T[:3], t[:3], 0.5, num_classes=2).tolist()
    assert anchor_scores(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), E_T, t, 0.5, 3).tolist() == [0.0] * 5


def test_select_anchors_keeps_the_m_lowest_scores_per_class_in_order_and_pads_short_classes():
    offsets = torch.tensor([0, 4, 6])                 # class 0: sentences 0..3, class 1: sentences 4, 5
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    index, mask = select_anchors(scores, offsets, M=3)
    assert index.tolist() == [[1, 3, 2],              # 0.1, 0.3, 0.5 (0.9 dropped)
                              [5, 4, 4]]              # 0.2, 0.7, then padding with the class's first sentence
    assert mask.tolist() == [[True, True, True],
                             [True, True, False]]


def test_select_anchors_breaks_score_ties_in_corpus_order():
    index, mask = select_anchors(torch.tensor([0.5, 0.2, 0.5, 0.2]), torch.tensor([0, 4]), M=3)
    assert index.tolist() == [[1, 3, 0]] and mask.tolist() == [[True, True, True]]


def test_select_anchors_cutoff_takes_the_first_m_sentences_in_corpus_order():
    index, mask = select_anchors(None, torch.tensor([0, 4, 6]), M=3)
    assert index.tolist() == [[0, 1, 2], [4, 5, 4]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


# ----------------------------------------------------------------------------------------------
# Eq. (4)-(6): language-guided attention


def test_description_precision_compares_anss_and_cutoff_on_the_description_sentences_alone():
    # class 0: template, d1 (noise), d2, d3; class 1: template, d1 (noise), d2. Templates never count.
    corpus = Corpus(sentences=[["t", "a", "b", "c"], ["t", "d", "e"]],
                    source=[["template"] + ["description"] * 3, ["template"] + ["description"] * 2],
                    informative=[[True, False, True, True], [True, False, True]])
    scores = torch.tensor([0.1, 0.95, 0.9, 0.2, 0.0, 0.3, 0.4])
    r = description_precision(scores, torch.tensor([0, 4, 7]), corpus, M=2)
    # AnSS: class 0 keeps c (0.2), b (0.9) -> 2 informative; class 1 keeps d, e -> 1. 3 of 4.
    # cut-off: class 0 keeps a, b -> 1; class 1 keeps d, e -> 1. 2 of 4. All descriptions: 3 of 5.
    assert r == pytest.approx({"anss": 0.75, "cutoff": 0.5, "corpus": 0.6, "kept": 4})


def test_attention_weights_are_the_softmax_of_qk_over_sqrt_d_and_padded_anchors_get_zero():
    Q = torch.tensor([[1.0, 2.0]])                                    # (B=1, D=2)
    K = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],           # class 0: 3 real anchors
                      [[0.5, 0.5], [-1.0, 0.0], [100.0, 100.0]]])     # class 1: the last is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    A = language_guided_attention(Q, K, mask)                          # (1, 2, 3)
    r = math.sqrt(2)
    q0 = [1.0 / r, 2.0 / r, 3.0 / r]                                   # Q.K / sqrt(D): 1, 2, 3 over sqrt 2
    q1 = [1.5 / r, -1.0 / r]                                           # padding (score 200 / sqrt 2) left out
    expected0 = [math.exp(s - lse(*q0)) for s in q0]
    expected1 = [math.exp(s - lse(*q1)) for s in q1] + [0.0]
    assert A[0, 0].tolist() == pytest.approx(expected0, rel=1e-6)
    assert A[0, 1].tolist() == pytest.approx(expected1, rel=1e-6)
    assert A[0, 1, 2].item() == 0.0                                     # exactly zero, despite the huge score
    assert A.sum(-1)[0].tolist() == pytest.approx([1.0, 1.0], rel=1e-6)  # sums to 1 over M


def layer_norm(x):
    """LayerNorm at its default init (weight 1, bias 0, eps 1e-5) over the last axis, by hand."""
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def test_official_lgr_head_starts_with_identity_projections_and_zero_bias():
    head = LGRHead(D=4, C=2, variant="official")
    for W in (head.W_q, head.W_k):
        assert W.weight.tolist() == np.eye(4).tolist()
        assert W.bias.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_lgr_head_gathers_anchors_by_attention_and_scores_classes_by_cosine_over_tau():
    torch.manual_seed(0)
    head = LGRHead(D=4, C=2, tau=0.07, variant="official")            # W_q = W_k = identity: Q = LN(E^I)
    E_I = [[1.0, 2.0, 3.0, 4.0],
           [0.0, 1.0, 0.0, -1.0]]
    E_T = [[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],   # class 0: 2 real, 1 padded
           [[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]]]   # class 1: 3 real
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        logits_I, logits_T, A = head(torch.tensor(E_I), torch.tensor(E_T), mask)

    Q, K, V = layer_norm(E_I), layer_norm(E_T), np.array(E_T)          # Eq. (4), (5): (2, 4), (2, 3, 4)
    scores = np.einsum("bd,cmd->bcm", Q, K) / math.sqrt(4)
    scores[:, 0, 2] = -np.inf                                          # padding
    A_hand = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)   # Eq. (6) weights
    assert A.numpy() == pytest.approx(A_hand, rel=1e-5, abs=1e-7)
    G = np.einsum("bcm,cmd->bcd", A_hand, V)                          # G = sum_m A_m V_m, (2, 2, 4)
    x = np.array(E_I)
    cos = (x[:, None, :] * G).sum(-1) / (np.linalg.norm(x, axis=-1)[:, None] * np.linalg.norm(G, axis=-1))
    assert logits_T.numpy() == pytest.approx(cos / 0.07, rel=1e-5)    # Eq. (7), text branch
    W1, b1 = head.mlp[0].weight.detach().double().numpy(), head.mlp[0].bias.detach().double().numpy()
    W2, b2 = head.mlp[2].weight.detach().double().numpy(), head.mlp[2].bias.detach().double().numpy()
    mlp = np.maximum(x @ W1.T + b1, 0.0) @ W2.T + b2                   # Linear(D, 4D) - ReLU - Linear(4D, C)
    assert logits_I.numpy() == pytest.approx(mlp, rel=1e-5, abs=1e-6)  # Eq. (7), visual branch


# ----------------------------------------------------------------------------------------------
# Eq. (4)-(7) without K (C, M, D) or G (B, C, D): LGRHead.forward against the plain form


def test_gathered_text_norm_is_the_quadratic_form_of_the_anchors_gram_matrix():
    E_I = T([[2.0, 0.0]])                                           # (B=1, D=2)
    V = T([[[1.0, 0.0], [1.0, 1.0]],                                # class 0: 2 real anchors
           [[0.0, 3.0], [9.0, 9.0]]])                               # class 1: the second is padding
    A = T([[[0.25, 0.75], [1.0, 0.0]]])                             # (1, 2, 2), padding at A = 0
    VVt = LGRHead(D=2, C=2).anchor_side(V)[2]                       # (2, 2, 2) <V_m, V_n>
    assert VVt.tolist() == [[[1.0, 1.0], [1.0, 2.0]],
                            [[9.0, 27.0], [27.0, 162.0]]]
    # class 0: G = 0.25 [1, 0] + 0.75 [1, 1] = [1, 0.75], |G|^2 = 1 + 0.5625 = 1.5625
    #          A^T VVt A = 0.25^2 * 1 + 2 * 0.25 * 0.75 * 1 + 0.75^2 * 2 = 0.0625 + 0.375 + 1.125 = 1.5625
    #          <E^I, G> = 0.25 * <[2,0],[1,0]> + 0.75 * <[2,0],[1,1]> = 0.5 + 1.5 = 2; cos = 2 / (2 * 1.25) = 0.8
    # class 1: G = [0, 3], A^T VVt A = 1 * 9 = 9 = |G|^2; <E^I, G> = 0: cos = 0 (the padded [9, 9] drops out)
    tau = 0.5
    EV = torch.einsum("bd,cmd->bcm", E_I, V)                         # (1, 2, 2) <E^I, V_cm>: [[2, 2], [0, 18]]
    out = class_text_logits_via_gram(E_I, A, EV, VVt, tau)
    assert out.tolist() == [pytest.approx([0.8 / tau, 0.0 / tau], rel=1e-12, abs=1e-12)]
    G = T([[[1.0, 0.75], [0.0, 3.0]]])                              # the same through the plain form
    assert out.tolist() == [pytest.approx(class_text_logits(E_I, G, tau)[0].tolist(), rel=1e-12, abs=1e-12)]


def random_lgr_case(variant):
    """Seeded float64 inputs for the cheap-vs-plain comparison: an LGRHead (D=8, C=4) with every weight moved
    off its init (LayerNorm gains and shifts, W_q, W_k and their biases all non-zero), E^I (B=3, D), and
    E^T (C, M=5, D) whose class 1 has 3 real anchors and 2 padded rows of large values, class 2 a single real
    anchor and zero rows (the released format's padding)."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=g, dtype=torch.float64)
    head = LGRHead(D=8, C=4, tau=0.1, variant=variant).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5 * randn(*p.shape) if p.requires_grad else 0)      # official: tau stays 0.1
    E_I = randn(3, 8)
    E_T = randn(4, 5, 8)
    E_T[1, 3:] = 50.0
    E_T[2, 1:] = 0.0
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5])
    return head, E_I, E_T, mask


def paper_form(head):
    """head's forward in the paper's form, Eq. (4)-(7) as written (K and G built), with its own weights."""
    def forward(E_I, E_T, mask):
        head.form = "paper"
        try:
            return head(E_I, E_T, mask)
        finally:
            head.form = "gram"
    return forward


def head_outputs_and_gradients(forward, head, E_I, E_T, mask):
    """(logits_I, logits_T, A) of forward(E_I, E_T, mask) and the gradients of a loss that reaches all three
    (Eq. 9 plus a fixed weighting of A) w.r.t. every parameter of the head, E^I and E^T."""
    head.zero_grad(set_to_none=True)
    E_I, E_T = E_I.clone().requires_grad_(), E_T.clone().requires_grad_()
    logits_I, logits_T, A = forward(E_I, E_T, mask)
    weights = torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (recognition_loss(logits_I, logits_T, torch.tensor([0, 1, 2])) + (weights * A).sum()).backward()
    grads = {name: p.grad for name, p in head.named_parameters()} | {"E_I": E_I.grad, "E_T": E_T.grad}
    return (logits_I.detach(), logits_T.detach(), A.detach()), grads


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_lgr_head_equals_the_plain_eq_4_to_7_in_values_and_gradients(variant):
    head, E_I, E_T, mask = random_lgr_case(variant)
    cheap, cheap_grads = head_outputs_and_gradients(head, head, E_I, E_T, mask)
    plain, plain_grads = head_outputs_and_gradients(paper_form(head), head, E_I, E_T, mask)
    for name, ours, want in zip(("logits_I", "logits_T", "A"), cheap, plain):
        assert torch.allclose(ours, want, rtol=1e-9, atol=1e-12), name
    A = cheap[2]
    assert A[:, 1, 3:].eq(0).all() and A[:, 2, 1:].eq(0).all()          # padding: exactly zero attention
    assert A[:, 2, 0].eq(1).all()                                        # a single real anchor takes all of it
    assert torch.allclose(A.sum(-1), torch.ones(3, 4, dtype=torch.float64), rtol=1e-12)
    # W_k's bias and LN_k's shift add Q.(W_k beta_k + b_k) to every score of an image, the same for all its
    # anchors: the softmax over M ignores it, so their gradient is zero (to rounding) in both forms
    constant_shift = ("W_k.bias", "ln_k.bias")
    assert cheap_grads.keys() == plain_grads.keys()
    for name, want in plain_grads.items():
        if want is None:                                                 # official: tau is not learned
            assert name == "log_inv_tau" and variant == "official" and cheap_grads[name] is None
            continue
        assert cheap_grads[name] is not None, name
        if name in constant_shift:
            assert cheap_grads[name].abs().max() < 1e-12 and want.abs().max() < 1e-12, name
        else:
            assert want.abs().max() > 1e-3, name                         # the loss reaches every tensor compared
            assert torch.allclose(cheap_grads[name], want, rtol=1e-9, atol=1e-12), name


# ----------------------------------------------------------------------------------------------
# Eq. (7): probabilities


def test_class_text_logits_are_cosine_of_image_and_gathered_text_over_tau():
    E_I = T([[1.0, 0.0], [0.0, 2.0]])                               # (B=2, D=2)
    G = T([[[1.0, 1.0], [0.0, -3.0]],                               # (B=2, C=2, D=2)
           [[3.0, 4.0], [1.0, 0.0]]])
    tau = 0.5
    expected = [[(1 / math.sqrt(2)) / tau, 0.0 / tau],              # cos([1,0],[1,1]) = 1/sqrt2; [1,0].[0,-3] = 0
                [(8 / (2 * 5)) / tau, 0.0 / tau]]                   # cos([0,2],[3,4]) = 8 / (2 * 5) = 0.8
    out = class_text_logits(E_I, G, tau)
    assert out.tolist() == [pytest.approx(row, rel=1e-9, abs=1e-12) for row in expected]


def test_lgr_probabilities_paper_is_the_sum_of_both_softmaxes_so_each_row_sums_to_2():
    logits_I, logits_T = T([[1.0, 2.0, 3.0]]), T([[0.0, 0.0, math.log(2)]])
    P_I = [math.exp(v) / (math.e + math.exp(2) + math.exp(3)) for v in (1.0, 2.0, 3.0)]
    P_T = [1 / 4, 1 / 4, 2 / 4]                                     # exp: 1, 1, 2 over 4
    P = lgr_probabilities(logits_I, logits_T, "paper")
    assert P[0].tolist() == pytest.approx([P_I[c] + P_T[c] for c in range(3)], rel=1e-9)
    assert P.sum().item() == pytest.approx(2.0, rel=1e-9)


def test_lgr_probabilities_official_mixes_alpha_p_i_and_one_minus_alpha_p_t():
    logits_I, logits_T = T([[1.0, 2.0, 3.0]]), T([[0.0, 0.0, math.log(2)]])
    P_I = [math.exp(v) / (math.e + math.exp(2) + math.exp(3)) for v in (1.0, 2.0, 3.0)]
    P_T = [1 / 4, 1 / 4, 2 / 4]
    P = lgr_probabilities(logits_I, logits_T, "official", alpha=0.2)
    assert P[0].tolist() == pytest.approx([0.2 * P_I[c] + 0.8 * P_T[c] for c in range(3)], rel=1e-9)
    assert P.sum().item() == pytest.approx(1.0, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Eq. (9): recognition loss


def test_recognition_loss_is_cross_entropy_of_both_branches_summed():
    logits_I = T([[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    logits_T = T([[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]])
    y = torch.tensor([0, 2])
    CE_I = (-(2.0 - lse(2.0, 1.0, 0.0)) - (1.0 - lse(0.5, 0.5, 1.0))) / 2     # -log p[i, y_i], mean over 2
    CE_T = (-(0.0 - lse(0.0, 1.0, 0.0)) - (0.0 - lse(1.0, -1.0, 0.0))) / 2
    assert recognition_loss(logits_I, logits_T, y).item() == pytest.approx(CE_I + CE_T, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Gradients: what learns and what stays frozen


def tiny_batch(n=3, context=32, seed=0):
    """n random 32 px images and n token rows (random words, EOT at position 5) for the shapes-tiny CLIP."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 1000, (n, context), generator=g)
    tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 49406, 49407, 0   # SOT ... EOT, padding (argmax pools EOT)
    return x, tokens


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_cvlp_step_trains_student_and_its_tau_but_never_the_frozen_teacher(variant):
    torch.manual_seed(0)
    student = create_clip("shapes-tiny", 32)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():                      # the teacher differs from the student, as after some CVLP steps
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
        student.logit_scale.fill_(math.log(1 / 0.07))
    x, tokens = tiny_batch()
    y = torch.tensor([0, 0, 1])
    S = cosine_similarity_matrix(student.encode_image(x), student.encode_text(tokens))     # Eq. (1), (N, N)
    tau = temperature(student.logit_scale)
    with torch.no_grad():
        S_t = cosine_similarity_matrix(teacher.encode_image(x), teacher.encode_text(tokens))
    L_ccl = class_wise_contrastive_loss(S, y, y, tau, variant)
    L_dis = distillation_loss(S, S_t, tau, variant)
    pretraining_loss(L_ccl, L_dis, 0.5).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.logit_scale.grad is not None and student.logit_scale.grad.abs().item() > 0
    assert student.visual.conv1.weight.grad.abs().sum().item() > 0
    assert student.token_embedding.weight.grad.abs().sum().item() > 0


def test_distillation_alone_reaches_the_student_encoders():
    torch.manual_seed(0)
    student = create_clip("shapes-tiny", 32)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, tokens = tiny_batch()
    S = cosine_similarity_matrix(student.encode_image(x), student.encode_text(tokens))
    tau = temperature(student.logit_scale)
    with torch.no_grad():
        S_t = cosine_similarity_matrix(teacher.encode_image(x), teacher.encode_text(tokens))
    pretraining_loss(torch.zeros(()), distillation_loss(S, S_t, tau), 0.0).backward()   # lam = 0: L_dis only
    assert student.visual.conv1.weight.grad.abs().sum().item() > 0
    assert student.logit_scale.grad.abs().item() > 0


@functools.lru_cache(maxsize=None)
def lgr_step(variant):
    """One fine-tuning backward pass of a Recognizer (shapes-tiny visual encoder, LGR head, C=3, M=2).
    Cached: the tests below only read its parameters and gradients."""
    torch.manual_seed(0)
    clip = create_clip("shapes-tiny", 32)
    anchors = torch.nn.functional.normalize(torch.randn(3, 2, 64), dim=-1)     # (C, M, D) frozen
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    model = Recognizer(clip.visual, 64, 3, "lgr", 0.07, variant, anchors, mask)
    x, _ = tiny_batch()
    logits_I, logits_T, _ = model(x)
    recognition_loss(logits_I, logits_T, torch.tensor([0, 1, 2])).backward()   # Eq. (9)
    return model


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_lgr_anchor_embeddings_are_buffers_without_gradient_while_the_head_learns(variant):
    model = lgr_step(variant)
    names = [n for n, _ in model.named_parameters()]
    assert "anchors" not in names and "anchors" in dict(model.named_buffers())
    assert model.anchors.grad is None and not model.anchors.requires_grad
    head = model.head
    for p in (head.W_q.weight, head.W_k.weight, head.mlp[0].weight, head.mlp[2].weight):
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    assert model.visual.conv1.weight.grad.abs().sum().item() > 0     # visual encoder fine-tuned (paper)


def test_lgr_tau_is_learned_in_the_paper_variant():
    head = lgr_step("paper").head
    assert head.log_inv_tau.requires_grad
    assert head.log_inv_tau.grad is not None and head.log_inv_tau.grad.abs().item() > 0


def test_lgr_tau_is_fixed_at_0_07_in_the_official_variant():
    model = lgr_step("official")
    head = model.head
    assert not head.log_inv_tau.requires_grad and head.log_inv_tau.grad is None
    assert 1 / math.exp(head.log_inv_tau.item()) == pytest.approx(0.07, rel=1e-6)
    assert all(p is not head.log_inv_tau for p in model.parameters() if p.requires_grad)   # not given to AdamW


def test_lgr_recognizer_makes_the_anchor_side_once_as_buffers_outside_the_checkpoint():
    model = lgr_step("paper")                                          # C=3, M=2, D=64; class 1 has 1 real anchor
    E_T = model.anchors.double().numpy()                               # (3, 2, 64)
    assert model.anchors_mean.numpy() == pytest.approx(E_T.mean(-1), rel=1e-5, abs=1e-7)          # LayerNorm's mean
    assert model.anchors_std.numpy() == pytest.approx(np.sqrt(E_T.var(-1) + 1e-5), rel=1e-5)      # and its std, eps
    assert model.anchors_gram.numpy() == pytest.approx(np.einsum("cmd,cnd->cmn", E_T, E_T), rel=1e-5, abs=1e-6)
    assert {"anchors", "mask", "anchors_mean", "anchors_std", "anchors_gram"} <= dict(model.named_buffers()).keys()
    assert not any(k.startswith(("anchors", "mask")) for k in model.state_dict())   # lgr.pt keys unchanged
    assert dict(copy.deepcopy(model).to("meta").named_buffers())["anchors_gram"].is_meta   # they follow .to()
    x, _ = tiny_batch()
    with torch.no_grad():
        E_I = model.visual(x).float()                                  # (3, 64)
        ours = model.head(E_I, model.anchors, model.mask, model.anchor_side())
        plain = paper_form(model.head)(E_I, model.anchors, model.mask)
    for name, a, b in zip(("logits_I", "logits_T", "A"), ours, plain):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


# ----------------------------------------------------------------------------------------------
# Positional-embedding interpolation (224 -> 384 in the paper; 32 -> 64 px here)


def test_interpolate_pos_embed_keeps_class_token_and_a_constant_grid_constant():
    sd = {k: v.clone() for k, v in create_clip("shapes-tiny", 32).state_dict().items()}
    key = "visual.positional_embedding"
    assert sd[key].shape == (1 + 8 * 8, 64)                           # patch 4 on 32 px: 8 x 8 grid
    v = torch.arange(64, dtype=torch.float32) / 100                   # one vector, the same at every position
    sd[key][1:] = v
    class_row = sd[key][0].clone()
    model = create_clip("shapes-tiny", 64)
    out = interpolate_pos_embed(dict(sd), model)
    assert out[key].shape == (1 + 16 * 16, 64)                        # 64 px: 16 x 16 grid
    assert torch.equal(out[key][0], class_row)
    assert out[key][1:].numpy() == pytest.approx(np.tile(v.numpy(), (256, 1)), abs=1e-6)
    model.load_state_dict(out, strict=True)


def test_interpolate_pos_embed_keeps_the_grid_orientation():
    sd = {k: v.clone() for k, v in create_clip("shapes-tiny", 32).state_dict().items()}
    key = "visual.positional_embedding"
    col = torch.arange(8, dtype=torch.float32).repeat(8)             # position (r, c) = row-major r * 8 + c -> c
    sd[key][1:, 0] = col                                              # dimension 0 encodes the column
    sd[key][1:, 1] = 5.0                                              # dimension 1 is constant
    out = interpolate_pos_embed(dict(sd), create_clip("shapes-tiny", 64))
    grid = out[key][1:, 0].reshape(16, 16)                            # (row, column)
    assert torch.allclose(grid, grid[0].expand(16, 16), atol=1e-5)  # every row alike: depends on the column only
    assert (grid[0, 1:] >= grid[0, :-1] - 1e-5).all() and grid[0, -1] - grid[0, 0] > 6
    assert out[key][1:, 1].numpy() == pytest.approx(np.full(256, 5.0), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# KNN head (Table 4 #6) and sentence sampling (Sec. 3.2)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


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


def test_knn_predicts_the_majority_class_of_the_k_nearest_real_anchors():
    E_I = torch.tensor([unit(0)])
    anchors = torch.tensor([[unit(10), unit(0)],       # class 0: 10 deg, and padding right on the query
                            [unit(15), unit(20)],      # class 1: 15 and 20 deg
                            [unit(90), unit(180)]])    # class 2: far away
    mask = torch.tensor([[True, False], [True, True], [True, True]])
    # Real anchors by cosine: 10 deg (class 0), 15 deg (class 1), 20 deg (class 1): class 1 wins 2 to 1.
    assert knn_predict(E_I, anchors, mask, k=3).tolist() == [1]
    # Counted, the padding would give class 0 the two nearest anchors and the vote 2 to 1.
    assert knn_predict(E_I, anchors, torch.ones(3, 2, dtype=torch.bool), k=3).tolist() == [0]
    # k = 1: the single nearest real anchor (class 0 at 10 deg), not the padding.
    assert knn_predict(E_I, anchors, mask, k=1).tolist() == [0]


def test_knn_padded_anchors_never_vote_even_when_k_exceeds_the_real_anchors():
    E_I = torch.tensor([unit(0)])
    anchors = torch.tensor([[unit(80), unit(0), unit(1)],     # class 0: one real anchor, two padded near the query
                            [unit(60), unit(70), unit(75)]])  # class 1: three real anchors
    mask = torch.tensor([[True, False, False], [True, True, True]])
    # k = 10 > 4 real anchors: all 4 vote, class 1 has 3 of them.
    assert knn_predict(E_I, anchors, mask, k=10).tolist() == [1]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_knn_in_blocks_votes_as_the_whole_similarity_matrix_does(chunk):
    """Blocks of images x anchors with a running top k give the votes of the plain (N, C M) matrix."""
    g = torch.Generator().manual_seed(0)
    E_I = F.normalize(torch.randn(10, 4, generator=g), dim=-1)
    anchors = F.normalize(torch.randn(5, 4, 4, generator=g), dim=-1)          # C = 5 classes, M = 4
    mask = torch.rand(5, 4, generator=g) < 0.7
    mask[:, 0] = True                                                          # every class has a real anchor
    sim = (E_I @ anchors.reshape(20, 4).T).masked_fill(~mask.reshape(1, 20), float("-inf"))   # (10, 20) at once
    top, idx = sim.topk(3, dim=1)
    votes = torch.zeros(10, 5).scatter_add_(1, idx // 4, 1 + 1e-3 * top)
    assert knn_predict(E_I, anchors, mask, k=3, chunk=chunk).tolist() == votes.argmax(1).tolist()


def test_sample_sentences_draws_inside_each_images_class_range():
    offsets = torch.tensor([0, 2, 5])                   # class 0: sentences 0, 1; class 1: sentences 2, 3, 4
    y = torch.tensor([0, 1] * 300)
    idx = sample_sentences(offsets, y, torch.Generator().manual_seed(0))
    assert set(idx[y == 0].tolist()) == {0, 1}
    assert set(idx[y == 1].tolist()) == {2, 3, 4}
    assert idx.shape == (600,)


def test_accuracy_by_shot_splits_test_images_by_their_class_training_count():
    # Sec. 4.2: classes with 200 / 50 / 5 training images are many / medium / few.
    counts = np.array([200, 50, 5])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 2, 0])         # right, right | right, wrong | right, wrong
    r = accuracy_by_shot(pred, y, counts)
    assert r["overall"] == pytest.approx(100 * 4 / 6)
    assert (r["many"], r["medium"], r["few"]) == pytest.approx((100.0, 50.0, 50.0))
    assert r["per_class"] == [100.0, 50.0, 50.0]


def test_official_columns_come_from_the_logit_sum_not_the_alpha_mix():
    # SPEC.md §3: the official evaluation's overall is argmax of 0.2 softmax(logits_I) + 0.8 softmax(logits_T),
    # its many / medium / few columns argmax of logits_I + logits_T. One test image per class; the classes have
    # 150 / 50 / 10 training images: many / medium / few.
    counts = np.array([150, 50, 10])
    y = torch.tensor([0, 1, 2])
    logits_I = torch.tensor([[2.0, 0.0, 0.0], [4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    logits_T = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # Image 0: both branches say class 0, both rules are right. Image 1 (class 1):
    #   logit sum [4, 1, 0] -> class 0, wrong.
    #   softmax([4, 0, 0]) = [e^4, 1, 1] / (e^4 + 2) = [0.9647, 0.0177, 0.0177]
    #   softmax([0, 1, 0]) = [1, e, 1] / (e + 2)     = [0.2119, 0.5761, 0.2119]
    #   mix = 0.2 * first + 0.8 * second            = [0.3624, 0.4644, 0.1731] -> class 1, right.
    # Image 2 is image 1 with classes 1 and 2 swapped: logit sum wrong (class 0), mix right (class 2).
    a, b = math.exp(4) / (math.exp(4) + 2), 1 / (math.exp(4) + 2)
    c, d = 1 / (math.e + 2), math.e / (math.e + 2)
    mix_1 = [0.2 * a + 0.8 * c, 0.2 * b + 0.8 * d, 0.2 * b + 0.8 * c]
    assert mix_1 == pytest.approx([0.3624, 0.4644, 0.1731], abs=1e-4)
    P = lgr_probabilities(logits_I, logits_T, "official", alpha=0.2)
    assert P[1].tolist() == pytest.approx(mix_1, abs=1e-6)
    mix, logit_sum = P.argmax(1), logit_sum_prediction(logits_I, logits_T)
    assert mix.tolist() == [0, 1, 2] and logit_sum.tolist() == [0, 0, 0]

    by_mix, by_sum = accuracy_by_shot(mix, y, counts), accuracy_by_shot(logit_sum, y, counts)
    assert [by_mix[k] for k in ("overall", "many", "medium", "few")] == pytest.approx([100.0, 100.0, 100.0, 100.0])
    assert [by_sum[k] for k in ("overall", "many", "medium", "few")] == pytest.approx([100 / 3, 100.0, 0.0, 0.0])
    # As the official evaluation reports it: overall 100 of the mix, columns 100 / 0 / 0 of the logit sum,
    # whose class-weighted mean (100 + 0 + 0) / 3 = 33.3 is not the overall, as with the paper's 69.0 vs 70.1.
    assert official_accuracy(mix, logit_sum, y, counts) == pytest.approx(
        {"overall": 100.0, "many": 100.0, "medium": 0.0, "few": 0.0})


def test_regroup_recomputes_the_shot_columns_from_per_class_accuracies_with_the_papers_boundaries():
    # Five classes with 150 / 100 / 50 / 20 / 10 training images and the same number of test images each
    # (balanced): per-class top-1 90 / 80 / 60 / 40 / 10, overall (90 + 80 + 60 + 40 + 10) / 5 = 56.
    # Stored under > 100 / < 20: many 90, medium (80 + 60 + 40) / 3 = 60, few 10. The paper's >= 100 / <= 20:
    # many (90 + 80) / 2 = 85, medium 60, few (40 + 10) / 2 = 25.
    stored = {"overall": 56.0, "many": 90.0, "medium": 60.0, "few": 10.0, "per_class": [90.0, 80.0, 60.0, 40.0, 10.0]}
    methods = [(folder, method) for _, folder, method in TABLE8] + [(folder, method) for _, folder, method, _ in TABLE4]
    methods += [("full", f"VL-LTR (LGR): {b} only") for b in ("P^I", "P^T")]
    results = {}
    for folder, method in methods:
        results.setdefault(folder, {})[method] = dict(stored)
    report = {"data": "shapes_lt", "per_seed": {0: {"train_counts": [150, 100, 50, 20, 10], "results": results}}}
    new = regroup(report)
    r = new["per_seed"][0]["results"]["full"]["VL-LTR (LGR)"]
    assert (r["overall"], r["many"], r["medium"], r["few"]) == pytest.approx((56.0, 85.0, 60.0, 25.0))
    assert new["table8"]["VL-LTR"]["few"] == pytest.approx({"mean": 25.0, "std": 0.0})
    assert new["table4"]["#1 full VL-LTR"]["many"]["mean"] == pytest.approx(85.0)
    assert new["table4"]["#1 full VL-LTR"]["paper"] == 70.1
    assert new["shot_split"].startswith("many >= 100, few <= 20")
    # An overall that is not the mean of the per-class accuracies: the test split was not balanced.
    results["full"]["VL-LTR (LGR)"]["overall"] = 60.0
    with pytest.raises(DataError, match="not the mean of its per-class accuracies .*the test split is not balanced"):
        regroup(report)


def test_table_cells_are_mean_and_sample_std_over_seeds():
    assert mean_std([70.0, 72.0, 74.0]) == pytest.approx((72.0, 2.0))        # std: sqrt((4 + 0 + 4) / 2)
    assert mean_std([65.5]) == (65.5, 0.0)
    cell = {k: {"mean": 72.0, "std": 2.0} for k in ("overall", "many", "medium", "few")}
    report = {"data": "shapes_lt", "split": "test", "seeds": [0, 1, 2], "device": "cpu", "torch": "2", "date": "d",
              "epochs": {"cvlp": 10, "lgr": 20, "baseline": 30}, "wall_seconds": 60.0, "table8": {"VL-LTR": cell},
              "table4": {"#1 full VL-LTR": {**cell, "paper": 70.1}}, "branches": {"P^T": cell},
              "anss_precision": {"AnSS, M = 64 from the descriptions alone": {"mean": 0.75, "std": 0.05}}}
    md = table_markdown(report)
    assert "| VL-LTR | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 |" in md
    assert "| #1 full VL-LTR | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 70.1 |" in md
    assert "| AnSS, M = 64 from the descriptions alone | 75.0% ± 5.0 |" in md
