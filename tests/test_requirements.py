"""requirements.txt names every third-party package the project imports, anywhere (imports inside functions too), so
that `pip install -r requirements.txt` on a new machine is all a user needs."""
import ast
import glob
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {"util", "tools", "tests"} | {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def project_files():
    return sorted(p for folder in ("", "util", "tools", "tests") for p in glob.glob(os.path.join(ROOT, folder, "*.py")))


def imported_modules(path):
    """[(top-level module, line)] of every absolute import in the file, at any depth."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def required(path=os.path.join(ROOT, "requirements.txt")):
    """The distribution names requirements.txt lists, normalised."""
    with open(path) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return {normalise(re.split(r"[<>=!~;\[ ]", line)[0]) for line in lines if line}


def missing_requirements(requirements):
    """["file:line: module (distribution)"] for each third-party import whose distribution is not in requirements."""
    distributions = importlib.metadata.packages_distributions()          # module -> [distributions providing it]
    missing = []
    for path in project_files():
        for module, line in imported_modules(path):
            if module in sys.stdlib_module_names or module in FIRST_PARTY:
                continue
            dists = distributions.get(module)
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if not dists:
                missing.append(f"{where}: {module} (no installed distribution provides it)")
            elif not {normalise(d) for d in dists} & requirements:
                missing.append(f"{where}: {module} ({dists[0]})")
    return sorted(missing, key=lambda m: (m.split(":")[0], int(m.split(":")[1])))


def test_every_imported_package_is_in_requirements_txt():
    missing = missing_requirements(required())
    assert not missing, "imported but not in requirements.txt:\n" + "\n".join(missing)


def test_the_check_names_the_file_and_line_of_an_import_whose_package_is_not_listed():
    without_numpy = required() - {"numpy"}
    missing = missing_requirements(without_numpy)
    assert any(re.fullmatch(r"data\.py:\d+: numpy \(numpy\)", m) for m in missing), missing
    assert all("numpy" in m for m in missing)                          # nothing else is reported
