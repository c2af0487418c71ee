"""The machinery the five stage scripts share, one concern per file: how a stage runs, checkpoints and the training
loop (engine), the kinds of error (errors), files written whole (files), what each file of a run folder was made
from and when a checkpoint may be replaced (run_folder), the command-line flags and their ranges (flags), progress
lines (progress), a run's records (records), resumable sampling (resumable_sampler), torchrun (distributed), CLIP
models, weights and text encoding (clip_models), image reading and augmentation (images), the official datasets'
files (readers), your own image folders and CIFAR-100 (own_data), and the embedded shapes_lt world (shapes_lt).
None of it is in the paper's equations; the stage scripts are."""
