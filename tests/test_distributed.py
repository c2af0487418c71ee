"""torchrun: 2 processes of b samples train exactly as 1 process of 2 b samples, and resume exactly.

Two processes are spawned here as torchrun would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
in the environment), on CPU with gloo; they run the real cvlp.py / lgr.py main() one after another. The
reference is the plain one-process run of the same scripts with the global batch, in this process.
A rank killed mid-epoch runs under torchrun itself (`python -m torch.distributed.run --max-restarts 1`), which
starts this file as its script: see the end of the file.
"""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import cvlp
from data import DATASETS
import lgr
from util import engine
from util.resumable_sampler import ResumableSampler

STEPS = 3


def stage_args(shapes_env, out, batch, *extra):
    # --warmup 0: the full learning rate from the first step, so that a wrong gradient shows in the weights.
    return ["--data", "shapes_lt", "--data-root", str(shapes_env["root"]), "--clip-weights", str(shapes_env["clip"]),
            "--out", str(out), "--device", "cpu", "--workers", "0", "--epochs", "1", "--warmup", "0",
            "--batch", str(batch), "--stop-after-steps", str(STEPS), *extra]


def lgr_args(shapes_env, out, batch, *extra):
    # LGR on plain CLIP weights (--init clip), so no CVLP stage is needed: anchors written by write_anchors.
    return stage_args(shapes_env, out, batch, "--init", "clip", "--head", "lgr", *extra)


def write_anchors(out):
    """anchor_embeds_clip.pt as anss.py writes it: 100 classes x M = 4 unit sentence embeddings (D = 64),
    the last anchor of every other class padding (mask False), so LGR's masked attention is exercised."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(100, 4, dtype=torch.bool)
    mask[::2, -1] = False
    embeds = torch.nn.functional.normalize(torch.randn(100, 4, 64, generator=g), dim=-1) * mask[..., None]
    os.makedirs(out, exist_ok=True)
    engine.save_checkpoint(os.path.join(out, "anchor_embeds_clip.pt"), {
        "stage": "anss", "data": "shapes_lt", "backbone": "shapes-tiny", "pretrained": "standin", "num_classes": 100,
        "init": "clip",
        "embeds": embeds, "mask": mask})


def record_losses(stage, setattr=setattr):
    """Patch stage.fit so that every batch's loss is appended to the returned list."""
    losses, fit = [], engine.fit

    def recording_fit(model, batch_loss, *rest, **kwargs):
        def recorded(x, y):
            loss, stats = batch_loss(x, y)
            losses.append(loss.item())
            return loss, stats
        return fit(model, recorded, *rest, **kwargs)
    setattr(stage, "fit", recording_fit)
    return losses


def two_ranks(rank, runs, record):
    """One of the two spawned processes: each run (port, "cvlp" | "lgr", argv) in turn, as torchrun starts it;
    its losses saved to <record>/<i>_rank<rank>.pt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)                                     # as torchrun sets OMP_NUM_THREADS=1
    for i, (port, name, argv) in enumerate(runs):
        os.environ["MASTER_PORT"] = str(port)
        stage = {"cvlp": cvlp, "lgr": lgr}[name]
        losses = record_losses(stage)
        stage.main(argv)
        torch.save(losses, os.path.join(record, f"{i}_rank{rank}.pt"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(out, name):
    return torch.load(os.path.join(out, name), weights_only=True)["model"]


def assert_same_weights(a, b, lr):
    """Every weight equal to 1e-4, a tenth of one AdamW step or less at the stage's lr (a rank that skipped the
    gradient sync would be off by about a whole step, lr, in most entries). Not 1e-6: AdamW divides a step by the
    gradient's own size, so where the exact gradient is near 0 its rounding noise becomes a visible step, and the rounding
    differs here: each rank packs its own 8 sentences (clip_models.pack_sentences) where one process packs all 16,
    the same numbers computed in other shapes (seen: 2.6e-5 in a text-tower matrix after 3 steps, when the
    sentences ran in length groups). Where the exact gradient IS 0, the key's shift in
    attention (rows D:2D of in_proj_bias; LGR's W_k and ln_k biases: Q K^T changes by the same amount for
    every key, which the softmax ignores), the step is noise of size up to lr: compared to 2 lr a step."""
    assert a.keys() == b.keys()
    for k in a:
        a_k, b_k = a[k].float(), b[k].float()
        if k.endswith("attn.in_proj_bias"):
            D = len(a_k) // 3
            assert torch.allclose(a_k[D:2 * D], b_k[D:2 * D], atol=2 * lr * STEPS), k
            a_k, b_k = torch.cat([a_k[:D], a_k[2 * D:]]), torch.cat([b_k[:D], b_k[2 * D:]])
        if k in ("head.W_k.bias", "head.ln_k.bias"):
            assert torch.allclose(a_k, b_k, atol=2 * lr * STEPS), k
            continue
        assert torch.allclose(a_k, b_k, atol=1e-4, rtol=0), f"{k}: {(a_k - b_k).abs().max():.2e}"


@pytest.fixture(scope="module")
def runs(shapes_env, tmp_path_factory):
    """2 processes x 8 samples: CVLP 3 steps; CVLP stopped after 1 step and resumed to 3; LGR 3 steps. The
    same CVLP and LGR in one process x 16 samples. One spawn of 2 processes runs all four 2-process runs."""
    tmp = tmp_path_factory.mktemp("distributed")
    for folder in ("one", "two", "two_resumed"):
        write_anchors(tmp / folder)
    two = [(free_port(), "cvlp", stage_args(shapes_env, tmp / "two", 8)),
           (free_port(), "cvlp", stage_args(shapes_env, tmp / "two_resumed", 8, "--stop-after-steps", "1")),
           (free_port(), "cvlp", stage_args(shapes_env, tmp / "two_resumed", 8, "--resume")),
           (free_port(), "lgr", lgr_args(shapes_env, tmp / "two", 8))]
    (tmp / "record").mkdir()
    mp.spawn(two_ranks, args=(two, str(tmp / "record")), nprocs=2)
    with pytest.MonkeyPatch.context() as m:
        one_cvlp = record_losses(cvlp, m.setattr)
        cvlp.main(stage_args(shapes_env, tmp / "one", 16))
        one_lgr = record_losses(lgr, m.setattr)
        lgr.main(lgr_args(shapes_env, tmp / "one", 16))
    two_losses = {(i, r): torch.load(tmp / "record" / f"{i}_rank{r}.pt", weights_only=True) for i in range(4) for r in range(2)}
    return {"tmp": tmp, "one_cvlp": one_cvlp, "one_lgr": one_lgr, "two": two_losses}


def test_cvlp_on_two_ranks_computes_the_global_batch_loss_and_the_same_weights(runs):
    # Eq. (2)-(3) over the gathered 16 x 16 similarities: both ranks hold the one-process loss of each step.
    assert len(runs["one_cvlp"]) == STEPS
    for rank in (0, 1):
        assert runs["two"][0, rank] == pytest.approx(runs["one_cvlp"], abs=1e-6)
    assert_same_weights(weights(runs["tmp"] / "two", "cvlp.pt"), weights(runs["tmp"] / "one", "cvlp.pt"),
                        lr=DATASETS["shapes_lt"]["cvlp_lr"])


def test_lgr_on_two_ranks_averages_to_the_global_batch_loss_and_the_same_weights(runs):
    # Each rank's Eq. (9) is the mean over its 8 images; the mean of the two is the mean over all 16.
    mean = [(a + b) / 2 for a, b in zip(runs["two"][3, 0], runs["two"][3, 1])]
    assert len(mean) == STEPS and runs["two"][3, 0] != runs["two"][3, 1]     # the ranks saw different images
    assert mean == pytest.approx(runs["one_lgr"], abs=1e-6)
    assert_same_weights(weights(runs["tmp"] / "two", "lgr_clip.pt"), weights(runs["tmp"] / "one", "lgr_clip.pt"),
                        lr=DATASETS["shapes_lt"]["lgr_lr"])


def test_two_rank_run_stopped_and_resumed_equals_the_uninterrupted_one(runs):
    # Stopped after step 1, resumed for steps 2-3: the losses and weights of the uninterrupted 2-rank run, bitwise
    # (the sampler, sentence and augmentation streams continue where they stopped).
    for rank in (0, 1):
        assert runs["two"][1, rank] + runs["two"][2, rank] == runs["two"][0, rank]
    a, b = weights(runs["tmp"] / "two_resumed", "cvlp.pt"), weights(runs["tmp"] / "two", "cvlp.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_rank_takes_its_run_of_every_global_batch_and_skip_counts_global_samples():
    # One stream 0..10, 2 ranks x batch 2: global batches [0 1 2 3], [4 5 6 7]; 8, 9 (incomplete) dropped.
    stream = list(range(10))
    rank0, rank1 = (ResumableSampler(stream, batch=2, rank=r, world_size=2) for r in (0, 1))
    assert (list(rank0), list(rank1)) == ([0, 1, 4, 5], [2, 3, 6, 7])
    assert len(rank0) == len(rank1) == 4
    rank0.skip = rank1.skip = 4                                  # resumed after one global batch of 2 x 2
    assert (list(rank0), list(rank1), len(rank0)) == ([4, 5], [6, 7], 2)


def test_anss_and_evaluate_refuse_torchrun_with_a_one_line_error(monkeypatch, capsys):
    import anss
    import evaluate
    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage, name in ((anss, "anss.py"), (evaluate, "evaluate.py")):
        with pytest.raises(SystemExit) as e:
            stage.main([])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and f"plain `python {name}" in err


# ----------------------------------------------------------------------------------------------
# A rank killed mid-epoch (SIGKILL: the out-of-memory killer, a lost node) under torchrun --max-restarts


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_rank_1_on_first_attempt(stage, batch):
    """Patch stage.fit so that rank 1 is SIGKILLed (no handler, no save) in its `batch`-th batch, in torchrun's
    first attempt only (TORCHELASTIC_RESTART_COUNT 0): the restarted attempt runs undisturbed."""
    fit = engine.fit

    def fit_killed_once(model, batch_loss, *rest, **kwargs):
        calls = []

        def loss_or_kill(x, y):
            calls.append(1)
            if (len(calls) == batch and os.environ["RANK"] == "1"
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
                os.kill(os.getpid(), signal.SIGKILL)
            return batch_loss(x, y)
        return fit(model, loss_or_kill, *rest, **kwargs)
    stage.fit = fit_killed_once


def torchrun(*argv, timeout=900):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGV` from the repository: the finished
    process (stdout, stderr, returncode). Past `timeout` s it is stopped as a scheduler would (SIGTERM to the
    agent, which passes it to its workers and SIGKILLs them 30 s later) and the test fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, argv)]
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)        # the stages, for this file
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        pytest.fail(f"torchrun still running after {timeout} s:\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.parametrize("stage, make_args, checkpoint", [("cvlp", stage_args, "cvlp.pt"), ("lgr", lgr_args, "lgr_clip.pt")],
                         ids=["cvlp", "lgr"])
def test_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_as_the_uninterrupted_run(
        shapes_env, runs, stage, make_args, checkpoint):
    # 3 steps of 2 ranks x 8, a checkpoint after every step (--save-every of a few microseconds); rank 1 is killed
    # in step 2 of the first attempt. torchrun stops rank 0 and starts both again; --resume (which found no
    # checkpoint in the first attempt, so it started fresh) now continues after step 1.
    out = runs["tmp"] / f"{stage}_restarted"
    write_anchors(out)
    r = torchrun("--max-restarts", "1", __file__, stage,
                 *make_args(shapes_env, out, 8, "--resume", "--save-every", "1e-7"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / checkpoint} at epoch 1, batch 1 (torchrun restart 1)" in r.stdout, r.stdout
    a, b = weights(out, checkpoint), weights(runs["tmp"] / "two", checkpoint)   # the uninterrupted 2-rank run's
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":     # torchrun's worker in the test above: `test_distributed.py cvlp|lgr ARGS`
    stage = {"cvlp": cvlp, "lgr": lgr}[sys.argv[1]]
    kill_rank_1_on_first_attempt(stage, batch=2)
    stage.main(sys.argv[2:])
