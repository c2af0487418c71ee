"""tools/time_demo.py on a small repository the test writes: its README's first command, two commits, each stage run
in a fresh clone and timed."""
import re
import subprocess

import pytest

from tools import time_demo
from util.errors import DataError


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """Two commits: the first's command sleeps 0.3 s in its first stage, the second's does not; each stage writes
    what it saw into the clone, and the last prints a table line."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    (r / "a.py").write_text("import os, time, sys\ntime.sleep(float(sys.argv[1]))\n"
                            "open('a.txt', 'w').write(os.environ['VL_LTR_CACHE'])\n")
    (r / "b.py").write_text("print('VL-LTR (LGR)   70.6'); print(open('a.txt').read())\n")
    for pause, message in (("0.3", "slow"), ("0", "fast")):
        (r / "README.md").write_text("# demo\n\n```bash\npip install -r requirements.txt && python a.py "
                                     f"{pause} && python b.py\npytest\n```\n")
        git(r, "add", "-A")
        git(r, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return r


def test_first_command_is_the_readme_line_after_its_install():
    readme = "text\npip install -r requirements.txt && python cvlp.py && python lgr.py --init clip --head fc\npytest\n"
    assert time_demo.first_command(readme) == ["python cvlp.py", "python lgr.py --init clip --head fc"]
    with pytest.raises(DataError, match="no first command"):
        time_demo.first_command("pip install torch\n")


def test_each_commit_runs_in_a_fresh_clone_and_is_timed_stage_by_stage(repo, capsys):
    time_demo.run(time_demo.get_args(["HEAD~1", "HEAD", "--repeat", "1", "--repo", str(repo)]))
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("HEAD") and "mean" in line}
    slow, fast = (float(lines[c].split("mean ")[1].split(" s")[0]) for c in ("HEAD~1:", "HEAD:"))
    assert slow > fast + 0.25                                    # the first commit's 0.3 s sleep, in its own stage
    assert re.search(r"^  python a\.py 0\.3 +[0-9.]+$", out, re.M) and re.search(r"^  python a\.py 0 +[0-9.]+$", out, re.M)
    assert out.count("VL-LTR (LGR)   70.6") == 2                 # what each run's last stage printed
    assert ".token_cache" in out                                  # each clone with a cache of its own, empty


def test_a_failing_stage_names_itself_and_its_clone(repo):
    (repo / "README.md").write_text("pip install -r requirements.txt && python missing.py\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "broken")
    with pytest.raises(DataError, match=r"'python missing.py' in .* exited 2"):
        time_demo.run(time_demo.get_args(["HEAD", "--repeat", "1", "--repo", str(repo)]))
