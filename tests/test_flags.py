"""Every number a flag takes is checked when the command line is read (util/flags.py): one line naming the flag, the
value and the range, exit status 2, before any work. The walk below goes over the parser of every script and tool and
tries each numeric flag with values outside its range, so that a flag added later without a range, or with another
range than the one written here, fails the suite until both are given."""
import argparse
import math
import re
from unittest import mock

import pytest

import anss
import cvlp
import data
import evaluate
import lgr
import predict
from tools import bench, bench_heads, experiments, gpu_check, rehearse, status, time_demo
from util import flags

# Each range as a person states it: values outside it, one value at its edge (accepted, parsed to `edge`), and the
# words the error line must hold.
RULES = {
    "count":         {"bad": ["0", "-5", "2.5", "many"], "edge": ("1", 1), "says": "an integer >= 1"},
    "count or zero": {"bad": ["-1", "0.5"], "edge": ("0", 0), "says": "an integer >= 0"},
    "positive":      {"bad": ["0", "-1", "nan", "inf", "fast"], "edge": ("1e-9", 1e-9), "says": "a number > 0"},
    "non-negative":  {"bad": ["-1e-9", "-1", "nan", "inf"], "edge": ("0", 0.0), "says": "a number >= 0"},
    "unit interval": {"bad": ["-0.1", "1.5", "2", "nan"], "edge": ("1", 1.0), "says": "a number in [0, 1]"},
    "seed":          {"bad": ["-1", "4294967296"], "edge": ("4294967295", 4294967295),
                      "says": "an integer in [0, 4294967295]"},
    "share":         {"bad": ["0", "-0.5", "1.01"], "edge": ("1", 1.0), "says": "a number in (0, 1]"},
}
# The range of every numeric flag of every script, written out by hand. A flag that is not here fails the walk.
RANGES = {
    "--epochs": "count", "--batch": "count", "--accum": "count", "--M": "count", "--knn-k": "count",
    "--images-per-class": "count", "--chunk": "count", "--top": "count", "--demo-images": "count",
    "--image-size": "count", "--steps": "count", "--classes": "count", "--threads": "count",
    "--loader-batches": "count", "--decode-images": "count", "--anss-sentences": "count", "--anss-images": "count",
    "--head-batch": "count", "--repeat": "count",
    "--workers": "count or zero", "--stop-after-steps": "count or zero", "--sentences": "count or zero",
    "--lr": "positive", "--tau": "positive", "--budget": "positive",
    "--wd": "non-negative", "--warmup": "non-negative", "--min-lr": "non-negative", "--save-every": "non-negative", "--clip-grad": "non-negative",
    "--timeout": "non-negative",
    "--lam": "unit interval",
    "--seed": "seed", "--seeds": "seed",
    "--fraction": "share",
}
# Where one name means another thing: bench.py's --warmup counts untimed steps.
RANGES_OF = {("tools.bench", "--warmup"): "count or zero", ("tools.bench_heads", "--warmup"): "count or zero"}
CHOICES = {"--imbalance": ["7", "0", "-100"]}                   # a closed list (100, 50, 10) is a range too

# Every script and tool that reads a command line, with what its parser needs before a flag (positional arguments).
SCRIPTS = {"cvlp.py": (cvlp.get_args, []), "anss.py": (anss.get_args, []), "lgr.py": (lgr.get_args, []),
           "evaluate.py": (evaluate.get_args, []), "predict.py": (predict.get_args, []), "data.py": (data.get_args, []),
           "tools.bench": (bench.get_args, []), "tools.bench_heads": (bench_heads.get_args, []),
           "tools.experiments table": (experiments.get_args, ["table"]),
           "tools.experiments curves": (experiments.get_args, ["curves", "runs/a"]),
           "tools.experiments regroup": (experiments.get_args, ["regroup", "a.json"]),
           "tools.gpu_check": (gpu_check.get_args, ["out"]), "tools.rehearse": (rehearse.get_args, ["imagenet_lt"]),
           "tools.status": (status.get_args, []), "tools.time_demo": (time_demo.get_args, ["HEAD"])}


class Caught(Exception):
    pass


def parser_of(get_args):
    """The parser a script's get_args builds, caught as it starts to parse (before any default is filled in)."""
    def catch(self, *args, **kwargs):
        raise Caught(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            get_args([])
        except Caught as e:
            return e.args[0]
    raise AssertionError(f"{get_args.__module__}.get_args never parsed")


def actions(script):
    """(parser, its positional prefix, action) of every optional flag the script's command line takes."""
    get_args, prefix = SCRIPTS[script]
    parser = parser_of(get_args)
    if prefix and parser._subparsers is not None:                # experiments: the subcommand's own parser
        parser = parser._subparsers._group_actions[0].choices[prefix[0]]
        prefix = prefix[1:]
    return [(parser, prefix, a) for a in parser._actions if a.option_strings and not isinstance(
        a, (argparse._HelpAction, argparse._StoreTrueAction, argparse.BooleanOptionalAction))]


def numeric(action):
    """Whether a flag takes a number: a numeric type, or, without one, a numeric default (read as text: unchecked)."""
    if action.type in (int, float) or isinstance(action.type, flags.Range):
        return True
    return action.type is None and isinstance(action.default, (int, float)) and not isinstance(action.default, bool)


def refused(parser, argv, capsys):
    """The one error line and exit status of parsing argv. A flag is given its value as --flag=VALUE: argparse reads
    a lone "-1e-9" as another flag (written "--wd -1e-9" it is refused as a flag without its value, also one line)."""
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err                           # one line, no usage block, no traceback
    return e.value.code, err.strip()


WALK = [(script, a.option_strings[0]) for script in SCRIPTS for _, _, a in actions(script) if numeric(a)]


@pytest.mark.parametrize("script, name", WALK, ids=[f"{s} {n}" for s, n in WALK])
def test_every_numeric_flag_refuses_values_outside_its_range_in_one_line(script, name, capsys):
    parser, prefix, action = next(x for x in actions(script) if x[2].option_strings[0] == name)
    if action.choices is not None and name in CHOICES:
        for value in CHOICES[name]:
            code, line = refused(parser, prefix + [f"{name}={value}"], capsys)
            assert code == 2 and re.match(rf"error: argument {name}: invalid choice: '?{value}'? \(choose from 100, "
                                          rf"50, 10\)$", line), line
        return
    assert action.type not in (int, float, None), f"{script} {name}: a number without a range (use a util/flags type)"
    rule = RANGES_OF.get((script.split()[0], name), RANGES.get(name))
    assert rule, f"{script} {name}: its range is not written in tests/test_flags.py RANGES"
    for value in RULES[rule]["bad"]:
        code, line = refused(parser, prefix + [f"{name}={value}"], capsys)
        assert code == 2 and line.startswith(f"error: argument {name}: ") and value in line, line
        assert line.endswith(RULES[rule]["says"]), line
    text, number = RULES[rule]["edge"]                           # the edge of the range is inside it
    parsed = getattr(parser.parse_args(prefix + [name, text]), action.dest)
    assert parsed == (number if action.nargs is None else [number])


def test_the_walk_reaches_every_script_and_the_flags_of_each_stage():
    names = {(s.split()[0], n) for s, n in WALK}
    for script, flag in [("cvlp.py", "--batch"), ("cvlp.py", "--lam"), ("cvlp.py", "--tau"), ("cvlp.py", "--lr"),
                         ("cvlp.py", "--wd"), ("cvlp.py", "--workers"), ("cvlp.py", "--image-size"),
                         ("cvlp.py", "--accum"), ("cvlp.py", "--save-every"), ("cvlp.py", "--clip-grad"),
                         ("cvlp.py", "--stop-after-steps"), ("lgr.py", "--tau"), ("anss.py", "--M"),
                         ("evaluate.py", "--knn-k"), ("predict.py", "--top"), ("data.py", "--seed"),
                         ("tools.bench", "--steps"), ("tools.rehearse", "--fraction"), ("tools.gpu_check", "--budget"),
                         ("tools.experiments", "--seeds"), ("tools.experiments", "--knn-k")]:
        assert (script, flag) in names, (script, flag)
    assert len(WALK) >= 80                                       # 80 when this was written


def test_the_walk_catches_a_numeric_flag_declared_without_a_range():
    p = flags.Parser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ratio", default=0.5)                       # no type at all: read as text
    p.add_argument("--name", default="x")
    found = [a.option_strings[0] for a in p._actions if a.option_strings and numeric(a)]
    assert found == ["--steps", "--ratio"]


@pytest.mark.parametrize("argv, says", [
    (["--image-size", "30"], "error: --image-size 30 does not fit --backbone shapes-tiny: it takes multiples of 8 "
                             "(e.g. 24 or 32)"),
    (["--data", "imagenet_lt", "--image-size", "200"], "error: --image-size 200 does not fit --backbone RN50: it "
                                                       "takes multiples of 32 (e.g. 192 or 224)"),
    (["--data", "imagenet_lt", "--backbone", "ViT-B-16", "--image-size", "200"],
     "error: --image-size 200 does not fit --backbone ViT-B-16: it takes multiples of 16 (e.g. 192 or 208)"),
    (["--image-size", "0"], "error: argument --image-size: 0 is out of range: an integer >= 1")])
def test_an_image_size_the_backbone_cannot_take_is_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        cvlp.get_args(argv)
    assert e.value.code == 2 and capsys.readouterr().err == says + "\n"
    assert cvlp.get_args(["--data", "imagenet_lt", "--image-size", "384"]).image_size == 384   # 12 x 32


def test_only_none_means_the_default_and_every_given_value_is_kept():
    args = cvlp.get_args(["--data", "imagenet_lt"])
    assert (args.epochs, args.lr, args.batch, args.image_size) == (50, 5e-5, 256, 224)     # Sec. 4.3
    ns = argparse.Namespace(data="imagenet_lt", imbalance=None, backbone=None, pretrained=None, image_size=None,
                            data_root=None, workers=0, out=None, epochs=1, lr=0.0, batch=None, warmup=0.0, min_lr=None)
    filled = data.fill_defaults(ns, "cvlp")
    assert (filled.epochs, filled.lr, filled.batch, filled.workers) == (1, 0.0, 256, 0)   # 0.0 stays 0.0
    assert (filled.warmup, filled.min_lr) == (0.0, 0.0)               # 0 warm-up epochs kept, not CVLP's 5
    assert lgr.get_args(["--data", "imagenet_lt", "--init", "clip", "--head", "fc"]).epochs == 100   # Sec. 4.3
    assert lgr.get_args(["--data", "imagenet_lt", "--init", "clip", "--head", "fc", "--epochs", "3"]).epochs == 3


def test_a_bad_flag_of_any_kind_is_one_error_line_without_the_usage_block(capsys):
    for argv in (["--no-such-flag"], ["--text", "poetry"], ["--batch"]):
        code, line = refused(parser_of(cvlp.get_args), argv, capsys)
        assert code == 2 and line.startswith("error: ") and "usage" not in line


@pytest.mark.parametrize("rng, text, bad", [(flags.count, "an integer >= 1", "0"),
                                            (flags.positive, "a number > 0", "0"),
                                            (flags.Range(float, 0, 1, lo_open=True), "a number in (0, 1]", "1.5"),
                                            (flags.Range(int, hi=9, hi_open=True), "an integer < 9", "9"),
                                            (flags.seed, "an integer in [0, 4294967295]", "-1")])
def test_a_range_reads_as_it_is_written(rng, text, bad):
    assert str(rng) == text
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(bad)} is out of range: {re.escape(text)}$"):
        rng(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        rng("1e999")                                             # int: not an integer; float: infinite
    assert not flags.positive.contains(math.nan) and flags.non_negative.contains(0.0)
