"""End to end: every stage runs on shapes_lt (a tiny random CLIP, two steps each) and writes the files
of docs/design.md §1, loadable with weights_only=True; missing inputs give one-line errors naming the fix."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import anss
import cvlp
import data
import evaluate
import lgr
from util import clip_models, shapes_lt
from tools import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(shapes_env, tmp_path_factory):
    """cvlp -> anss -> lgr (LGR and the CLIP + FC baseline) -> evaluate, in one temporary run folder."""
    root, clip, out = shapes_env["root"], shapes_env["clip"], tmp_path_factory.mktemp("run")
    common = ["--data", "shapes_lt", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    short = ["--epochs", "1", "--stop-after-steps", "2", "--batch", "32"]
    cvlp.main(common + ["--clip-weights", str(clip)] + short)
    anss.main(common + ["--M", "8"])
    lgr.main(common + short)
    lgr.main(common + ["--clip-weights", str(clip), "--init", "clip", "--head", "fc"] + short)
    evaluate.main(common + ["--clip-weights", str(clip)])
    return {"root": root, "out": out, "clip": clip, "common": common}


def test_every_stage_writes_its_files(run):
    names = sorted(os.listdir(run["out"]))
    for f in ("cvlp.pt", "anchors.json", "anchor_embeds.pt", "lgr.pt", "fc_clip.pt", "eval.json"):
        assert f in names, f"{f} missing from {names}"


def test_checkpoints_are_plain_dicts_loadable_with_weights_only(run):
    for f, stage in (("cvlp.pt", "cvlp"), ("anchor_embeds.pt", "anss"), ("lgr.pt", "lgr"), ("fc_clip.pt", "lgr")):
        ckpt = torch.load(run["out"] / f, weights_only=True)
        assert ckpt["stage"] == stage
        assert isinstance(ckpt["args"], dict) and ckpt["args"]["data"] == "shapes_lt"
    ckpt = torch.load(run["out"] / "cvlp.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch"} <= set(ckpt)


def test_anchor_embeddings_are_C_by_M_by_D_with_a_mask(run):
    a = torch.load(run["out"] / "anchor_embeds.pt", weights_only=True)
    assert a["embeds"].shape == (100, 8, 64) and a["mask"].shape == (100, 8)
    assert a["mask"].dtype == torch.bool and a["mask"].all()       # every shapes_lt class has >= 85 sentences



def test_anchor_embeddings_are_the_text_encoders_own_output_not_normalised(run):
    """V = E^T (Eq. 5): what cvlp.pt's text encoder gives for each sentence anchors.json lists, as it is."""
    a = torch.load(run["out"] / "anchor_embeds.pt", weights_only=True)
    ckpt = torch.load(run["out"] / "cvlp.pt", weights_only=True)
    model = clip_models.create_clip("shapes-tiny", 32)
    model.load_state_dict(ckpt["model"])
    classes = json.loads((run["out"] / "anchors.json").read_text())["classes"]
    tokens, _ = clip_models.tokenize_exact(classes[3]["sentences"], clip_models.context_length(model))
    with torch.no_grad():
        expected = model.eval().encode_text(tokens)                  # open_clip's own forward, unnormalised
    assert torch.allclose(a["embeds"][3], expected, atol=1e-5)
    assert not torch.allclose(a["embeds"].norm(dim=-1), torch.ones(100, 8), atol=0.1)
    args = lgr.get_args(run["common"])                               # the fine-tuning reads them as they are saved,
    args.num_classes = 100                                           # as the released checkpoints' are read
    assert torch.equal(lgr.build_recognizer(args, "cpu").anchors, a["embeds"])


def test_anchors_json_lists_M_sentences_per_class_lowest_score_first(run):
    a = json.loads((run["out"] / "anchors.json").read_text())
    assert a["M"] == 8 and a["select"] == "anss" and len(a["classes"]) == 100
    for c in a["classes"]:
        assert len(c["sentences"]) == 8 and c["scores"] == sorted(c["scores"])


def test_eval_json_reports_every_head_by_shot_split(run):
    r = json.loads((run["out"] / "eval.json").read_text())["results"]
    for head in ("Zero-Shot CLIP", "Baseline (CLIP + FC)", "VL-LTR (LGR)", "VL-LTR (LGR): P^I only",
                 "VL-LTR (LGR): P^T only", "KNN head (k=5)"):
        assert head in r, head
        assert all(0 <= r[head][k] <= 100 for k in ("overall", "many", "medium", "few"))
        assert len(r[head]["per_class"]) == 100


def test_anchors_json_and_eval_json_name_what_made_them(run):
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for f, stage in (("anchors.json", "anss"), ("eval.json", "evaluate")):
        header = json.loads((run["out"] / f).read_text())["header"]
        assert header["stage"] == stage and header["args"]["out"] == str(run["out"]) and header["world_size"] == 1
        assert header["git"]["commit"] == commit and header["torch"] == torch.__version__
    report = json.loads((run["out"] / "eval.json").read_text())
    assert report["checkpoint"] == "last"                          # the default: each run's last checkpoint
    assert sorted((os.path.basename(c["path"]), c["epoch"], c["batch"]) for c in report["checkpoints"]) == [
        ("fc_clip.pt", 0, 2), ("lgr.pt", 0, 2)]                    # stopped after 2 steps of epoch 1
    # Each training stage left its records beside its checkpoint: the header (no epoch finished in 2 steps)
    for f in ("cvlp.jsonl", "lgr.jsonl", "fc_clip.jsonl"):
        lines = (run["out"] / f).read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["header"]["checkpoint"] == f.replace(".jsonl", ".pt")


def test_a_failing_head_leaves_the_other_heads_in_eval_json(run, tmp_path, monkeypatch, capsys):
    """evaluate.py on a folder whose baseline checkpoint is truncated, with the KNN head out of memory: both are
    reported, every other head is evaluated and kept in eval.json, and the run ends with one error line."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    os.remove(out / "eval.json")
    (out / "fc_clip.pt").write_bytes(b"truncated")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 54568132608 bytes.")
    monkeypatch.setattr(evaluate, "knn_predict", out_of_memory)
    with pytest.raises(SystemExit) as e:
        evaluate.main(run["common"][:5] + [str(out)] + run["common"][6:] + ["--clip-weights", str(run["clip"])])
    r = json.loads((out / "eval.json").read_text())["results"]
    assert {"Zero-Shot CLIP", "VL-LTR (LGR)", "VL-LTR (LGR): P^T only"} <= set(r)
    assert "Baseline (CLIP + FC)" not in r and "KNN head (k=5)" not in r
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" failed: ")[0] for line in err if line.startswith("warning: ")] == [
        "warning: Baseline (CLIP + FC)", "warning: KNN head (k=5)"]
    assert "out of memory" in err[-2] and e.value.code == 2
    assert err[-1].startswith("error: 2 head(s) failed, first Baseline (CLIP + FC): ") and "is not a readable checkpoint" in err[-1]


def test_official_variant_lgr_is_reported_with_the_logit_sum_row_beside_the_alpha_mix(run, tmp_path, capsys):
    # docs/design.md §3: the official code's many / medium / few come from argmax(logits_I + logits_T); the paper variant
    # (the run above) has no such row.
    assert "VL-LTR (LGR): logit sum" not in json.loads((run["out"] / "eval.json").read_text())["results"]
    out = tmp_path / "official"
    out.mkdir()
    for f in ("cvlp.pt", "anchors.json", "anchor_embeds.pt"):
        (out / f).write_bytes((run["out"] / f).read_bytes())
    common = ["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(out), "--device", "cpu"]
    lgr.main(common + ["--variant", "official", "--epochs", "1", "--stop-after-steps", "2", "--batch", "32"])
    capsys.readouterr()
    evaluate.main(common + ["--clip-weights", str(run["clip"])])
    printed = capsys.readouterr().out
    r = json.loads((out / "eval.json").read_text())["results"]
    assert {"VL-LTR (LGR)", "VL-LTR (LGR): logit sum", "VL-LTR (LGR): P^I only", "VL-LTR (LGR): P^T only"} <= set(r)
    assert "logit sum: argmax of logits_I + logits_T" in printed


def test_missing_previous_stage_names_the_command_that_makes_it(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        anss.main(["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cvlp.pt not found" in err and "python cvlp.py" in err


def test_checkpoint_of_another_stage_is_refused(run, tmp_path, capsys):
    (tmp_path / "cvlp.pt").write_bytes((run["out"] / "lgr.pt").read_bytes())
    with pytest.raises(SystemExit):
        anss.main(["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(tmp_path), "--device", "cpu"])
    assert "not a cvlp checkpoint" in capsys.readouterr().err


def test_clip_standin_trains_and_saves_loadable_weights(tmp_path):
    path = tmp_path / "standin.pt"
    shapes_lt.train_clip_standin(clip_models.create_clip("shapes-tiny", 32), str(path), 0, "cpu", n_pairs=64, steps=2, batch=16)
    model = clip_models.load_clip_file(clip_models.create_clip("shapes-tiny", 32), str(path))
    assert model.logit_scale.shape == ()


def test_unknown_dataset_is_one_line_without_traceback():
    p = subprocess.run([sys.executable, "cvlp.py", "--data", "imagenet_1k"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: unknown --data 'imagenet_1k'") and "Traceback" not in p.stderr


def test_M_larger_than_every_corpus_keeps_all_sentences_padded_and_masked(run, tmp_path, capsys):
    anss.main(["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(tmp_path), "--device", "cpu",
               "--init", "clip", "--clip-weights", str(run["clip"]), "--M", "300"])   # shapes_lt: 85..280 per class
    assert "larger than every class's corpus" in capsys.readouterr().out
    a = torch.load(tmp_path / "anchor_embeds_clip.pt", weights_only=True)
    sizes = [len(c["sentences"]) for c in json.loads((tmp_path / "anchors_clip.json").read_text())["classes"]]
    assert a["embeds"].shape[:2] == (100, 300)
    assert a["mask"].sum(1).tolist() == sizes and max(sizes) < 300   # every sentence kept, the rest masked
    assert (a["embeds"][~a["mask"]] == 0).all()                      # padding rows are zeros


def test_rn50_uses_quickgelu_and_takes_224_weights_at_384(tmp_path):
    # OpenAI CLIP was trained with QuickGELU: a plain-GELU model would load its weights and compute wrong features.
    small = clip_models.create_clip("RN50", 224)
    assert type(small.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    torch.save(small.state_dict(), tmp_path / "rn50.pt")
    big = clip_models.load_clip_file(clip_models.create_clip("RN50", 384), str(tmp_path / "rn50.pt"))
    old, new = small.visual.attnpool.positional_embedding, big.visual.attnpool.positional_embedding
    assert old.shape == (1 + 7 * 7, 2048) and new.shape == (1 + 12 * 12, 2048)   # 224/32 -> 384/32 grid
    assert torch.equal(old[0], new[0])                                            # class token kept
    assert torch.equal(small.transformer.resblocks[0].attn.in_proj_weight, big.transformer.resblocks[0].attn.in_proj_weight)


def test_cutoff_keeps_the_first_M_sentences_of_each_corpus(run, tmp_path):
    (tmp_path / "cvlp.pt").write_bytes((run["out"] / "cvlp.pt").read_bytes())
    anss.main(["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(tmp_path), "--device", "cpu",
               "--select", "cutoff", "--M", "3"])
    a = json.loads((tmp_path / "anchors.json").read_text())
    assert a["select"] == "cutoff"
    first = a["classes"][0]
    name = first["name"]                                           # templates come first: Table 4 #7 keeps those
    assert first["sentences"] == [f"a bad photo of a {name}.", f"a photo of many {name}.", f"a sculpture of a {name}."]
    assert first["scores"] is None


@pytest.mark.parametrize("flags", [["--variant", "official"], ["--init", "scratch", "--lam", "1"], ["--text", "prompt"]])
def test_ablation_flags_train_and_write_a_cvlp_checkpoint(run, tmp_path, flags):
    cvlp.main(run["common"][:5] + [str(tmp_path)] + run["common"][6:] + ["--clip-weights", str(run["clip"]), "--batch", "16",
              "--stop-after-steps", "1"] + flags)
    ckpt = torch.load(tmp_path / "cvlp.pt", weights_only=True)
    assert ckpt["args"][flags[0].lstrip("-")] == flags[1]         # --variant official, --init scratch, --text prompt
    if flags[:2] == ["--variant", "official"]:                     # and the official LGR head fine-tunes on it
        anss.main(run["common"][:5] + [str(tmp_path)] + run["common"][6:] + ["--M", "4"])
        lgr.main(run["common"][:5] + [str(tmp_path)] + run["common"][6:] + ["--variant", "official", "--batch", "16",
                 "--stop-after-steps", "1"])
        assert torch.load(tmp_path / "lgr.pt", weights_only=True)["variant"] == "official"


def test_table_runner_runs_every_row_and_writes_the_results(shapes_env, tmp_path):
    """python experiments.py table, shortened: one seed, two steps per training stage."""
    root, clip = shapes_env["root"], shapes_env["clip"]
    experiments.main(["table", "--data", "shapes_lt", "--data-root", str(root), "--device", "cpu", "--clip-weights", str(clip),
                   "--seeds", "0", "--table-out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results"), "--stage-args", "--epochs 1 --stop-after-steps 2 --batch 32"])
    report = json.loads((tmp_path / "results" / "shapes_lt.json").read_text())
    assert list(report["table8"])[:3] == ["Zero-shot CLIP", "Baseline (CLIP + FC)", "VL-LTR"]
    assert len(report["table4"]) == 8 and report["table4"]["#3 without CLIP weights (scratch, no L_dis)"]["paper"] == 46.8
    for row in report["table4"].values():
        assert 0 <= row["overall"]["mean"] <= 100 and row["overall"]["std"] == 0.0      # one seed: std 0
    runs = tmp_path / "runs" / "shapes_lt" / "seed0"
    for folder, f in (("full", "fc_clip.pt"), ("full", "lgr_clip.pt"), ("no_dis", "lgr.pt"), ("scratch", "lgr.pt"),
                      ("cutoff", "lgr.pt"), ("prompt", "lgr.pt"), ("equal_epochs", "fc_clip.pt")):
        assert (runs / folder / f).exists(), f"{folder}/{f}"
    assert torch.load(runs / "no_dis" / "cvlp.pt", weights_only=True)["args"]["lam"] == 1.0
    assert json.loads((runs / "cutoff" / "anchors.json").read_text())["select"] == "cutoff"
    assert "| VL-LTR |" in (tmp_path / "results" / "shapes_lt.md").read_text()


def test_table_runner_skips_finished_stages_and_resumes_stopped_ones(tmp_path):
    args = lgr.get_args(["--out", str(tmp_path), "--epochs", "3"])
    assert experiments.stage_output(lgr, args) == (str(tmp_path / "lgr.pt"), False)            # nothing yet
    torch.save({"epoch": 2}, tmp_path / "lgr.pt")
    assert experiments.stage_output(lgr, args)[1] is False                                       # stopped: resume
    torch.save({"epoch": 3}, tmp_path / "lgr.pt")
    assert experiments.stage_output(lgr, args)[1] is True                                        # finished: skip


def test_cutoff_that_keeps_only_prompts_says_so_instead_of_a_precision_of_nothing(run, tmp_path, capsys):
    # shapes_lt's corpus starts with the 80 prompt templates: the first M = 8 of every class are all prompts, so no
    # description sentence is kept and there is no precision among them to print (it used to read "nan%").
    anss.main(["--data", "shapes_lt", "--data-root", str(run["root"]), "--out", str(tmp_path), "--device", "cpu",
               "--init", "clip", "--clip-weights", str(run["clip"]), "--M", "8", "--select", "cutoff"])
    out = capsys.readouterr().out
    assert ("  cutoff informative 100.0% of 800 kept; description sentences kept 0, the prompt templates fill every "
            "class's M\n") in out
    assert "nan" not in out


def test_knn_head_votes_over_every_corpus_sentence_or_with_a_flag_over_the_anchors(run, tmp_path, monkeypatch):
    """Table 4 #6 has no sentence selection: the official evaluation's KNN looks at every sentence of the corpus."""
    seen = []

    def knn(E_I, E_T, t, k, num_classes, chunk=4096):
        seen.append((len(E_T), k))
        return torch.zeros(len(E_I), dtype=torch.long)
    monkeypatch.setattr(evaluate, "knn_predict", knn)
    monkeypatch.setattr(evaluate, "zero_shot_classifier", lambda model, names, device: torch.zeros(100, 64))
    out = tmp_path / "run"                                           # only the KNN head and zero-shot to evaluate
    shutil.copytree(run["out"], out, ignore=shutil.ignore_patterns("lgr*.pt", "fc*.pt"))
    common = run["common"][:5] + [str(out)] + run["common"][6:] + ["--clip-weights", str(run["clip"])]
    evaluate.main(common)
    evaluate.main(common + ["--knn-sentences", "anchors", "--knn-k", "3"])
    corpus = sum(len(s) for s in data.load_data("shapes_lt", str(run["root"])).corpus.sentences)
    assert seen == [(corpus, 5), (100 * 8, 3)]                       # every sentence; the 8 anchors of 100 classes
