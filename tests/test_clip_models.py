"""Tests for --pretrained TAG: every open_clip CLIP built, loaded and fed images as its weights were trained.

    python -m pytest -q test_clip_models.py        # CPU, no download

Two tiny CLIPs, one with nn.GELU (as LAION's and DataComp's weights) and one with QuickGELU (as OpenAI's, DFN's
and MetaCLIP's), are registered in open_clip's own tables as two tags of one architecture, each pointing at its
weights on disk, so every stage finds them as it finds a real tag, offline.
"""
import copy

import numpy as np
import open_clip
import pytest
import torch

import anss
import cvlp
import evaluate
import lgr
import predict
from util import clip_models
from util.engine import load_checkpoint
from util.errors import CheckpointError
from util.errors import DataError
from util.images import make_transform
from tests.test_data import make_imagenet_tree

ARCH = "tiny-clip"                                   # registered as an open_clip model config below
GELU_TAG, QUICK_TAG = "web_gelu", "web_quickgelu"
OPENAI_MEAN, OPENAI_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
# How each tag's weights were trained: the GELU one as LAION's ViT-L-14 (mean = std = 0.5) but bilinear and squashed
# (as MobileCLIP's and SigLIP's), the QuickGELU one as OpenAI's.
SETTINGS = {GELU_TAG: dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="squash"),
            QUICK_TAG: dict(mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", resize_mode="shortest")}


@pytest.fixture
def tiny_tags(tmp_path, monkeypatch):
    """{tag: (the original model, its weights file)}: a random tiny CLIP per tag, saved, and registered as
    open_clip registers a real tag (open_clip.get_pretrained_cfg(ARCH, tag) names the file and the settings)."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, copy.deepcopy(clip_models.TINY_CLIP))
    tags, table = {}, {}
    for seed, tag in enumerate((GELU_TAG, QUICK_TAG)):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**clip_models.TINY_CLIP, quick_gelu=tag == QUICK_TAG).eval()
        path = tmp_path / f"{tag}.pt"
        torch.save(model.state_dict(), path)
        tags[tag] = (model, path)
        # open_clip marks the QuickGELU tags with quick_gelu=True and leaves the key out for the others
        table[tag] = dict(file=str(path), **SETTINGS[tag], **({"quick_gelu": True} if tag == QUICK_TAG else {}))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, table)
    return tags


def outputs(model):
    """The model's image and text embeddings of two fixed images and two fixed sentences: (2, 64) each."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = clip_models.tokenize_exact(["a photo of a tench.", "the goldfish is a small orange fish."], 32)[0]
    with torch.no_grad():
        return model.eval().encode_image(x), model.encode_text(tokens)


def same_outputs(a, b):
    return all(torch.equal(x, y) for x, y in zip(outputs(a), outputs(b)))


def activations(model):
    """The activation classes inside a model: {'GELU'} or {'QuickGELU'}."""
    return {type(m).__name__ for m in model.modules()} & {"GELU", "QuickGELU"}


# ----------------------------------------------------------------------------------------------
# The model: activation and weights from the tag


@pytest.mark.parametrize("tag", [GELU_TAG, QUICK_TAG])
def test_each_tag_loads_its_weights_with_the_activation_they_were_trained_with(tiny_tags, tag):
    args = cvlp.get_args(["--backbone", ARCH, "--pretrained", tag, "--image-size", "32"])
    loaded = cvlp.load_clip(args)                                 # weights: the file open_clip's entry names
    original, _ = tiny_tags[tag]
    assert activations(loaded) == activations(original) == {"GELU" if tag == GELU_TAG else "QuickGELU"}
    assert same_outputs(loaded, original)                        # bit for bit


def test_the_same_weights_under_the_other_activation_compute_something_else(tiny_tags):
    original, path = tiny_tags[GELU_TAG]
    # The GELU weights passed as a local file said to belong to the QuickGELU tag: they load without complaint.
    args = cvlp.get_args(["--backbone", ARCH, "--pretrained", QUICK_TAG, "--clip-weights", str(path), "--image-size", "32"])
    wrong = cvlp.load_clip(args)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in wrong.state_dict().items())
    (image, text), (image_0, text_0) = outputs(wrong), outputs(original)
    assert (text - text_0).abs().max() > 1e-3 and (image - image_0).abs().max() > 1e-3


def test_a_local_file_without_a_tag_is_taken_as_openais_weights_with_quickgelu(tiny_tags):
    for tag, (original, path) in tiny_tags.items():
        args = cvlp.get_args(["--backbone", ARCH, "--clip-weights", str(path), "--image-size", "32"])
        assert args.pretrained == "openai"
        loaded = cvlp.load_clip(args)
        assert activations(loaded) == {"QuickGELU"}
        assert same_outputs(loaded, original) == (tag == QUICK_TAG)


def test_real_tags_choose_the_activation_open_clip_lists_for_them():
    # ViT-B-32: OpenAI's weights and LAION's; built small (32 px) since only the activation is looked at
    assert activations(clip_models.create_clip("ViT-B-32", 32, "openai")) == {"QuickGELU"}
    assert activations(clip_models.create_clip("ViT-B-32", 32, "laion2b_s34b_b79k")) == {"GELU"}
    assert activations(clip_models.create_clip("shapes-tiny", 32)) == {"GELU"}   # the stand-in, as before tags


# ----------------------------------------------------------------------------------------------
# The images: mean / std, interpolation and resize mode from the tag


def cubic(x, a=-0.5):
    """The bicubic kernel torchvision and PIL resize with (a = -0.5)."""
    x = abs(x)
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1 if x <= 1 else a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a


def stripes(height, width):
    """uint8 (3, height, width) image of vertical stripes, columns 0 0 255 255 0 0 255 255 ..."""
    row = torch.tensor([0, 0, 255, 255], dtype=torch.uint8).repeat(width // 4)
    return row.expand(3, height, width).clone()


def levels(x, mean, std):
    """Normalised (3, H, W) back to uint8 levels of channel 0."""
    return (x[0] * std[0] + mean[0]) * 255


def test_tags_give_their_mean_std_interpolation_and_resize_mode(tiny_tags):
    for tag in (GELU_TAG, QUICK_TAG):
        assert clip_models.clip_preprocess(ARCH, tag) == SETTINGS[tag]
    # real tags, read offline from open_clip's table
    assert clip_models.clip_preprocess("ViT-B-16", "openai") == SETTINGS[QUICK_TAG]
    assert clip_models.clip_preprocess("ViT-L-14", "laion2b_s32b_b82k")["mean"] == (0.5, 0.5, 0.5)
    assert clip_models.clip_preprocess("ViT-L-14", "laion2b_s32b_b82k")["std"] == (0.5, 0.5, 0.5)
    assert clip_models.clip_preprocess("ViT-B-16-SigLIP", "webli")["resize_mode"] == "squash"
    assert clip_models.clip_preprocess("shapes-tiny") == SETTINGS[QUICK_TAG]      # the stand-in's: OpenAI's


def test_eval_transform_normalises_with_the_tags_mean_and_std(tiny_tags):
    grey = torch.full((3, 32, 32), 51, dtype=torch.uint8)                     # 51 / 255 = 0.2
    x = make_transform(32, **clip_models.clip_preprocess(ARCH, GELU_TAG), train=False)(grey)
    assert torch.allclose(x, torch.full_like(x, (0.2 - 0.5) / 0.5), atol=1e-6)            # -0.6
    x = make_transform(32, **clip_models.clip_preprocess(ARCH, QUICK_TAG), train=False)(grey)
    want = torch.tensor([(0.2 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])        # -1.048, -0.987, -0.755
    assert torch.allclose(x, want.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)


def test_eval_transform_resizes_with_the_tags_interpolation_and_mode(tiny_tags):
    # Halving the width of stripes of period 4: output column j is centred between input columns 2j and 2j + 1,
    # and the antialiased kernel, stretched by 2, weighs input column 2j + 1/2 + d by kernel(d / 2) (normalised).
    offsets = [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]          # the input columns around an even output column
    stripe = [0, 255, 255, 0, 0, 255, 255, 0]                        # their values: column 2j - 3 = 1 mod 4 is 0, ...
    triangle = lambda d: max(0.0, 1 - abs(d))
    levels_by_kernel = set()
    for kernel, name in ((triangle, "bilinear"), (cubic, "bicubic")):
        w = [kernel(d / 2) for d in offsets]
        even = sum(wi * v for wi, v in zip(w, stripe)) / sum(w)      # bilinear 63.75, bicubic 39.84
        odd = sum(wi * v for wi, v in zip(w, stripe[2:] + stripe[:2])) / sum(w)   # bilinear 191.25, bicubic 215.16
        if name == "bilinear":
            # GELU tag, squash: 32 x 64 -> 32 x 32, the whole width kept
            p = clip_models.clip_preprocess(ARCH, GELU_TAG)
            x = make_transform(32, **p, train=False)(stripes(32, 64))
        else:
            # QuickGELU tag, shortest: 64 x 128 -> 32 x 64, then the centre 32 columns (16..47)
            p = clip_models.clip_preprocess(ARCH, QUICK_TAG)
            x = make_transform(32, **p, train=False)(stripes(64, 128))
        got = levels(x, p["mean"], p["std"])[:, 2:30]                # (32, 28) away from the borders
        levels_by_kernel.add((round(even), round(odd)))
        want = torch.tensor([round(even), round(odd)] * 14, dtype=torch.float32)
        assert torch.allclose(got, want.expand_as(got), atol=1e-3), name
    assert levels_by_kernel == {(64, 191), (40, 215)}                  # the two interpolations differ here


def test_squash_keeps_the_whole_width_where_shortest_crops_it(tiny_tags):
    img = torch.zeros(3, 32, 64, dtype=torch.uint8)
    img[:, :, :16] = 255                                             # the left quarter white
    p = clip_models.clip_preprocess(ARCH, GELU_TAG)                  # squash: the white quarter is columns 0..7
    x = levels(make_transform(32, **p, train=False)(img), p["mean"], p["std"])
    assert torch.allclose(x[:, :7], torch.tensor(255.0), atol=1e-3) and torch.allclose(x[:, 9:], torch.tensor(0.0), atol=1e-3)
    p = clip_models.clip_preprocess(ARCH, QUICK_TAG)                 # shortest: short side already 32, crop 16..47
    x = levels(make_transform(32, **p, train=False)(img), p["mean"], p["std"])
    assert torch.allclose(x, torch.tensor(0.0), atol=1e-3)


def test_train_transform_batch_path_resizes_with_the_tags_interpolation(tiny_tags):
    t = make_transform(16, **clip_models.clip_preprocess(ARCH, GELU_TAG), train=True)
    img = stripes(32, 32)[None].float()                              # (1, 3, 32, 32)
    box = torch.tensor([[0, 0, 32, 32]])                             # the whole image, halved
    x = t.crop_flip(img, box, torch.tensor([False]))                 # (1, 3, 16, 16) in uint8 levels
    assert x[0, 0, 5, 2:14].tolist() == [64.0, 191.0] * 6           # bilinear, as worked out above (63.75, 191.25)


# ----------------------------------------------------------------------------------------------
# The tag through the stages: recorded, rebuilt, and a mismatch refused


def test_a_gelu_clip_runs_every_stage_under_its_tag_and_later_stages_refuse_another(tiny_tags, tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")
    run = tmp_path / "run"
    common = ["--data", "imagenet_lt", "--data-root", str(root), "--backbone", ARCH, "--image-size", "32",
              "--workers", "0", "--device", "cpu", "--out", str(run)]
    gelu, short = common + ["--pretrained", GELU_TAG], ["--epochs", "1", "--batch", "2"]
    cvlp.main(gelu + short)
    anss.main(gelu + ["--M", "4"])
    lgr.main(gelu + short)
    evaluate.main(gelu)
    for name in ("cvlp.pt", "anchor_embeds.pt", "lgr.pt"):
        assert torch.load(run / name, weights_only=True)["pretrained"] == GELU_TAG, name

    # The CVLP model rebuilt from cvlp.pt is a GELU CLIP holding the saved weights.
    args = anss.get_args(gelu)
    args.num_classes = 3
    encoder, ckpt = anss.load_encoder(args, "cpu")
    reference = open_clip.CLIP(**clip_models.TINY_CLIP, quick_gelu=False)
    reference.load_state_dict(ckpt["model"])
    assert activations(encoder) == {"GELU"} and same_outputs(encoder, reference)
    # predict.py reads the tag from lgr.pt: the same model and the tag's images
    model, run_args, _ = predict.load_run(str(run), "cpu")
    assert run_args.pretrained == GELU_TAG and activations(model.visual) == {"GELU"}

    for stage in (anss, lgr, evaluate):                              # each reads a checkpoint made under GELU_TAG
        with pytest.raises(SystemExit) as e:
            stage.main(common + ["--pretrained", QUICK_TAG])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and len(errors) == 1, (stage.__name__, errors)   # after the data's warnings
        assert (f"(pretrained '{GELU_TAG}'), but this run expects pretrained '{QUICK_TAG}'; pass --pretrained "
                f"{GELU_TAG}") in errors[0], (stage.__name__, errors)
    with pytest.raises(SystemExit):                                  # resuming CVLP under another tag, too
        cvlp.main(common + ["--pretrained", QUICK_TAG, "--resume"] + short)
    assert f"but this run expects pretrained '{QUICK_TAG}'" in capsys.readouterr().err


def test_released_models_are_read_as_openais_weights_only(tmp_path, capsys):
    from tests.test_released import released_model_dict, write_released
    path = write_released(tmp_path / "checkpoint.pth", released_model_dict())
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", "imagenet_lt", "--data-root", str(make_imagenet_tree(tmp_path / "imagenet")),
                       "--backbone", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k", "--released", path,
                       "--workers", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: the released VL-LTR models were fine-tuned from OpenAI's CLIP "
                                         "weights; drop --pretrained laion2b_s34b_b88k\n")


def test_a_checkpoint_without_its_weights_tag_is_refused_with_the_command_that_remakes_it(tmp_path):
    path = tmp_path / "cvlp.pt"
    torch.save({"stage": "cvlp", "data": "shapes_lt", "backbone": "RN50", "num_classes": 100}, path)
    with pytest.raises(CheckpointError, match=r"cvlp\.pt was written by an older version of this code; delete it and "
                                              r"rerun `python cvlp.py`"):
        load_checkpoint(str(path), "cvlp", "python cvlp.py")


# ----------------------------------------------------------------------------------------------
# What the method cannot use, unknown tags, and the weights offline


@pytest.mark.parametrize("backbone, missing", [
    ("coca_ViT-B-32", "a plain image embedding (CoCa's"),
    ("ViT-B-16-SigLIP", "a text tower that reads CLIP's BPE tokens (it reads timm/ViT-B-16-SigLIP's); softmax "
                        "contrastive training (it has a logit_bias"),
    ("roberta-ViT-B-32", "a text tower that reads CLIP's BPE tokens (it reads roberta-base's)")])
def test_models_whose_towers_the_method_cannot_use_are_refused_in_one_line(backbone, missing):
    with pytest.raises(DataError, match=r"^--backbone \S+ cannot be used by VL-LTR: it lacks ") as e:
        clip_models.create_clip(backbone, 224)
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_tag_lists_the_backbones_tags():
    with pytest.raises(DataError, match=r"^open_clip has no --pretrained laion5b for --backbone RN50; its tags: "
                                        r"openai, yfcc15m, cc12m "):
        clip_models.create_clip("RN50", 224, "laion5b")
    with pytest.raises(DataError, match=r"^--backbone shapes-tiny has one --pretrained, standin"):
        clip_models.create_clip("shapes-tiny", 32, "openai")


def test_a_tags_weights_offline_without_a_cache_are_one_line_at_once(empty_caches, monkeypatch):
    monkeypatch.setattr(clip_models, "reachable", lambda host, timeout=5: False)
    with pytest.raises(DataError, match=r"^no CLIP weights --pretrained laion2b_s34b_b88k for ViT-B-16 in open_clip's "
                                        r"cache and huggingface.co cannot be reached: pass --clip-weights PATH to a "
                                        r"local copy \(laion/CLIP-ViT-B-16-laion2B-s34B-b88K/\) with --pretrained "
                                        r"laion2b_s34b_b88k, or run once with internet"):
        clip_models.pretrained_weights("ViT-B-16", "laion2b_s34b_b88k")


def test_interpolate_pos_embed_keeps_class_token_and_a_constant_grid_constant():
    sd = {k: v.clone() for k, v in clip_models.create_clip("shapes-tiny", 32).state_dict().items()}
    key = "visual.positional_embedding"
    assert sd[key].shape == (1 + 4 * 4, 64)                           # patch 8 on 32 px: 4 x 4 grid
    v = torch.arange(64, dtype=torch.float32) / 100                   # one vector, the same at every position
    sd[key][1:] = v
    class_row = sd[key][0].clone()
    model = clip_models.create_clip("shapes-tiny", 64)
    out = clip_models.interpolate_pos_embed(dict(sd), model)
    assert out[key].shape == (1 + 8 * 8, 64)                          # 64 px: 8 x 8 grid
    assert torch.equal(out[key][0], class_row)
    assert out[key][1:].numpy() == pytest.approx(np.tile(v.numpy(), (64, 1)), abs=1e-6)
    model.load_state_dict(out, strict=True)


def test_interpolate_pos_embed_keeps_the_grid_orientation():
    sd = {k: v.clone() for k, v in clip_models.create_clip("shapes-tiny", 32).state_dict().items()}
    key = "visual.positional_embedding"
    col = torch.arange(4, dtype=torch.float32).repeat(4)             # position (r, c) = row-major r * 4 + c -> c
    sd[key][1:, 0] = col                                              # dimension 0 encodes the column
    sd[key][1:, 1] = 5.0                                              # dimension 1 is constant
    out = clip_models.interpolate_pos_embed(dict(sd), clip_models.create_clip("shapes-tiny", 64))
    grid = out[key][1:, 0].reshape(8, 8)                              # (row, column)
    assert torch.allclose(grid, grid[0].expand(8, 8), atol=1e-5)    # every row alike: depends on the column only
    assert (grid[0, 1:] >= grid[0, :-1] - 1e-5).all() and grid[0, -1] - grid[0, 0] > 2.5
    assert out[key][1:, 1].numpy() == pytest.approx(np.full(64, 5.0), abs=1e-5)
