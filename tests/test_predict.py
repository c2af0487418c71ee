"""predict.py on a tiny trained run: the classes ranked by P (Eq. 7 = P^I + P^T), the attention weights of
each class summing to 1 over its real anchors, padded anchors never listed, bad input one line."""
import json

import numpy as np
import pytest
from PIL import Image

import anss
import cvlp
import lgr
import predict
from util import shapes_lt


@pytest.fixture(scope="module")
def run(shapes_env, tmp_path_factory):
    """cvlp -> anss (M = 100: the classes with fewer sentences are padded) -> lgr, one step each, and two
    image files: a shapes_lt test image as PNG and a grayscale JPEG of another size."""
    root, clip, out = shapes_env["root"], shapes_env["clip"], tmp_path_factory.mktemp("predict_run")
    common = ["--data", "shapes_lt", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    short = ["--epochs", "1", "--stop-after-steps", "1", "--batch", "16"]
    cvlp.main(common + ["--clip-weights", str(clip)] + short)
    anss.main(common + ["--M", "100"])
    lgr.main(common + short)
    world = shapes_lt.load_world(str(root), 0)
    png, jpeg = out / "test0.png", out / "gray.jpg"
    Image.fromarray(world["test_images"][0]).save(png)
    Image.fromarray(world["test_images"][1]).convert("L").resize((50, 40)).save(jpeg)
    anchors = json.loads((out / "anchors.json").read_text())["classes"]
    return {"out": out, "png": png, "jpeg": jpeg, "anchors": anchors}


def predict_json(run, capsys, *flags):
    predict.main([str(run["png"]), str(run["jpeg"]), "--run", str(run["out"]), "--device", "cpu", "--json", *flags])
    return json.loads(capsys.readouterr().out)


def test_top_classes_are_ranked_by_P_the_sum_of_both_branches(run, capsys):
    answers = predict_json(run, capsys)
    assert [a["image"] for a in answers] == [str(run["png"]), str(run["jpeg"])]
    for a in answers:
        top = a["top"]
        assert len(top) == 5 and all(len(t["anchors"]) == 3 for t in top)
        assert [t["P"] for t in top] == sorted((t["P"] for t in top), reverse=True)
        for t in top:
            assert t["P"] == pytest.approx(t["P_I"] + t["P_T"], abs=1e-6)     # Eq. (7), paper variant
            assert t["name"] == run["anchors"][t["class"]]["name"]


def test_attention_of_every_class_sums_to_one_over_its_real_anchors_and_padding_is_never_listed(run, capsys):
    sizes = [len(c["sentences"]) for c in run["anchors"]]
    assert min(sizes) < 100 == max(sizes)                      # some classes padded (85..280 sentences, M = 100)
    answers = predict_json(run, capsys, "--top", "100", "--sentences", "100")   # every class, every anchor listed
    for a in answers:
        assert sorted(t["class"] for t in a["top"]) == list(range(100))
        for t in a["top"]:
            listed = [x["sentence"] for x in t["anchors"]]
            assert len(listed) == sizes[t["class"]]               # the real anchors, no padded slot
            assert sorted(listed) == sorted(run["anchors"][t["class"]]["sentences"])
            weights = np.array([x["A"] for x in t["anchors"]])
            assert weights.sum() == pytest.approx(1.0, abs=1e-5) and (np.diff(weights) <= 0).all()


def test_text_output_lists_each_class_with_its_anchors_below(run, capsys):
    predict.main([str(run["png"]), "--run", str(run["out"]), "--device", "cpu", "--top", "2", "--sentences", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(run["png"]) and len(lines) == 1 + 2 * (1 + 1)
    assert lines[1].startswith("  1. ") and " P^I " in lines[1] and lines[2].startswith("       A ")


@pytest.mark.parametrize("case", ["missing image", "not an image", "directory", "run without lgr.pt"])
def test_bad_input_is_one_line(run, tmp_path, capsys, case):
    (tmp_path / "notes.jpg").write_text("not an image")
    image, folder = {"missing image": (tmp_path / "nope.png", run["out"]),
                     "not an image": (tmp_path / "notes.jpg", run["out"]),
                     "directory": (tmp_path, run["out"]),
                     "run without lgr.pt": (run["png"], tmp_path)}[case]
    with pytest.raises(SystemExit) as e:
        predict.main([str(image), "--run", str(folder), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert ("lgr.pt" in err) if case == "run without lgr.pt" else (str(image) in err)
