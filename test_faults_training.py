import os
import signal

import pytest
import torch

import anss
import cvlp
import lgr


# ----------------------------------------------------------------------------------------------
# Faults in training: interruption, resume, bad numbers, bad checkpoints, no space. Each runs the real
# entry point in-process on shapes_lt with a tiny random CLIP and a few steps.


def cvlp_args(env, out, *extra):
    return ["--data", "shapes_lt", "--data-root", str(env["root"]), "--out", str(out), "--device", "cpu",
            "--clip-weights", str(env["clip"]), "--batch", "16", "--epochs", "2", *extra]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_resume_mid_epoch_ends_with_bitwise_the_same_weights(shapes_env, tmp_path):
    # Uninterrupted: 4 optimiser steps of 2 accumulated batches. Interrupted: stop after 2 steps, resume to 4.
    cvlp.main(cvlp_args(shapes_env, tmp_path / "a", "--accum", "2", "--stop-after-steps", "4"))
    cvlp.main(cvlp_args(shapes_env, tmp_path / "b", "--accum", "2", "--stop-after-steps", "2"))
    assert torch.load(tmp_path / "b" / "cvlp.pt", weights_only=True)["position"]["batch"] == 4   # mid-epoch
    cvlp.main(cvlp_args(shapes_env, tmp_path / "b", "--accum", "2", "--stop-after-steps", "4", "--resume"))
    assert_same_weights(weights(tmp_path / "a" / "cvlp.pt"), weights(tmp_path / "b" / "cvlp.pt"))
    # Without restoring the sample order and random states the weights differ (the test can fail):
    cvlp.main(cvlp_args(shapes_env, tmp_path / "c", "--accum", "2", "--stop-after-steps", "2", "--seed", "1"))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(tmp_path / "a" / "cvlp.pt"), weights(tmp_path / "c" / "cvlp.pt"))


def test_resume_of_the_fc_baseline_across_stops_is_exact(shapes_env, tmp_path):
    args = ["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--device", "cpu", "--clip-weights",
            str(shapes_env["clip"]), "--init", "clip", "--head", "fc", "--batch", "16", "--epochs", "1"]
    lgr.main(args + ["--out", str(tmp_path / "a"), "--stop-after-steps", "3"])
    lgr.main(args + ["--out", str(tmp_path / "b"), "--stop-after-steps", "1"])
    lgr.main(args + ["--out", str(tmp_path / "b"), "--stop-after-steps", "3", "--resume"])
    assert_same_weights(weights(tmp_path / "a" / "fc_clip.pt"), weights(tmp_path / "b" / "fc_clip.pt"))


def test_ctrl_c_saves_the_last_step_and_exits_130(shapes_env, tmp_path, monkeypatch, capsys):
    real, calls = cvlp.cvlp_loss, []

    def loss_then_ctrl_c(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)                  # as if the user pressed Ctrl-C in step 2
        return real(*a)

    monkeypatch.setattr(cvlp, "cvlp_loss", loss_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path))
    assert e.value.code == 130
    assert "interrupted: saved" in capsys.readouterr().out
    position = torch.load(tmp_path / "cvlp.pt", weights_only=True)["position"]
    assert (position["epoch"], position["batch"]) == (0, 2)     # the step in which Ctrl-C came was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(shapes_env, tmp_path, monkeypatch, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    before = (tmp_path / "cvlp.pt").read_bytes()
    real, calls = cvlp.cvlp_loss, []

    def nan_at_third(*a):
        calls.append(1)
        loss, stats = real(*a)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(cvlp, "cvlp_loss", nan_at_third)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "loss is nan at epoch 1, batch 4" in err and "Traceback" not in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before        # no NaN weights written


def test_gradient_clipping_bounds_the_update(shapes_env, tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: norms.append(m) or real(p, m))
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--clip-grad", "0.5", "--stop-after-steps", "2"))
    assert norms == [0.5, 0.5]


@pytest.mark.parametrize("content, says", [(b"not a checkpoint", "not a readable checkpoint"), (None, "not a readable checkpoint")])
def test_corrupt_or_truncated_checkpoint_is_refused(shapes_env, tmp_path, capsys, content, says):
    if content is None:                                          # truncated: half of a real checkpoint
        cvlp.main(cvlp_args(shapes_env, tmp_path / "src", "--stop-after-steps", "1"))
        full = (tmp_path / "src" / "cvlp.pt").read_bytes()
        content = full[:len(full) // 2]
    (tmp_path / "cvlp.pt").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        anss.main(["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1


def test_resume_refuses_a_checkpoint_of_another_dataset_or_class_count(shapes_env, tmp_path, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    ckpt = torch.load(tmp_path / "cvlp.pt", weights_only=True)
    torch.save({**ckpt, "num_classes": 1000, "data": "imagenet_lt"}, tmp_path / "cvlp.pt")
    before = (tmp_path / "cvlp.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "imagenet_lt" in err and "expects data 'shapes_lt'" in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before


def test_unwritable_out_fails_before_any_work(shapes_env, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, blocker / "run"))
    assert e.value.code == 2 and "cannot write to --out" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(shapes_env, tmp_path, monkeypatch, capsys):
    cvlp.main(cvlp_args(shapes_env, tmp_path, "--stop-after-steps", "1"))
    before = (tmp_path / "cvlp.pt").read_bytes()

    def full(path, ckpt):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cvlp, "save_checkpoint", full)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path, "--resume", "--stop-after-steps", "2"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and "intact" in err
    assert (tmp_path / "cvlp.pt").read_bytes() == before


def test_gpu_out_of_memory_suggests_a_smaller_batch_or_accum(shapes_env, tmp_path, monkeypatch, capsys):
    def oom(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cvlp, "cvlp_loss", oom)
    with pytest.raises(SystemExit) as e:
        cvlp.main(cvlp_args(shapes_env, tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch 8 --accum 2" in err and "Traceback" not in err
