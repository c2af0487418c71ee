"""Every equation of VL-LTR (paper Sec. 3.2-3.4, Eq. 1-9) and the method's rules around them (AnSS's selection,
the KNN vote, the shot splits, the official evaluation's two predictions) against numbers worked out by hand.

    python -m pytest -q test_equations.py        # CPU, no data, a few seconds

Each test writes its tiny inputs out in full and computes the expected value in plain Python
(`math`) or numpy with the arithmetic visible: never by calling the function under test, nor
torch's own softmax / cross-entropy. S matrices have images as rows and sentences as columns.
Where the project also runs a faster exact form (AnSS in blocks, the LGR head's gram form), the hand values hold
both; the fast forms against the plain ones on random inputs, values and gradients, are tests/test_exact_forms.py's,
and the settings (defaults and the official variant) tests/test_settings.py's.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anss import anchor_scores, select_anchors, sentence_scores
from cvlp import class_wise_contrastive_loss, cosine_similarity_matrix, distillation_loss, pretraining_loss, sample_sentences
from data import accuracy_by_shot, official_accuracy
from evaluate import knn_predict
from lgr import (LGRHead, class_text_logits, class_text_logits_via_gram, language_guided_attention, lgr_probabilities,
                 logit_sum_prediction, recognition_loss)


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


def anss_hand_scores(tau):
    """L_lin of the three ANSS_ sentences by hand: column k of S / tau = E_I @ E_T[k] / tau, a softmax over all 4
    images of I'; -log p averaged over the images of the sentence's class."""
    s0 = [1.0 / tau, 0.6 / tau, 0.0 / tau, -0.6 / tau]                           # sentence 0 (class 0)
    s1 = [0.0 / tau, 0.8 / tau, 1.0 / tau, 0.8 / tau]                            # sentence 1 (class 1)
    s2 = [0.8 / tau, (0.48 + 0.48) / tau, 0.6 / tau, (-0.48 + 0.48) / tau]       # sentence 2 (class 0)
    return [-((s0[0] - lse(*s0)) + (s0[1] - lse(*s0))) / 2,     # images 0, 1 are class 0
            -((s1[2] - lse(*s1)) + (s1[3] - lse(*s1))) / 2,     # images 2, 3 are class 1
            -((s2[0] - lse(*s2)) + (s2[1] - lse(*s2))) / 2]


def test_anchor_score_is_l_lin_of_the_sentence_over_its_own_class_images():
    tau = 0.5
    expected = anss_hand_scores(tau)
    args = torch.tensor(ANSS_E_I), torch.tensor(ANSS_Y), torch.tensor(ANSS_E_T), torch.tensor(ANSS_T), tau
    assert sentence_scores(*args).tolist() == pytest.approx(expected, rel=1e-6)     # L_lin as Sec. 3.3 writes it
    for chunk in (1, 2, 4096):                                       # the blocked form anss.py runs, ragged blocks
        scores = anchor_scores(*args, num_classes=2, chunk=chunk)    # too; float32, as anss.run passes them
        assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_a_class_without_images_in_i_prime_scores_zero_and_keeps_corpus_order():
    # Class 2 has sentences but no image in I' (L_lin has no image to average over): its sentences score 0, so
    # select_anchors keeps them in corpus order, as --select cutoff would. Classes 0 and 1 score as above.
    E_T, t = torch.tensor(ANSS_E_T + [[0.6, 0.8], [1.0, 0.0]]), torch.tensor(ANSS_T + [2, 2])
    args = torch.tensor(ANSS_E_I), torch.tensor(ANSS_Y)
    for scores in (anchor_scores(*args, E_T, t, 0.5, num_classes=3), sentence_scores(*args, E_T, t, 0.5)):
        assert scores.tolist() == pytest.approx(anss_hand_scores(0.5) + [0.0, 0.0], rel=1e-6)
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


@pytest.mark.parametrize("form", ["paper", "gram"])
def test_lgr_head_gathers_anchors_by_attention_and_scores_classes_by_cosine_over_tau(form):
    torch.manual_seed(0)
    head = LGRHead(D=4, C=2, tau=0.07, form=form)                      # W_q = W_k = identity at the start: Q = LN(E^I)
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
# Eq. (7)'s text branch without G (B, C, D): the gram form's identity, and the official iNat models' detached norm


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
    assert class_text_logits(E_I, G, tau).tolist() == [pytest.approx([0.8 / tau, 0.0 / tau], rel=1e-12, abs=1e-12)]


def test_detached_norm_keeps_the_cosine_and_drops_the_gradient_through_the_norm_of_g():
    # E^I = [1, 0], G = [3, 4]: |G| = 5, cos = 3 / 5. With tau = 0.5 the logit is 1.2 either way. Its gradient with
    # respect to G: through the plain cosine <e, G> / (|e| |G|), (e / |G| - cos G / |G|^2) / tau
    #   = ([0.2, 0] - 0.6 [3, 4] / 25) / 0.5 = ([0.2 - 0.072, -0.096]) / 0.5 = [0.256, -0.192];
    # with |G| a constant (the official iNat models' v_detach), e / |G| / tau = [0.2, 0] / 0.5 = [0.4, 0].
    tau = 0.5
    for detach, grad in ((False, [0.256, -0.192]), (True, [0.4, 0.0])):
        E_I, G = T([[1.0, 0.0]]), T([[[3.0, 4.0]]]).requires_grad_()
        out = class_text_logits(E_I, G, tau, detach_norm=detach)
        out.sum().backward()
        assert out.item() == pytest.approx(1.2, rel=1e-12)
        assert G.grad[0, 0].tolist() == pytest.approx(grad, rel=1e-9, abs=1e-12), detach
        # the gram form: <E^I, G> = 1 * <e, V>, |G|^2 = V V^T (one anchor, A = 1)
        V = T([[[3.0, 4.0]]]).requires_grad_()
        A, VVt = T([[[1.0]]]), V[0] @ V[0].T
        out = class_text_logits_via_gram(E_I, A, torch.einsum("bd,cmd->bcm", E_I, V), VVt[None], tau, detach)
        out.sum().backward()
        assert out.item() == pytest.approx(1.2, rel=1e-12)
        assert V.grad[0, 0].tolist() == pytest.approx(grad, rel=1e-9, abs=1e-12), detach


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
    L_rec, terms = recognition_loss(logits_I, logits_T, y)
    assert L_rec.item() == pytest.approx(CE_I + CE_T, rel=1e-9)
    assert (terms["CE_I"].item(), terms["CE_T"].item()) == pytest.approx((CE_I, CE_T), rel=1e-9)


def test_recognition_loss_on_soft_targets_is_the_expected_negative_log_probability():
    # --mixup's targets are class probabilities: CE = -sum_c p_c log softmax(logits)_c, per image, then the mean.
    logits = T([[2.0, 1.0, 0.0]])
    p = T([[0.7, 0.2, 0.1]])
    z = lse(2.0, 1.0, 0.0)
    CE = -(0.7 * (2.0 - z) + 0.2 * (1.0 - z) + 0.1 * (0.0 - z))
    assert recognition_loss(logits, logits, p)[0].item() == pytest.approx(2 * CE, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# KNN head (Table 4 #6) and sentence sampling (Sec. 3.2)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_predicts_the_majority_class_of_the_k_nearest_sentences():
    E_I = torch.tensor([unit(0)])
    E_T = torch.tensor([unit(10), unit(15), unit(20), unit(90), unit(180)])
    t = torch.tensor([0, 1, 1, 2, 2])
    # By cosine: 10 deg (class 0), 15 (class 1), 20 (class 1), 90, 180 (class 2). k = 3: class 1 wins 2 to 1.
    assert knn_predict(E_I, E_T, t, k=3, num_classes=3).tolist() == [1]
    # k = 1: the single nearest sentence's class. k = 5: class 1 and 2 have 2 votes each, class 2's nearest is
    # further (90 deg) than class 1's (15 deg): class 1.
    assert knn_predict(E_I, E_T, t, k=1, num_classes=3).tolist() == [0]
    assert knn_predict(E_I, E_T, t, k=5, num_classes=3).tolist() == [1]


def test_knn_tie_goes_to_the_tied_class_met_first_in_order_of_similarity():
    # The official vote counts with Counter.most_common: equal counts keep the order of first appearance, nearest
    # first. Sentences at 5 (class 2), 10 (class 0), 20 (class 0), 30 (class 2), 40 (class 1) deg; k = 5:
    # classes 0 and 2 have 2 votes each, class 2's first vote (5 deg) comes before class 0's (10 deg): class 2,
    # although class 0's summed similarity (cos 10 + cos 20 = 1.924) is larger than class 2's (cos 5 + cos 30 = 1.862).
    E_I = torch.tensor([unit(0)])
    E_T = torch.tensor([unit(10), unit(20), unit(5), unit(30), unit(40)])
    t = torch.tensor([0, 0, 2, 2, 1])
    assert math.cos(math.radians(10)) + math.cos(math.radians(20)) > math.cos(math.radians(5)) + math.cos(math.radians(30))
    assert knn_predict(E_I, E_T, t, k=5, num_classes=3).tolist() == [2]
    assert knn_predict(E_I, E_T, t, k=5, num_classes=3, chunk=2).tolist() == [2]      # in blocks: the same vote


def test_knn_with_k_larger_than_the_sentences_lets_every_sentence_vote():
    E_I = torch.tensor([unit(0), unit(90)])
    E_T = torch.tensor([unit(80), unit(60), unit(70), unit(75)])
    t = torch.tensor([0, 1, 1, 1])
    # k = 10 > 4 sentences: all 4 vote, class 1 has 3 of them, for both images.
    assert knn_predict(E_I, E_T, t, k=10, num_classes=2).tolist() == [1, 1]


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
    # docs/design.md §3: the official evaluation's overall is argmax of 0.2 softmax(logits_I) + 0.8 softmax(logits_T),
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

