"""The defaults of docs/settings.md, each against its source written out here: the paper's section or the official
code's config (ChangyaoTian/VL-LTR, configs/ and main.py's argument defaults), or the project's own choice; and every
row --variant official switches. What learns and what stays frozen, by gradient.

    python -m pytest -q tests/test_settings.py        # CPU, no data, seconds
"""
import argparse
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

import anss
import cvlp
import data
import evaluate
import lgr
from cvlp import (class_wise_contrastive_loss, cosine_similarity_matrix, distillation_loss, pretraining_loss,
                  temperature)
from lgr import LGRHead, Recognizer, recognition_loss
from util import engine, images
from util.clip_models import create_clip
from util.errors import DataError


# ----------------------------------------------------------------------------------------------
# The per-dataset table: the paper's numbers, the official configs' where the paper is silent


# (dataset, stage) -> (epochs, lr, batch, warm-up epochs, final lr). Paper: Sec. 4.3 (ImageNet-LT), 4.4 (Places-LT:
# "the same as Section 4.3"), 4.5 (iNat: 100 + 360 epochs, 5e-4 / 2e-5). Warm-up: the official main.py's
# --warmup-epochs 5 in pre-training, warmup_epochs=0 in every fine-tuning config; final lr: min_lr=0. in its configs,
# except configs/inat/pretrain/inat_pretrain_r50.py, which sets none: main.py's --min-lr 1e-5.
RECIPES = {("imagenet_lt", "cvlp"): (50, 5e-5, 256, 5, 0.0), ("imagenet_lt", "lgr"): (50, 1e-3, 128, 0, 0.0),
           ("places_lt", "cvlp"): (50, 5e-5, 256, 5, 0.0), ("places_lt", "lgr"): (50, 1e-3, 128, 0, 0.0),
           ("inat2018", "cvlp"): (100, 5e-4, 256, 5, 1e-5), ("inat2018", "lgr"): (360, 2e-5, 128, 0, 0.0),
           ("shapes_lt", "cvlp"): (5, 1e-3, 256, 0.5, 0.0), ("shapes_lt", "lgr"): (10, 2e-3, 64, 0, 0.0)}


@pytest.mark.parametrize("dataset, stage", RECIPES)
def test_each_stage_defaults_to_the_recipe_of_its_dataset(dataset, stage):
    args = (cvlp if stage == "cvlp" else lgr).get_args(["--data", dataset])
    assert (args.epochs, args.lr, args.batch, args.warmup, args.min_lr) == RECIPES[dataset, stage]
    assert args.wd == 0.05                                               # Sec. 4.3, both stages
    assert args.sampling == "sqrt"                                       # Sec. 4.3, both stages


def test_the_baseline_trains_100_epochs_on_imagenet_lt_and_places_lt_and_lgrs_360_on_inat():
    # Sec. 4.3: "fine-tuned for 100 epochs"; Sec. 4.4: the same; Sec. 4.5: "the baseline has the same fine-tuning
    # epochs and initial learning rate as the proposed method" (360, 2e-5).
    # shapes_lt (own): as long as its CVLP and LGR together, 5 + 10, the rule behind the paper's 100 = 50 + 50.
    for dataset, epochs, lr in (("imagenet_lt", 100, 1e-3), ("places_lt", 100, 1e-3), ("inat2018", 360, 2e-5),
                                ("shapes_lt", 15, 2e-3)):
        args = lgr.get_args(["--data", dataset, "--init", "clip", "--head", "fc"])
        assert (args.epochs, args.lr) == (epochs, lr), dataset
    assert lgr.get_args(["--data", "imagenet_lt", "--init", "clip", "--head", "fc", "--epochs", "7"]).epochs == 7


def test_cvlp_keeps_batchnorm_running_statistics_where_the_official_configs_do():
    # configs/imagelt/pretrain/*.py and configs/placeslt/pretrain/*.py: train_mode=False; configs/inat/pretrain: unset,
    # main.py's default True.
    assert [data.DATASETS[d]["cvlp_train_mode"] for d in ("imagenet_lt", "places_lt", "inat2018")] == [False, False, True]


def test_images_are_augmented_as_the_official_code_augments_them_except_on_shapes_lt():
    # main.py's defaults: --aa rand-m9-mstd0.5-inc1, --reprob 0.25 (no config changes them); shapes_lt: crop and flip.
    for dataset in ("imagenet_lt", "places_lt", "inat2018", "folder"):
        assert cvlp.get_args(["--data", dataset]).augment == lgr.get_args(["--data", dataset]).augment == "randaug"
    assert cvlp.get_args([]).augment == "crop-flip"
    args = cvlp.get_args(["--data", "imagenet_lt"])
    t = data.image_transform(args, train=True)
    steps = str(t.per_image)
    assert "RandAugment(n=2" in steps and "m=9, mstd=0.5" in steps and "RandomErasing(p=0.25, mode=pixel" in steps
    x = t(Image.new("RGB", (300, 260), (120, 30, 200)))
    assert x.shape == (3, 224, 224)
    with pytest.raises(DataError, match="--loader gpu .* RandAugment .* --augment crop-flip"):
        images.DeviceTransform(t, "cpu")


def framed(size, border):
    """A black size x size image with a white frame `border` pixels wide."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    img[border:size - border, border:size - border] = 0
    return Image.fromarray(img)


def test_evaluation_resizes_the_short_side_to_256_and_crops_the_centre_224_on_real_datasets():
    # datasets.py of the official code: Resize(int(256 / 224 * input_size)), CenterCrop(input_size). A 256 px image
    # with a 16 px white frame: resized to 256 (unchanged), the centre 224 drops 16 px a side, the frame with them.
    # shapes_lt keeps CLIP's own view (resize to the size, crop): the frame, shrunk to 14 px, stays.
    args = cvlp.get_args(["--data", "imagenet_lt"])
    x = data.image_transform(args, train=False)(framed(256, 16))         # (3, 224, 224) normalised
    assert x.shape == (3, 224, 224) and x.std(dim=(1, 2)).max() < 1e-6    # all black: one value per channel
    args = cvlp.get_args(["--data", "shapes_lt", "--image-size", "224"])
    x = data.image_transform(args, train=False)(framed(256, 16))
    assert (x[:, 2, 112] > x[:, 112, 112]).all()                         # the frame's white, inside the crop


# ----------------------------------------------------------------------------------------------
# The optimiser: weight decay by parameter kind, the schedule


def test_weight_decay_skips_norms_biases_and_temperatures_of_a_clip():
    model = create_clip("shapes-tiny", 32)
    _, kinds = engine.parameter_groups(model, 0.05)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    # The official optimiser's rule (optim_factory.add_weight_decay): no decay for a 1-D parameter or a name ending
    # in .bias; the project also keeps the 0-dim logit scale out (a temperature, not a weight).
    for name, shape in shapes.items():
        official_no_decay = len(shape) == 1 or name.endswith(".bias")
        want = "no_decay" if official_no_decay or name == "logit_scale" else "decay"
        assert kinds[name] == want, name
    assert kinds["visual.conv1.weight"] == kinds["token_embedding.weight"] == kinds["text_projection"] == "decay"
    assert kinds["positional_embedding"] == "decay"                      # 2-D: decayed in the official code too
    assert kinds["ln_final.weight"] == kinds["visual.class_embedding"] == kinds["logit_scale"] == "no_decay"
    _, kinds = engine.parameter_groups(model, 0.05, "official")
    assert kinds["logit_scale"] == "decay"                               # 0-dim: the official rule decays it


def test_weight_decay_groups_of_the_lgr_head_and_the_official_slow_attention():
    head = LGRHead(D=8, C=3, learn_tau=True)
    groups, kinds = engine.parameter_groups(head, 0.05)
    assert {n for n, k in kinds.items() if k == "decay"} == {"W_q.weight", "W_k.weight", "mlp.0.weight", "mlp.2.weight"}
    assert {n for n, k in kinds.items() if k == "no_decay"} == {"ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias",
                                                                 "mlp.0.bias", "mlp.2.bias", "log_inv_tau"}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    # --variant official: the attention (every parameter without "visual" in its official name) at text_lr 1e-6
    slow = head.attention_parameters()
    assert sorted(slow) == ["W_k.weight", "W_q.weight", "ln_k.bias", "ln_k.weight", "ln_q.bias", "ln_q.weight"]
    groups, _ = engine.parameter_groups(head, 0.05, "official", slow, lgr.OFFICIAL_TEXT_LR)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(head.named_parameters())
    assert by_id[id(named["W_q.weight"])]["lr"] == 1e-6 and by_id[id(named["W_q.weight"])]["weight_decay"] == 0.05
    assert by_id[id(named["ln_k.bias"])]["lr"] == 1e-6 and by_id[id(named["ln_k.bias"])]["weight_decay"] == 0.0
    assert "lr" not in by_id[id(named["mlp.0.weight"])]                 # the optimiser's lr
    assert "lr" not in groups[0]                                         # the logged lr is the main one


def lrs(schedule, optimizer, steps):
    """The learning rate of each of `steps` optimiser steps under `schedule`."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_cosine_schedule_warms_up_from_1e_6_then_anneals_every_step_to_the_final_lr():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    got = lrs(engine.cosine_schedule(opt, total_steps=10, warmup_steps=2, lr=1e-3, min_lr=1e-4), opt, 11)
    want = [1e-6, 1e-6 + (1e-3 - 1e-6) / 2,                               # warm-up: 1e-6, then halfway
            *[1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]]   # steps 2..10 of the cosine
    assert got == pytest.approx(want, rel=1e-9)
    assert got[2] == pytest.approx(1e-3) and got[6] == pytest.approx(1e-4 + 0.45e-3) and got[10] == pytest.approx(1e-4)


def test_official_schedule_is_one_lr_per_epoch_a_step_behind_as_its_main_py_steps_timm():
    # timm's CosineLRScheduler(t_initial=4, warmup_t=2, warmup_lr_init=1e-6, lr_min=0), stepped with the epoch index
    # after each epoch: epoch 0 trains at the warm-up start, epoch e >= 1 at the value of t = e - 1.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    got = lrs(engine.official_schedule(opt, steps_per_epoch=3, epochs=4, warmup_epochs=2, lr=1e-3), opt, 12)
    t1 = 1e-6 + (1e-3 - 1e-6) / 2                                        # warm-up, t = 1
    t2 = 0.5 * 1e-3 * (1 + math.cos(math.pi * 2 / 4))                    # cosine at t = 2: 0.5e-3
    assert got == pytest.approx([1e-6] * 3 + [1e-6] * 3 + [t1] * 3 + [t2] * 3, rel=1e-9)


def test_the_variant_chooses_the_schedule():
    loader = type("Loader", (), {"__len__": lambda self: 6, "sampler": None})()
    for variant, first_epoch in (("paper", None), ("official", [1e-6] * 6)):
        args = argparse.Namespace(lr=1e-3, accum=1, batch=1, epochs=3, warmup=1, min_lr=0.0, device="cpu",
                                  variant=variant)
        opt, sched, steps = engine.optimizer_and_schedule([{"params": [torch.zeros(1, requires_grad=True)]}], loader,
                                                          args)
        got = lrs(sched, opt, 6)
        if first_epoch:
            assert got == pytest.approx(first_epoch)
        else:
            assert got[0] == pytest.approx(1e-6) and got[1] > got[0]      # per step: rising within the first epoch
        assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


# ----------------------------------------------------------------------------------------------
# The LGR head: initialisation, tau, the official variant


def test_lgr_head_starts_with_identity_projections_without_bias_and_small_mlp_weights():
    # The official head (models/finetune.py): wq, wk Linear(bias=False) set to the identity; every other Linear
    # truncated normal with std 0.02 and zero bias (timm's trunc_normal_, bounds +-2); LayerNorms 1 and 0.
    torch.manual_seed(0)
    head = LGRHead(D=64, C=50)
    for W in (head.W_q, head.W_k):
        assert W.bias is None and W.weight.tolist() == np.eye(64).tolist()
    for layer in (head.mlp[0], head.mlp[2]):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05) and layer.bias.abs().max() == 0
    assert head.ln_q.weight.eq(1).all() and head.ln_k.bias.eq(0).all()
    fc = Recognizer(torch.nn.Identity(), 64, 50, "fc").head
    assert fc.weight.std().item() == pytest.approx(0.02, rel=0.05) and fc.bias.abs().max() == 0


@pytest.fixture
def fake_run(monkeypatch):
    """build_recognizer's inputs without files: an encoder whose learned temperature is 0.03, random anchors."""
    torch.manual_seed(0)
    clip = create_clip("shapes-tiny", 32)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1 / 0.03))
    monkeypatch.setattr(lgr, "load_encoder", lambda args, device: (clip, None))
    monkeypatch.setattr(lgr, "load_anchor_embeds", lambda args: (torch.randn(100, 4, 64), torch.ones(100, 4, dtype=bool)))
    return lambda *flags: lgr.build_recognizer(lgr.get_args(["--device", "cpu", *flags]), "cpu")


def test_lgr_tau_is_the_encoders_learned_temperature_and_stays_fixed(fake_run):
    # models/finetune.py: use_norm loads "logit_scale" with the visual encoder from the CVLP checkpoint, and sets
    # requires_grad False. The paper does not say.
    head = fake_run().head
    assert temperature(head.log_inv_tau, head.max_inv_tau).item() == pytest.approx(0.03, rel=1e-6)
    assert not head.log_inv_tau.requires_grad
    assert fake_run("--learn-tau").head.log_inv_tau.requires_grad
    head = fake_run("--tau", "0.05").head
    assert temperature(head.log_inv_tau).item() == pytest.approx(0.05, rel=1e-6) and not head.log_inv_tau.requires_grad


def test_lgr_head_form_is_the_papers_up_to_a_thousand_classes_and_gram_on_inat(fake_run):
    assert [data.DATASETS[d]["head_form"] for d in ("shapes_lt", "imagenet_lt", "places_lt", "folder",
                                                     "cifar100_lt", "inat2018")] == ["paper"] * 5 + ["gram"]
    assert fake_run().head.form == "paper"
    assert fake_run("--head-form", "gram").head.form == "gram"


OFFICIAL_LGR = {  # dataset -> (visual frozen, norm of G detached, mixup): models/finetune.py's factories, main.py
    "imagenet_lt": (True, False, True), "places_lt": (True, False, True), "inat2018": (False, True, True)}


@pytest.mark.parametrize("dataset", OFFICIAL_LGR)
def test_official_variant_switches_the_fine_tuning_to_the_official_models(dataset):
    args = lgr.get_args(["--data", dataset, "--variant", "official"])
    assert (args.freeze_visual, data.official_setting(dataset, "v_detach"), args.mixup) == OFFICIAL_LGR[dataset]
    paper = lgr.get_args(["--data", dataset])
    assert (paper.freeze_visual, paper.mixup) == (False, False)          # Sec. 3.1 fine-tunes it; Eq. (9) on labels
    assert lgr.get_args(["--data", dataset, "--variant", "official", "--no-freeze-visual"]).freeze_visual is False


def test_official_variant_takes_the_official_configs_learning_rates_where_they_differ():
    # configs/placeslt/finetune: lr 1e-4 (RN50), 5e-5 (ViT-B/16); configs/*/pretrain/*_vit16.py: 3.5e-5 (ImageNet-LT),
    # 1e-5 (Places-LT), 3.5e-4 (iNat). The paper: 1e-3, 5e-5, 5e-4 for every backbone.
    official = {("lgr", "places_lt", "RN50"): 1e-4, ("lgr", "places_lt", "ViT-B-16"): 5e-5,
                ("cvlp", "imagenet_lt", "ViT-B-16"): 3.5e-5, ("cvlp", "places_lt", "ViT-B-16"): 1e-5,
                ("cvlp", "inat2018", "ViT-B-16"): 3.5e-4, ("cvlp", "imagenet_lt", "RN50"): 5e-5,
                ("lgr", "imagenet_lt", "ViT-B-16"): 1e-3}
    for (stage, dataset, backbone), lr in official.items():
        get_args = cvlp.get_args if stage == "cvlp" else lgr.get_args
        flags = ["--data", dataset, "--backbone", backbone]
        assert get_args(flags + ["--variant", "official"]).lr == lr, (stage, dataset, backbone)
        assert get_args(flags).lr == RECIPES[dataset, stage][1]
        assert get_args(flags + ["--variant", "official", "--lr", "0.5"]).lr == 0.5


def test_official_variant_leaves_one_over_tau_unclamped():
    log_inv_tau = torch.tensor(math.log(200.0))
    assert temperature(log_inv_tau, cvlp.inverse_tau_limit("paper")).item() == pytest.approx(1 / 100)
    assert temperature(log_inv_tau, cvlp.inverse_tau_limit("official")).item() == pytest.approx(1 / 200)
    assert LGRHead(4, 2, variant="official").max_inv_tau == math.inf and LGRHead(4, 2).max_inv_tau == 100


def test_cvlp_tau_starts_at_0_07_and_under_the_official_variant_at_clips_own():
    # Sec. 3.2: "a learnable parameter with an initial value of 0.07"; the official CVLP loads CLIP's logit_scale
    # over its 0.07 (models/pretrain.py: load_state_dict of the whole archive).
    assert cvlp.get_args([]).tau == 0.07 and cvlp.get_args(["--variant", "official"]).tau is None


def test_mixup_cutmix_mixes_images_and_smoothed_targets_in_one_proportion():
    torch.manual_seed(0)
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float64).reshape(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 1])
    seen = set()
    for _ in range(20):
        mixed, target = lgr.mixup_cutmix(x, y, num_classes=5)
        # targets: 0.1 / 5 = 0.02 off, 1 - 0.1 + 0.02 = 0.92 on, mixed with the reversed batch's as lam : 1 - lam
        lam = (target[0, 0].item() - 0.02) / 0.9                         # image 0's own class 0 (its pair: class 1)
        on, off = lam * 0.92 + (1 - lam) * 0.02, (1 - lam) * 0.92 + lam * 0.02
        assert target[0].tolist() == pytest.approx([on, off, 0.02, 0.02, 0.02], abs=1e-6)
        assert target.sum(1).tolist() == pytest.approx([1.0] * 4)
        replaced = (mixed != x).any(1)                                   # (4, 8, 8) pixels not the image's own
        if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0)):
            seen.add("mixup")
        else:                                                            # CutMix: a box of area 1 - lam, reversed
            assert torch.equal(mixed[replaced[:, None].expand_as(x)], x.flip(0)[replaced[:, None].expand_as(x)])
            assert replaced[0].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
            seen.add("cutmix")
    assert seen == {"mixup", "cutmix"}


# ----------------------------------------------------------------------------------------------
# KNN: the official evaluation's


def test_knn_head_votes_with_the_5_nearest_of_every_corpus_sentence_by_default():
    # engine.py of the official code: evaluate_pretrain(topk=(5, 1)) over all text embeddings, Counter vote.
    args = evaluate.get_args([])
    assert (args.knn_k, args.knn_sentences) == (5, "corpus")


# ----------------------------------------------------------------------------------------------
# What learns and what stays frozen


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


def test_lgr_step_trains_the_head_and_visual_encoder_but_not_the_anchors_nor_a_fixed_tau():
    torch.manual_seed(0)
    clip = create_clip("shapes-tiny", 32)
    anchors = 3 * torch.randn(3, 2, 64)                                  # (C, M, D) frozen
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    model = Recognizer(clip.visual, 64, 3, "lgr", anchors, mask)
    x, _ = tiny_batch()
    logits_I, logits_T, _ = model(x)
    recognition_loss(logits_I, logits_T, torch.tensor([0, 1, 2]))[0].backward()   # Eq. (9)
    names = [n for n, _ in model.named_parameters()]
    assert "anchors" not in names and "anchors" in dict(model.named_buffers())
    assert model.anchors.grad is None and not model.anchors.requires_grad
    head = model.head
    for p in (head.W_q.weight, head.W_k.weight, head.mlp[0].weight, head.mlp[2].weight):
        assert p.grad is not None and p.grad.abs().sum().item() > 0
    assert model.visual.conv1.weight.grad.abs().sum().item() > 0        # visual encoder fine-tuned (paper)
    assert head.log_inv_tau.grad is None                                 # fixed tau: no gradient, not in AdamW
    assert all(p is not head.log_inv_tau for p in model.parameters() if p.requires_grad)


def test_lgr_trains_with_the_visual_encoder_in_eval_mode(monkeypatch, shapes_env, tmp_path):
    """models/finetune.py's encode_image calls visual.eval() on every forward: BatchNorm's running statistics, also
    where the encoder is trained. The head trains in train mode. Checked when fit() starts."""
    modes = {}

    def fake_fit(model, *args, **kwargs):
        modes.update(visual=model.visual.training, head=model.head.training)
        return True
    monkeypatch.setattr(lgr, "fit", fake_fit)
    monkeypatch.setattr(lgr, "load_anchor_embeds", lambda args: (torch.randn(100, 2, 64), torch.ones(100, 2, dtype=bool)))
    lgr.main(["--data-root", str(shapes_env["root"]), "--clip-weights", str(shapes_env["clip"]), "--init", "clip",
              "--out", str(tmp_path), "--device", "cpu"])
    assert modes == {"visual": False, "head": True}


@pytest.mark.parametrize("train_mode", [True, False])
def test_cvlp_student_mode_follows_the_datasets_train_mode(monkeypatch, shapes_env, tmp_path, train_mode):
    modes = []
    monkeypatch.setitem(data.DATASETS["shapes_lt"], "cvlp_train_mode", train_mode)
    monkeypatch.setattr(cvlp, "fit", lambda model, *args, **kwargs: modes.append(model.training))
    cvlp.main(["--data-root", str(shapes_env["root"]), "--clip-weights", str(shapes_env["clip"]), "--lam", "1",
               "--out", str(tmp_path), "--device", "cpu"])
    assert modes == [train_mode]


def test_randaugments_strongest_posterize_gives_a_black_image_instead_of_an_error():
    """timm's PosterizeIncreasing asks for 0 bits at level 10, which rand-m9-mstd0.5's noise reaches (P(N(9, 0.5) >=
    10) is 2%); Pillow refuses 0 bits, PIL once gave black. Every training image must go through."""
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(images.posterize_zero_bits_black(img, 0)).max() == 0
    assert images.posterize_zero_bits_black(img, 2).getpixel((0, 0)) == (192, 64, 0)   # 200 & 0b11000000, ...
    args = cvlp.get_args(["--data", "imagenet_lt", "--image-size", "32"])
    t = data.image_transform(args, train=True)
    ops = [op for step in t.per_image.transforms[1].transforms for op in getattr(step, "ops", [])]
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert len(posterize) == 1 and posterize[0].aug_fn is images.posterize_zero_bits_black
    posterize[0].prob, posterize[0].magnitude, posterize[0].magnitude_std = 1.0, 10, 0   # its strongest, every time
    for op in ops:
        if op is not posterize[0]:
            op.prob = 0.0
    assert t(Image.new("RGB", (40, 40), (200, 100, 50))).shape == (3, 32, 32)
