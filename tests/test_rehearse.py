"""rehearse.py: the generated trees are read by data.load_data with the sizes and corpus statistics asked for."""
import json

import numpy as np
import pytest

import data
from tools import rehearsal_tree, rehearse


@pytest.mark.parametrize("name", ["imagenet_lt", "places_lt", "inat2018"])
def test_full_size_train_counts_match_the_real_dataset(name):
    s = rehearse.SIZES[name]
    n = rehearsal_tree.train_counts(s["classes"], s["train"], s["n_max"], s["n_min"], s["shots"])
    assert len(n) == s["classes"] and n.sum() == s["train"]               # e.g. 1000 classes, 115,846 images
    assert (n[0], n[-1]) == (s["n_max"], s["n_min"])                      # 1280 .. 5
    assert (np.diff(n) <= 0).all()                                        # head to tail
    split = data.shot_split(n)
    assert [(split == k).sum() for k in ("many", "medium", "few")] == list(s["shots"])   # 385 / 479 / 136


@pytest.mark.parametrize("name", ["imagenet_lt", "places_lt", "inat2018"])
def test_tiny_tree_is_read_by_load_data(name, tmp_path):
    args = rehearse.get_args([name, "--fraction", "0.002", "--root", str(tmp_path / name)])
    tree = rehearse.ensure_tree(args)
    s = rehearse.SIZES[name]
    C = max(10, round(s["classes"] * 0.002))                              # ImageNet-LT: 2 -> at least 10
    d = data.load_data(name, str(tmp_path / name))
    assert d.num_classes == tree["classes"] == C
    assert len(d.train.labels) == round(s["train"] * C / s["classes"])   # the real images per class
    assert len(d.val.labels) == s["val"] * C
    assert len(d.test.labels) == (s["test"] or s["val"]) * C              # iNat: val is the test set
    assert np.bincount(d.train.labels, minlength=C).min() >= 1
    # parse_wiki finds exactly the sentences written: the "See also" and "References" lines are dropped
    found = np.array([src.count("description") for src in d.corpus.source])
    m_min, m_max, m_mean, m_med = s["sentences"]
    assert (found.min(), found.max()) == (m_min, m_max)                   # Table 7's extremes, e.g. 1 and 721
    assert abs(np.median(found) - m_med) <= 0.25 * m_med
    assert m_mean / 2 < found.mean() < 6 * m_mean                        # ten classes: the max weighs heavily
    assert tree["sentences"]["median"] == np.median(found)
    assert rehearse.ensure_tree(args)["cached"]                           # a second call reuses the tree


def test_sentence_counts_follow_table_7_at_full_size():
    m = rehearsal_tree.sentence_counts(1000, 1, 721, 127, 89, np.random.default_rng(0))   # ImageNet-LT
    assert (m.min(), m.max(), np.median(m)) == (1, 721, 89)
    assert abs(m.mean() - 127) < 5                                        # 125.3: the clip at 721 trims the top


def test_a_tree_is_written_again_only_when_it_is_stale(tmp_path):
    root = tmp_path / "places_lt"
    args = rehearse.get_args(["places_lt", "--fraction", "0.002", "--root", str(root)])
    rehearse.ensure_tree(args)
    marker = json.loads((root / "tree.json").read_text())
    (root / "tree.json").write_text(json.dumps({**marker, "version": rehearse.TREE_VERSION - 1}))
    tree = rehearse.ensure_tree(args)                                     # an older generator's tree: written again
    assert not tree["cached"] and json.loads((root / "tree.json").read_text())["version"] == rehearse.TREE_VERSION
    other = rehearse.get_args(["places_lt", "--fraction", "0.003", "--root", str(root)])
    with pytest.raises(SystemExit, match=r"holds another tree .*'fraction': 0\.002.*; pass --regenerate or --root"):
        rehearse.ensure_tree(other)                                       # another size: never deleted silently
