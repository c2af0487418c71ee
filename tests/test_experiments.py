"""tools/experiments.py: the results tables over seeds, regrouped by the paper's shot splits, with numbers worked out by
hand."""
import pytest

from util.errors import DataError
from tools.experiments import TABLE4, TABLE8, mean_std, regroup, table_markdown


def test_regroup_recomputes_the_shot_columns_from_per_class_accuracies_with_the_papers_boundaries():
    # Five classes with 150 / 100 / 50 / 20 / 10 training images and the same number of test images each
    # (balanced): per-class top-1 90 / 80 / 60 / 40 / 10, overall (90 + 80 + 60 + 40 + 10) / 5 = 56.
    # Stored under > 100 / < 20: many 90, medium (80 + 60 + 40) / 3 = 60, few 10. The paper's >= 100 / <= 20:
    # many (90 + 80) / 2 = 85, medium 60, few (40 + 10) / 2 = 25.
    stored = {"overall": 56.0, "many": 90.0, "medium": 60.0, "few": 10.0, "per_class": [90.0, 80.0, 60.0, 40.0, 10.0]}
    methods = [(folder, method) for _, folder, method in TABLE8] + [(folder, method) for _, folder, method, _ in TABLE4]
    methods += [("full", f"VL-LTR (LGR): {b} only") for b in ("P^I", "P^T")]
    results = {}
    for folder, method in methods:
        results.setdefault(folder, {})[method] = dict(stored)
    report = {"data": "shapes_lt", "per_seed": {0: {"train_counts": [150, 100, 50, 20, 10], "results": results}}}
    new = regroup(report)
    r = new["per_seed"][0]["results"]["full"]["VL-LTR (LGR)"]
    assert (r["overall"], r["many"], r["medium"], r["few"]) == pytest.approx((56.0, 85.0, 60.0, 25.0))
    assert new["table8"]["VL-LTR"]["few"] == pytest.approx({"mean": 25.0, "std": 0.0})
    assert new["table4"]["#1 full VL-LTR"]["many"]["mean"] == pytest.approx(85.0)
    assert new["table4"]["#1 full VL-LTR"]["paper"] == 70.1
    assert new["shot_split"].startswith("many >= 100, few <= 20")
    # An overall that is not the mean of the per-class accuracies: the test split was not balanced.
    results["full"]["VL-LTR (LGR)"]["overall"] = 60.0
    with pytest.raises(DataError, match="not the mean of its per-class accuracies .*the test split is not balanced"):
        regroup(report)


def test_table_cells_are_mean_and_sample_std_over_seeds():
    assert mean_std([70.0, 72.0, 74.0]) == pytest.approx((72.0, 2.0))        # std: sqrt((4 + 0 + 4) / 2)
    assert mean_std([65.5]) == (65.5, 0.0)
    cell = {k: {"mean": 72.0, "std": 2.0} for k in ("overall", "many", "medium", "few")}
    report = {"data": "shapes_lt", "split": "test", "seeds": [0, 1, 2], "device": "cpu", "torch": "2", "date": "d",
              "epochs": {"cvlp": 10, "lgr": 20, "baseline": 30}, "wall_seconds": 60.0, "table8": {"VL-LTR": cell},
              "table4": {"#1 full VL-LTR": {**cell, "paper": 70.1}}, "branches": {"P^T": cell},
              "anss_precision": {"AnSS, M = 64 from the descriptions alone": {"mean": 0.75, "std": 0.05}}}
    md = table_markdown(report)
    assert "| VL-LTR | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 |" in md
    assert "| #1 full VL-LTR | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 72.0 ± 2.0 | 70.1 |" in md
    assert "| AnSS, M = 64 from the descriptions alone | 75.0% ± 5.0 |" in md
