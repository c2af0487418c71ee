"""Tools around the method, run from the repository root as modules: `python -m tools.bench` (speed of each code
path), `python -m tools.rehearse DATA` (every stage at a dataset's full size), `python -m tools.experiments` (the
results tables over seeds, learning curves), `python -m tools.gpu_check OUT` (every GPU measurement in one run),
`python -m tools.status` (the state of run folders at a glance)."""
