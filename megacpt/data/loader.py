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

`microbatch_samples` is the order rule in one place: the sampler uses it for the stream and
`split_global_batch` for a global batch already in memory (tests, benchmarks).

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


def microbatch_samples(k: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       start: int = 0) -> range:
    """Global samples of dp rank `dp_rank`'s k-th micro-batch counted from sample `start`:
    `[start + (k dp + r) mbs, start + (k dp + r + 1) mbs)` (see the module doc)."""
    first = start + (k * dp_size + dp_rank) * micro_batch_size
    return range(first, first + micro_batch_size)


def split_global_batch(tokens: torch.Tensor, labels: torch.Tensor, micro_batch_size: int,
                       ctx, loss_mask: torch.Tensor | None = None, device=None) -> list[dict]:
    """This dp rank's micro-batches (ctx.dp_rank of ctx.dp) of a global batch in memory.

    tokens/labels (and loss_mask) `[G, s]` are samples 0..G-1 of the rule above; returns dicts
    with "tokens", "labels" (and "loss_mask") of `[mbs, s]`, moved to `device` (default
    ctx.device).
    """
    g = tokens.shape[0]
    if labels.shape != tokens.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} differs from tokens shape "
                         f"{tuple(tokens.shape)}")
    if g % (micro_batch_size * ctx.dp):
        raise ValueError(f"global batch of {g} samples is not divisible by micro-batch size "
                         f"{micro_batch_size} x data-parallel size {ctx.dp}; change "
                         f"--global-batch-size or --micro-batch-size")
    device = ctx.device if device is None else device
    out = []
    for k in range(g // (micro_batch_size * ctx.dp)):
        rows = microbatch_samples(k, micro_batch_size, ctx.dp_rank, ctx.dp)
        rows = slice(rows.start, rows.stop)
        mb = {"tokens": tokens[rows].to(device), "labels": labels[rows].to(device)}
        if loss_mask is not None:
            mb["loss_mask"] = loss_mask[rows].to(device)
        out.append(mb)
    return out


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
            yield list(microbatch_samples(k, self.mbs, self.rank, self.group // self.mbs,
                                          self.consumed))


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
