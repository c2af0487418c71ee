"""Tests for the files users of the official code already hold, and for an offline start:
OpenAI's CLIP archives (TorchScript) through --clip-weights, the released VL-LTR checkpoints (docs/design.md §8)
through evaluate.py --released, the cache look-up before any download, and the defaults a new user meets.

    python -m pytest -q test_released.py        # CPU, no download: every file is written by the test

The released format is written here from a tiny model, and its logits are recomputed by hand in numpy
from the official equations (docs/design.md §8), not with our LGR code.
"""
import argparse
import json
import logging
import os
import types
import warnings

import numpy as np
import open_clip
import pytest
import torch

import cvlp
import data
import evaluate
import lgr
from util import clip_models
from util.errors import DataError
from util.images import make_transform
from tests.test_data import make_imagenet_tree


# ----------------------------------------------------------------------------------------------
# OpenAI's CLIP archives through --clip-weights


def save_openai_style_archive(model, path):
    """torch.jit.trace + save, as OpenAI's RN50.pt / ViT-B-16.pt were made: the archive also carries the three
    numbers OpenAI's models keep beside their weights."""
    model = model.eval()
    for name, value in (("input_resolution", 32), ("context_length", 32), ("vocab_size", 49408)):
        if hasattr(model, name):                                 # open_clip keeps two of them as plain ints
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # torch.jit.trace is deprecated
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, dtype=torch.long)),
                                 check_trace=False)
    traced.save(str(path))


def test_openai_torchscript_archive_loads_through_clip_weights(tmp_path):
    torch.manual_seed(0)
    original = clip_models.create_clip("shapes-tiny", 32)
    expected = {k: v.clone() for k, v in original.state_dict().items()}
    save_openai_style_archive(original, tmp_path / "RN50.pt")
    assert clip_models.is_torchscript_archive(tmp_path / "RN50.pt")

    args = argparse.Namespace(backbone="shapes-tiny", pretrained="standin", image_size=32,
                              clip_weights=str(tmp_path / "RN50.pt"), data="shapes_lt", data_root=str(tmp_path), seed=0)
    torch.manual_seed(1)                                         # a different random init underneath
    loaded = cvlp.load_clip(args).state_dict()
    assert set(loaded) == set(expected)
    for k in expected:
        assert torch.equal(loaded[k], expected[k]), k


def test_state_dict_file_never_reaches_the_torchscript_loader(tmp_path, monkeypatch):
    torch.manual_seed(0)
    sd = clip_models.create_clip("shapes-tiny", 32).state_dict()
    torch.save(sd, tmp_path / "clip.pt")
    assert not clip_models.is_torchscript_archive(tmp_path / "clip.pt")
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load called on a state dict"))
    loaded = clip_models.load_clip_file(clip_models.create_clip("shapes-tiny", 32), str(tmp_path / "clip.pt")).state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_unreadable_clip_file_is_one_line_naming_both_formats(tmp_path):
    (tmp_path / "RN50.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"cannot read CLIP weights .*RN50.pt: .*; pass a state dict file or one of "
                                        r"OpenAI's CLIP archives \(RN50.pt, ViT-B-16.pt\)$"):
        clip_models.load_clip_file(clip_models.create_clip("shapes-tiny", 32), str(tmp_path / "RN50.pt"))


# ----------------------------------------------------------------------------------------------
# The released VL-LTR checkpoints (docs/design.md §8)

C, M, D = 3, 4, 64                                               # shapes-tiny: embedding width 64


def released_model_dict(seed=0):
    """The "model" entry of a released checkpoint.pth, key for key (docs/design.md §8), from a tiny CLIP's visual
    encoder and random head weights; class 1 has 2 real anchors, class 2 one (the rest zero padding)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    torch.manual_seed(seed)
    visual = clip_models.create_clip("shapes-tiny", 32).visual
    E_T = randn(C, M, D)
    E_T[1, 2:] = 0
    E_T[2, 1:] = 0
    return {**{f"visual.{k}": v for k, v in visual.state_dict().items()},
            "text_embeddings": E_T,
            "text_block.attn.norm1q.weight": 1 + 0.2 * randn(D), "text_block.attn.norm1q.bias": 0.1 * randn(D),
            "text_block.attn.norm1k.weight": 1 + 0.2 * randn(D), "text_block.attn.norm1k.bias": 0.1 * randn(D),
            "text_block.attn.wq.weight": randn(D, D) / 8, "text_block.attn.wk.weight": randn(D, D) / 8,
            "text_block.visual_fc.0.weight": randn(4 * D, D) / 8, "text_block.visual_fc.0.bias": 0.1 * randn(4 * D),
            "text_block.visual_fc.2.weight": randn(C, 4 * D) / 4, "text_block.visual_fc.2.bias": 0.1 * randn(C),
            "logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32)}


def write_released(path, model_dict):
    """checkpoint.pth as the official fine-tuning writes it: the weights beside the optimiser, schedule, epoch,
    AMP scaler and the run's argparse.Namespace."""
    torch.save({"model": model_dict,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "weight_decay": 0.05, "params": [0, 1]}]},
                "lr_scheduler": {"t_initial": 50, "warmup_t": 5, "base_values": [1e-3]},
                "epoch": 49, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
                "args": argparse.Namespace(model="LGR_r50", dataset="ImageNet-LT", lr=1e-3, epochs=50,
                                           input_size=224, text_lens=[64], output_dir="output/lgr_r50")}, path)
    return str(path)


def official_equations(sd, E_I, alpha):
    """docs/design.md §8 written out in float64 numpy: LayerNorms, one-head attention at scale D^-0.5 over the
    non-zero anchors, values = the raw anchors, cosine logits at exp(logit_scale), the 4D MLP, and
    alpha softmax(logits_I) + (1 - alpha) softmax(logits_T)."""
    w = {k: v.double().numpy() for k, v in sd.items() if not k.startswith("visual.")}
    E_I = E_I.double().numpy()                                   # (B, D)
    K = w["text_embeddings"]                                     # (C, M, D)

    def layer_norm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q = layer_norm(E_I, w["text_block.attn.norm1q.weight"], w["text_block.attn.norm1q.bias"]) @ w["text_block.attn.wq.weight"].T
    k = layer_norm(K, w["text_block.attn.norm1k.weight"], w["text_block.attn.norm1k.bias"]) @ w["text_block.attn.wk.weight"].T
    scores = np.einsum("bd,cmd->bcm", q, k) * D ** -0.5         # (B, C, M)
    padding = ~(K != 0).any(-1)                                  # (C, M) the zero rows
    scores[:, padding] = -np.inf
    v = np.einsum("bcm,cmd->bcd", softmax(scores), K)            # (B, C, D)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    logits_T = np.einsum("bd,bcd->bc", unit(E_I), unit(v)) * np.exp(w["logit_scale"])
    hidden = np.maximum(E_I @ w["text_block.visual_fc.0.weight"].T + w["text_block.visual_fc.0.bias"], 0)
    logits_I = hidden @ w["text_block.visual_fc.2.weight"].T + w["text_block.visual_fc.2.bias"]
    return logits_I, logits_T, alpha * softmax(logits_I) + (1 - alpha) * softmax(logits_T)


def test_released_checkpoint_gives_the_official_logits_and_prediction(tmp_path):
    sd = released_model_dict()
    path = write_released(tmp_path / "checkpoint.pth", sd)
    model = evaluate.recognizer_from_released(path, "shapes-tiny", 32).eval()
    assert model.mask.tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert torch.equal(model.anchors, sd["text_embeddings"])     # V as stored, not normalised, as our own runs keep it

    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    reference_clip = clip_models.create_clip("shapes-tiny", 32).eval()   # E^I from the file's visual weights
    reference_clip.visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    with torch.no_grad():
        logits_I, logits_T, _ = model(x)
        E_I = reference_clip.encode_image(x)
    want_I, want_T, want_P = official_equations(sd, E_I, alpha=0.2)
    np.testing.assert_allclose(logits_I.numpy(), want_I, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits_T.numpy(), want_T, rtol=1e-4, atol=1e-4)
    P = lgr.lgr_probabilities(logits_I, logits_T, "official", data.DATASETS["imagenet_lt"]["alpha"])
    np.testing.assert_allclose(P.numpy(), want_P, atol=1e-5)
    assert P.argmax(1).tolist() == want_P.argmax(1).tolist()


def test_released_logit_scale_above_ln_100_is_read_as_stored(tmp_path):
    # The official head multiplies the cosines by exp(logit_scale), unclamped; our training clamps 1/tau at 100.
    # At logit_scale 5.0 (> ln 100 = 4.605) the text logits are exp(5) = 148.4 times the cosines, not 100 times.
    sd = released_model_dict()
    sd["logit_scale"] = torch.tensor(5.0)
    model = evaluate.recognizer_from_released(write_released(tmp_path / "checkpoint.pth", sd), "shapes-tiny", 32).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference_clip = clip_models.create_clip("shapes-tiny", 32).eval()
    reference_clip.visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    with torch.no_grad():
        logits_I, logits_T, _ = model(x)
        E_I = reference_clip.encode_image(x)
    want_I, want_T, want_P = official_equations(sd, E_I, alpha=0.2)
    _, want_T_clamped, _ = official_equations({**sd, "logit_scale": torch.tensor(np.log(100.0))}, E_I, alpha=0.2)
    np.testing.assert_allclose(want_T / want_T_clamped, np.exp(5.0) / 100, rtol=1e-9)   # 1.484: only the scale differs
    np.testing.assert_allclose(logits_T.numpy(), want_T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits_I.numpy(), want_I, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lgr.lgr_probabilities(logits_I, logits_T, "official", 0.2).numpy(), want_P, atol=1e-5)


def test_released_evaluation_crop_is_the_centre_224_of_the_short_side_resized_to_256():
    img = torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)
    x = make_transform(224, mean, std, train=False, crop_pct=0.875)(img)   # short side already 256: no resize
    top, left = (256 - 224) // 2, (300 - 224) // 2                          # 16, 38
    want = (img[:, top:top + 224, left:left + 224].float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    assert x.shape == (3, 224, 224) and torch.allclose(x, want, atol=1e-6)


def test_evaluate_released_prints_the_table_with_dashes_for_empty_groups(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "imagenet")            # 3 classes of 2 train images: all few-shot
    path = write_released(tmp_path / "checkpoint.pth", released_model_dict())
    evaluate.main(["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
                   "--released", path, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    # The three test images are the same red square: one prediction for all, right for exactly one class.
    assert "  alpha mix, alpha 0.2         33.3       -       -    33.3" in out
    assert os.path.exists(tmp_path / "out" / "eval_released.json")


def test_evaluate_released_prints_the_official_row_with_the_papers_row_under_it(tmp_path, capsys, monkeypatch):
    root = make_imagenet_tree(tmp_path / "imagenet")            # 3 classes of 2 train images: all few-shot
    path = write_released(tmp_path / "checkpoint.pth", released_model_dict())
    monkeypatch.setitem(evaluate.PAPER_VLLTR, ("imagenet_lt", "shapes-tiny"), "70.1 / 77.8 / 67.0 / 50.8")
    evaluate.main(["--data", "imagenet_lt", "--data-root", str(root), "--backbone", "shapes-tiny", "--image-size", "32",
                   "--released", path, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("as the official evaluation  ")))
    assert lines[first + 1] == "paper (test split)             70.1    77.8    67.0    50.8"
    assert lines[first + 2].startswith("  alpha mix, alpha 0.2") and lines[first + 3].startswith("  logit sum")
    report = json.loads((tmp_path / "out" / "eval_released.json").read_text())
    assert list(report["results"]) == ["as the official evaluation", "  alpha mix, alpha 0.2", "  logit sum",
                                       "  P^I only", "  P^T only"]
    assert report["eval_precision"] == "fp32"


def test_format_table_prints_a_dash_for_a_group_without_classes():
    table = evaluate.format_table({"m": {"overall": 50.0, "many": float("nan"), "medium": 12.34, "few": 0.0}}, "t")
    assert table.splitlines()[-1] == "m                              50.0       -    12.3     0.0"


def test_released_file_missing_a_head_weight_is_one_line(tmp_path):
    sd = released_model_dict()
    del sd["text_block.attn.wk.weight"]
    path = write_released(tmp_path / "checkpoint.pth", sd)
    with pytest.raises(DataError, match=r"is not in the released VL-LTR format \(no text_block.attn.wk.weight"):
        evaluate.recognizer_from_released(path, "shapes-tiny", 32)


def test_released_file_of_another_backbone_or_size_is_one_line(tmp_path):
    path = write_released(tmp_path / "checkpoint.pth", released_model_dict())
    with pytest.raises(DataError, match=r"has D = 64, --backbone RN50 D = 1024; pass the backbone"):
        evaluate.recognizer_from_released(path, "RN50", 224)
    with pytest.raises(DataError, match=r"does not fit --backbone shapes-tiny at --image-size 64: .*positional_embedding"):
        evaluate.recognizer_from_released(path, "shapes-tiny", 64)


class RunsCode:
    """An object whose unpickling would create a folder: a checkpoint must never run it."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.makedirs, (self.folder,)


def test_released_file_with_arbitrary_objects_is_refused_without_running_them(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"model": released_model_dict(), "args": RunsCode(str(marker))}, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", "imagenet_lt", "--data-root", str(make_imagenet_tree(tmp_path / "imagenet")),
                       "--backbone", "shapes-tiny", "--image-size", "32", "--workers", "0",
                       "--released", str(tmp_path / "checkpoint.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not marker.exists()
    assert err.count("\n") == 1 and err.startswith("error: --released ") and "makedirs object, refused without running it" in err


# ----------------------------------------------------------------------------------------------
# Offline start: the cache first, one line at once when nothing is there and nothing can be reached


def test_no_cached_weights_and_no_network_is_one_line_at_once(empty_caches, monkeypatch):
    monkeypatch.setattr(clip_models, "reachable", lambda host, timeout=5: False)
    with pytest.raises(DataError, match=r"^no OpenAI CLIP weights for RN50 in open_clip's cache and huggingface.co "
                                        r"cannot be reached: pass --clip-weights PATH .*pretrained/"):
        clip_models.pretrained_weights("RN50", "openai")


def test_cached_weights_are_used_without_the_network(empty_caches, monkeypatch):
    monkeypatch.setattr(clip_models, "reachable", lambda host, timeout=5: pytest.fail("network checked"))
    archive = empty_caches / ".cache" / "clip" / "RN50.pt"     # where open_clip puts OpenAI's URL download
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"x")
    assert clip_models.pretrained_weights("RN50", "openai") == str(archive)
    # The Hugging Face hub cache (open_clip's first choice) wins when both are there.
    repo = empty_caches / "hf" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    want = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    assert clip_models.pretrained_weights("RN50", "openai") == str(want)


def test_online_without_cache_downloads_through_open_clip(empty_caches, monkeypatch):
    monkeypatch.setattr(clip_models, "reachable", lambda host, timeout=5: host == "huggingface.co")
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: f"/downloaded/{cfg['hf_hub']}")
    assert clip_models.pretrained_weights("RN50", "openai") == "/downloaded/timm/resnet50_clip.openai/"


def test_open_clip_random_init_line_is_silenced_only_inside_create_clip(caplog):
    with caplog.at_level(logging.WARNING):
        clip_models.create_clip("RN50", 224)
        assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
        logging.warning("No pretrained weights loaded for model 'X'. Model initialized randomly.")   # outside: kept
    assert [r.getMessage() for r in caplog.records] == ["No pretrained weights loaded for model 'X'. Model initialized randomly."]


@pytest.mark.parametrize("dataset, cores, explicit, want", [
    ("imagenet_lt", 2, None, 2), ("imagenet_lt", 16, None, 8), ("imagenet_lt", 2, 5, 5), ("shapes_lt", 16, None, 0)])
def test_loader_workers_default_to_the_cores_this_process_may_use(monkeypatch, dataset, cores, explicit, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    args = types.SimpleNamespace(data=dataset, backbone=None, pretrained=None, image_size=None, data_root=None,
                                 workers=explicit, out=None)
    assert data.fill_defaults(args).workers == want
