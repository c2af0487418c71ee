"""The evaluation precision (docs/design.md §3): every evaluation path runs in fp32, whatever the training precision
(bf16 autocast on CUDA), so that an accuracy does not move with it.

    python -m pytest -q test_precision.py        # CPU, no data, a few seconds

A CPU cannot run CUDA autocast, so the first test records which autocast each context asks torch for, with
a "cuda" device string: the evaluation context switches CPU and CUDA autocast off on every device, the training
one asks for bf16 on CUDA (and only for CPU's off on a CPU). The others run each evaluation path twice: inside a
bf16 CPU autocast, as if called from a training step, checking the dtype its layers compute in (bf16 if the path
did not switch autocast off), and with the autocasts recorded, checking it asked for the evaluation context's.
"""
import argparse

import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
import lgr
import predict
from util import clip_models, engine


class RecordedAutocast:
    """Stands in for torch.autocast: records (device type, dtype or None when disabled), does nothing."""
    calls = []

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        RecordedAutocast.calls.append((device_type, dtype if enabled else None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def requested(context, monkeypatch):
    """The autocasts a context asks torch for when entered."""
    return requested_by(lambda: context().__enter__(), monkeypatch)


def requested_by(fn, monkeypatch):
    """The autocasts fn() asks torch for."""
    monkeypatch.setattr(torch, "autocast", RecordedAutocast)
    RecordedAutocast.calls = []
    fn()
    monkeypatch.undo()
    return RecordedAutocast.calls


EVALUATION = {("cpu", None), ("cuda", None)}      # what eval_precision asks for, on every device (test above)


def test_evaluation_asks_for_no_autocast_on_cuda_and_training_for_bf16(monkeypatch):
    assert requested(lambda: engine.autocast("cuda"), monkeypatch) == [("cuda", torch.bfloat16)]   # training
    assert requested(lambda: engine.eval_precision("cuda"), monkeypatch) == [("cpu", None), ("cuda", None)]
    assert requested(lambda: engine.eval_precision("cuda:1"), monkeypatch) == [("cpu", None), ("cuda", None)]
    # --released --eval-precision fp16: the official evaluation's fp16 autocast, on CUDA only.
    assert requested(lambda: engine.eval_precision("cuda", "fp16"), monkeypatch) == [("cpu", None), ("cuda", torch.float16)]
    assert requested(lambda: engine.eval_precision("cpu", "fp16"), monkeypatch) == [("cpu", None), ("cuda", None)]
    assert requested(lambda: engine.autocast("cpu"), monkeypatch) == [("cpu", None)]        # training on a CPU


def dtype_recorder(module):
    """A list that receives the dtype of every output of `module`."""
    seen = []
    module.register_forward_hook(lambda m, inputs, output: seen.append(output.dtype))
    return seen


def tiny_recognizer(D=8, C=3, size=8):
    """An LGR Recognizer whose visual encoder is one linear layer on the pixels."""
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, D))
    anchors = torch.randn(C, 2, D)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    return lgr.Recognizer(visual, D, C, "lgr", variant="official", anchors=anchors, mask=mask).eval()


def test_a_bf16_autocast_around_a_layer_does_make_it_compute_in_bf16():
    # The control for the tests below: without an evaluation context, this autocast turns linear layers to bf16.
    layer = nn.Linear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16


def test_lgr_predict_runs_fp32_inside_a_training_autocast(monkeypatch):
    # evaluate.py's heads, validation inside lgr.py's fit, evaluate.py --released
    model = tiny_recognizer()
    seen = dtype_recorder(model.visual[1])
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loader = [(x, torch.tensor([0, 1, 2, 0, 1]))]
    args = argparse.Namespace(device="cpu", variant="official", data="imagenet_lt")
    plain, _ = lgr.predict(model, loader, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = lgr.predict(model, loader, args)
    assert seen == [torch.float32, torch.float32]
    assert all(torch.equal(plain[k], inside[k]) for k in plain) and set(plain) == {"P", "P_I", "P_T", "logit_sum"}
    assert set(requested_by(lambda: lgr.predict(model, loader, args), monkeypatch)) == EVALUATION


def test_image_and_text_embeddings_run_fp32_inside_a_training_autocast(monkeypatch):
    layer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    seen = dtype_recorder(layer[1])
    loader = [(torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2]))]
    clip = clip_models.create_clip("shapes-tiny", 32)
    seen_text = dtype_recorder(clip.transformer.resblocks[0].mlp.c_fc)
    tokens = clip_models.tokenize_exact(["a photo of a red circle.", "a star."], 77)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        E_I, _ = clip_models.encode_images(layer, loader, "cpu")        # zero-shot, KNN, AnSS, CVLP's val check
        E_T = clip_models.encode_texts(clip, tokens, "cpu")             # zero-shot, AnSS, CVLP's val check
    assert seen == [torch.float32] and seen_text and set(seen_text) == {torch.float32}
    assert E_I.dtype == E_T.dtype == torch.float32
    assert set(requested_by(lambda: clip_models.encode_images(layer, loader, "cpu"), monkeypatch)) == EVALUATION
    assert set(requested_by(lambda: clip_models.encode_texts(clip, tokens, "cpu"), monkeypatch)) == EVALUATION
    # CVLP's cached teacher text stands in for the teacher's forward inside the training step: training precision.
    assert set(requested_by(lambda: clip_models.encode_texts(clip, tokens, "cpu", training_precision=True),
                            monkeypatch)) == {("cpu", None)}


def test_predict_explain_runs_fp32_inside_a_training_autocast(monkeypatch):
    model = tiny_recognizer()
    seen = dtype_recorder(model.visual[1])
    args = argparse.Namespace(device="cpu", variant="official", data="imagenet_lt", image_size=8, backbone="RN50",
                              pretrained="openai")
    classes = [{"name": n, "sentences": s} for n, s in (("a", ["a1", "a2"]), ("b", ["b1"]), ("c", ["c1", "c2"]))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        top = predict.explain(model, args, classes, Image.new("RGB", (8, 8), (200, 30, 30)), top=3, sentences=1)
    assert seen == [torch.float32] and len(top) == 3
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    assert set(requested_by(lambda: predict.explain(model, args, classes, image), monkeypatch)) == EVALUATION


def test_fp16_evaluation_is_for_released_checkpoints_only(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.get_args(["--eval-precision", "fp16"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --eval-precision fp16 is for --released checkpoints; every other "
                                       "evaluation runs in fp32\n")
