"""The order of a training epoch's samples as a resumed run and torchrun's ranks need it: ResumableSampler wraps
the epoch's sampler (data.make_sampler's square-root or instance sampling), so that a resumed epoch starts where the
stopped one was (engine.Training sets `skip`) and each rank takes its share of every global batch."""
import itertools

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler so that an epoch can start part-way through, for exact resume: the first `skip`
    indices of the epoch's draw are consumed without loading their images. The caller restores the
    draw's random state and sets `skip`; the training loop resets it to 0 after that epoch.
    torchrun (world_size N > 1): every rank draws the same global stream (same seed) and takes its share of
    each global batch of N * batch indices, rank r the r-th run of `batch`, so the N ranks' batches, in rank
    order, are one process's batch of N * batch; an incomplete last global batch is dropped."""

    def __init__(self, sampler, batch=1, rank=0, world_size=1):
        self.sampler, self.skip = sampler, 0
        self.batch, self.rank, self.world_size = batch, rank, world_size

    def __len__(self):
        if self.world_size > 1:                                  # torchrun
            return (len(self.sampler) - self.skip) // (self.batch * self.world_size) * self.batch
        return len(self.sampler) - self.skip

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it)
        if self.world_size == 1:
            yield from it
            return
        for _ in range(len(self) // self.batch):                 # torchrun: this rank's share of each global batch
            global_batch = list(itertools.islice(it, self.batch * self.world_size))
            yield from global_batch[self.rank * self.batch:(self.rank + 1) * self.batch]
