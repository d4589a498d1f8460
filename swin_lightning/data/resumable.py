"""Exact mid-epoch resume of the training data: :class:`ResumableSampler` and
:class:`ResumableDataLoader` make the training order a function of (seed, epoch) and can start
an epoch part-way (the loader's position travels in the checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Training order shuffled by (seed, epoch), sharded over ranks, startable part-way.

    A ``DistributedSampler`` even on one device: Lightning calls its ``set_epoch`` every epoch
    and keeps it under DDP (it only injects its own sampler into loaders without one), so the
    order depends on the seed and the epoch alone, never on the global random state.
    ``skip`` drops that many indices from the next epoch's start (set by the loader on resume).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in checkpoints.

    Lightning stores ``state_dict()`` of a stateful training loader in the checkpoint and hands
    it to ``load_state_dict`` on resume. A resumed epoch then skips the batches already trained
    on (skipping indices, loading nothing) and continues with the same order. Iteration starts
    lazily, after Lightning has called ``set_epoch``, and worker seeds derive from (seed, epoch).
    With ``num_workers > 0`` random augmentations of a resumed epoch differ (each worker's
    random stream depends on the batches it has seen), the order does not.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = int(getattr(sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume["epoch"] == epoch and hasattr(sampler, "skip"):
            skip = resume["batches"]
            sampler.skip = skip * self.batch_size
        if self.generator is not None:
            seed = int(getattr(sampler, "seed", 0))
            self.generator.manual_seed((seed + 1) * 1_000_003 + epoch)
        self._epoch, self._batches = epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
