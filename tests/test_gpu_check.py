"""gpu_check.py, the prepared GPU run, in its dry-run mode: every part at tiny sizes on the CPU, so that the script
and the commands it runs cannot drift apart while no GPU is at hand."""
import json

from tools import gpu_check


def test_dry_run_runs_every_part_and_keeps_their_numbers(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--dry-run", "--budget", "36000"]) == 0      # no limit of the GPU's on a CPU
    summary = json.loads((out / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == list(gpu_check.PARTS) and all(p["status"] == "ok" for p in parts.values()), parts
    # a measured speed, not asserted: a CPU without bf16 kernels rounds its TFLOP/s to 0.0
    assert parts["env"]["results"]["torch"] and parts["env"]["results"]["bf16_matmul_tflops"] >= 0
    assert parts["tests"]["results"]["counts"]["skipped"] >= 7                 # the CUDA tests, skipped on the CPU
    for backbone, (paths, _) in gpu_check.STEP_PATHS.items():              # the new step against the best of before
        step = parts["step"]["results"][backbone]
        assert list(step["paths"]) == paths and step["left_for_a_second_run"] == [], step
        assert all(r["samples_s"] > 0 and r["peak_gib"] >= 0 for r in step["paths"].values())
        assert set(step["compile_s"]) == {p for p in paths if p.endswith("+compile")} and step["new_over_old"] > 0
        losses = [r["loss"] for r in step["paths"].values()]
        assert max(losses) - min(losses) < 1e-4                              # the same L_pre on the same batch
    assert set(parts["loaders"]["results"]["loader"]["images_s"]) == {"pil", "gpu"}
    assert set(parts["heads"]["results"]["heads"]) == {"fc", "lgr"} and parts["heads"]["results"]["head_step"]
    demo = parts["demo"]["results"]
    assert len(demo["stages_s"]) == 5 and any(line.startswith("VL-LTR (LGR)") for line in demo["table"]), demo
    stages = parts["rehearse"]["results"]["stages"]
    assert [s["stage"] for s in stages] == ["data", "cvlp"] and all(s["status"] == "ok" for s in stages)
    assert (out / "rehearsal_imagenet_lt.md").exists()
    log = (out / "gpu_check.log").read_text()
    assert "1. CVLP step" in log and "== summary" in log                       # every part's output, in order


def test_a_part_with_no_budget_left_is_skipped_not_started(tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run", "--budget", "5", "--parts", "env,tests"]) == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {p["status"] for p in parts.values()} == {"skipped: out of budget"}
    assert "$ " not in (tmp_path / "gpu_check.log").read_text()                # nothing was run
