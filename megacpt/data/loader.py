"""torch DataLoader over a (blended) sample stream, split across data-parallel ranks.

The only torch-facing module of `megacpt.data` (imported by the trainer, never by the
preprocessing tools).

Order rule: the dataset is one global stream of samples 0, 1, 2, ... Starting at
`consumed_samples`, it is cut into groups of `micro_batch_size * dp_size` consecutive
samples; within a group, data-parallel rank r takes the contiguous chunk
[r * micro_batch_size, (r + 1) * micro_batch_size). So global sample i goes to rank
`((i - consumed_samples) // micro_batch_size) % dp_size`, and every group of
`global_batch_size = micro_batch_size * dp_size * accumulation_steps` samples is consumed
in full by each optimizer step whatever the dp layout (Megatron's pretraining sampler). A
trailing partial group is dropped. `consumed_samples` must be a multiple of the group size.

Batches: {"tokens": LongTensor[b, s], "labels": LongTensor[b, s], "dataset": list[str]}
(the member dataset of each sample for blends, else the dataset's `name`).

Position tracking: before yielding a micro-batch, the loader tells the dataset the global
number of samples consumed once that micro-batch's group is done
(`dataset.set_consumed_samples(n)`, if the dataset has it), so `BlendedDataset.state_dict()`
is right at every optimizer-step boundary on every rank.

Signals and randomness: worker processes ignore SIGTERM, SIGUSR1 and SIGINT (a signal sent to
the process group must reach only the trainer, which saves and stops; a killed worker would
end it with a traceback instead), and the loader draws its workers' base seed from its own
generator, never from the global torch RNG, so building a loader (e.g. the first validation
after a resume) leaves the training RNG streams exactly where an uninterrupted run has them.
"""
from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class DataParallelBatchSampler(Sampler):
    """Index lists of one dp rank's micro-batches, in stream order (see module doc)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"loader: need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, "
                             f"got {micro_batch_size}, {dp_rank}, {dp_size}")
        self.group = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % self.group:
            raise ValueError(f"loader: consumed_samples {consumed_samples} must be a "
                             f"non-negative multiple of micro_batch_size * dp_size = "
                             f"{self.group}")
        self.total, self.consumed = int(total_samples), int(consumed_samples)
        self.mbs, self.rank = micro_batch_size, dp_rank

    def __len__(self) -> int:
        return max(self.total - self.consumed, 0) // self.group

    def __iter__(self):
        for k in range(len(self)):
            first = self.consumed + k * self.group + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 - worker_init_fn
    """DataLoader `worker_init_fn`: only the main process reacts to stop signals."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class _Collate:
    def __init__(self, default_name: str):
        self.default_name = default_name

    def __call__(self, samples: list[dict]) -> dict:
        tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False)
        labels = np.stack([s["labels"] for s in samples]).astype(np.int64, copy=False)
        return {"tokens": torch.from_numpy(tokens),  # [b, s]
                "labels": torch.from_numpy(labels),  # [b, s]
                "dataset": [s.get("dataset", self.default_name) for s in samples]}


class DataParallelLoader:
    """Iterable of micro-batches for one dp rank; re-iterating starts over at the same point."""

    def __init__(self, dataset, loader: DataLoader, sampler: DataParallelBatchSampler):
        self.dataset, self.loader, self.sampler = dataset, loader, sampler
        self.consumed_samples = sampler.consumed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        report = getattr(self.dataset, "set_consumed_samples", None)
        for k, batch in enumerate(self.loader):
            self.consumed_samples = self.sampler.consumed + (k + 1) * self.sampler.group
            if report is not None:
                report(self.consumed_samples)
            yield batch


def build_loader(dataset, micro_batch_size: int, consumed_samples: int, dp_rank: int,
                 dp_size: int, num_workers: int, *, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None) -> DataParallelLoader:
    """Loader of this dp rank's micro-batches from global sample `consumed_samples` on."""
    sampler = DataParallelBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                       dp_rank, dp_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor or 4
        kwargs["worker_init_fn"] = ignore_stop_signals
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=_Collate(getattr(dataset, "name", "")),
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                        **kwargs)
    return DataParallelLoader(dataset, loader, sampler)
