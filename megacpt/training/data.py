"""The loop's view of the data: the training blend, fixed validation batches, mock data.

Built on `megacpt.data` (`build_train_valid_datasets`, `BlendedDataset`, `build_loader`):
`--data-path` words name the blend (`0.7 zh=PREFIX 0.3 en=PREFIX`; a bare prefix is named by
its base name without `_text_document`), samples are Megatron's GPT samples of each prefix's
train split, and the blend assigns global samples to datasets with exact ratios. Each dp rank
reads only its own micro-batches (the loader's order rule `microbatch_samples`, which
`split_global_batch` shares: micro-step m of a step gives dp rank r the
samples [(m dp + r) mbs, (m dp + r + 1) mbs) of the global batch).

State (`TrainData.state_dict()`, stored in the checkpoint's meta.json as `state["data"]`) is
the blend's state dict (`megacpt.data.blend`): global samples consumed, samples consumed per
dataset, and the current blend segment. Resuming with different `--data-path` weights starts
a new segment in which every dataset continues exactly where it stopped.

Validation: each named set (`--valid-data-path NAME=PREFIX`, else the valid split of each
training prefix) is read in document order, unshuffled; every evaluation uses its first
`eval_iters x micro_batch_size` samples, so every model, layout and step sees the same text.

Mock data (`--mock-data`, tests and benchmarks): dataset `d` is a random walk over the
vocabulary whose steps are one of four dataset-specific offsets, so it is learnable (loss
floor log 4) and different datasets behave like different languages. Sample `i` depends only
on (seed, name, i). A mock blend takes its names and weights from the `--data-path` words
(`0.7 zh 0.3 en`, no files needed); each mock dataset also gets a held-out validation set
under its name.
"""
from __future__ import annotations

import logging
import os
import zlib

import numpy as np
import torch
import torch.distributed as dist

from megacpt.config import Config, ConfigError
from megacpt.parallel.context import ParallelContext

log = logging.getLogger("megacpt.train")


def train_prefixes(cfg: Config) -> list[tuple[str, float, str]]:
    """The training blend's (name, normalised weight, prefix) entries."""
    from megacpt.data.blend import parse_named_data_path

    try:
        return parse_named_data_path(cfg.data.data_path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def mock_entries(cfg: Config) -> dict[str, float]:
    """{name: weight} of a mock blend: `--data-path` words without files, or one 'mock' set."""
    words = cfg.data.data_path
    if not words:
        return {"mock": 1.0}
    pairs = len(words) % 2 == 0 and all(_is_number(w) for w in words[::2])
    weights = {n: float(w) for w, n in zip(words[::2], words[1::2])} if pairs else \
        {w: 1.0 for w in words}
    if len(weights) != (len(words) // 2 if pairs else len(words)) or \
            any(_is_number(n) for n in weights) or min(weights.values()) < 0 or \
            sum(weights.values()) <= 0:
        raise ConfigError(f"--data-path with --mock-data: expected distinct names with "
                          f"weights (0.7 zh 0.3 en) or names alone, got {words}")
    total = sum(weights.values())
    return {n: w / total for n, w in weights.items()}


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


class MockSamples:
    """A learnable random-walk 'language' of `num_samples` samples (see the module docstring)."""

    STREAM_TRAIN, STREAM_VALID = 0, 1

    def __init__(self, name: str, vocab_size: int, seq_length: int, seed: int,
                 num_samples: int, stream: int = STREAM_TRAIN):
        self.name, self.vocab, self.seq, self.stream = name, vocab_size, seq_length, stream
        self.num_samples = int(num_samples)
        self.key = _name_seed(seed, name)
        rng = np.random.default_rng([self.key, 12345])
        self.offsets = rng.integers(1, max(vocab_size, 2), size=4)

    def __len__(self) -> int:
        return self.num_samples

    def text(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"mock dataset {self.name!r}: sample {i} of {self.num_samples}")
        rng = np.random.default_rng([self.key, self.stream, int(i)])
        start = rng.integers(self.vocab)
        steps = self.offsets[rng.integers(4, size=self.seq)]
        walk = np.concatenate(([start], start + np.cumsum(steps)))
        return (walk % self.vocab).astype(np.int64)  # [s + 1]

    def __getitem__(self, i: int) -> dict:
        text = self.text(int(i))
        return {"tokens": text[:-1], "labels": text[1:]}


def _build_mock(cfg: Config, eval_samples: int, data_state: dict | None):
    from megacpt.data.blend import BlendedDataset, required_samples

    t = cfg.training
    weights = mock_entries(cfg)
    size = t.train_iters * t.global_batch_size
    need = required_samples(weights, size, data_state)
    members = {n: MockSamples(n, cfg.model.vocab_size, cfg.model.seq_length, t.seed, need[n])
               for n in weights}
    valid = {n: MockSamples(n, cfg.model.vocab_size, cfg.model.seq_length, t.seed,
                            eval_samples, MockSamples.STREAM_VALID) for n in weights}
    return BlendedDataset(members, weights, size, state=data_state), valid


def _build_real(cfg: Config, eval_samples: int, data_state: dict | None, ctx: ParallelContext):
    from megacpt.data.build import build_train_valid_datasets

    t, d = cfg.training, cfg.data
    distributed = ctx.distributed and dist.is_initialized()
    return build_train_valid_datasets(
        d.data_path, d.split, d.valid_data_path or None, cfg.model.seq_length,
        train_samples=t.train_iters * t.global_batch_size, eval_samples=eval_samples,
        seed=t.seed, cache_dir=d.data_cache_path,
        rank_builds=int(os.environ.get("LOCAL_RANK", ctx.rank)) == 0 or not d.data_cache_path,
        barrier=dist.barrier if distributed else None, data_state=data_state)


class TrainData:
    """This rank's training micro-batches, fixed validation batches, and the data state."""

    def __init__(self, cfg: Config, opts, ctx: ParallelContext, data_state: dict | None = None):
        from megacpt.data.loader import build_loader

        t = cfg.training
        self.cfg, self.ctx = cfg, ctx
        self.seq, self.vocab, self.mock = cfg.model.seq_length, cfg.model.vocab_size, \
            bool(opts.mock_data)
        self.mbs, self.global_batch = t.micro_batch_size, t.global_batch_size
        self.num_micro = t.global_batch_size // (t.micro_batch_size * ctx.dp)
        if t.global_batch_size % (t.micro_batch_size * ctx.dp):
            raise ConfigError(f"--global-batch-size {t.global_batch_size} must be a multiple of "
                              f"--micro-batch-size {t.micro_batch_size} x data-parallel size "
                              f"{ctx.dp}")
        self.eval_samples = t.eval_iters * t.micro_batch_size
        if self.mock:
            self.train, self.valid = _build_mock(cfg, self.eval_samples, data_state)
            for name, prefix in cfg.data.valid_data_path.items():
                self.valid[name] = _real_valid(cfg, name, prefix, self.eval_samples)
        else:
            try:
                self.train, self.valid = _build_real(cfg, self.eval_samples, data_state, ctx)
            except ValueError as e:  # e.g. an empty train split; IndexedFormatError is one
                raise ConfigError(str(e)) from None
        #: dataset name -> prefix (error messages name the file)
        self.prefixes = {} if self.mock else {n: p for n, _, p in train_prefixes(cfg)}
        self.prefixes.update(cfg.data.valid_data_path)
        self.blend = dict(self.train.weights)
        self.target = cfg.data.target or next(iter(self.blend))
        if self.target not in self.blend and self.target not in self.valid:
            raise ConfigError(f"--target {self.target!r} is neither a dataset of the blend "
                              f"{list(self.blend)} nor a validation set {list(self.valid)}")
        self._check_valid(t.eval_iters)
        if ctx.rank == 0:
            log.info("%s training blend %s (target %s); validation sets %s",
                     "mock" if self.mock else "indexed", self.blend, self.target,
                     {n: len(v) for n, v in self.valid.items()})
        self.consumed_samples = int((data_state or {}).get("consumed_samples", 0))
        loader = build_loader(self.train, self.mbs, self.consumed_samples, ctx.dp_rank, ctx.dp,
                              cfg.data.num_workers)
        self._iter = iter(loader)
        self._valid_cache: dict[str, list[dict]] = {}

    def _check_valid(self, eval_iters: int) -> None:
        if self.valid and eval_iters % self.ctx.dp:
            raise ConfigError(f"--eval-iters {eval_iters} must be a multiple of the "
                              f"data-parallel size {self.ctx.dp} (validation micro-batches "
                              f"are shared out evenly over data-parallel ranks)")
        for name, ds in self.valid.items():
            if len(ds) < self.eval_samples:
                raise ConfigError(
                    f"validation set {name!r} holds {len(ds)} samples of {self.seq} tokens, "
                    f"fewer than --eval-iters x --micro-batch-size = {self.eval_samples}; "
                    f"lower --eval-iters or give a larger --valid-data-path set")

    @property
    def valid_names(self) -> list[str]:
        return list(self.valid)

    def _check_ids(self, tokens: torch.Tensor, labels: torch.Tensor, what: str,
                   names: list[str] | None = None) -> None:
        hi = int(torch.maximum(tokens.max(), labels.max()))
        lo = int(torch.minimum(tokens.min(), labels.min()))
        if hi < self.vocab and lo >= 0:
            return
        bad = ((tokens >= self.vocab) | (tokens < 0) | (labels >= self.vocab)
               | (labels < 0)).any(dim=1)  # [b]
        row = int(bad.nonzero()[0, 0])
        ids = torch.cat([tokens[row], labels[row]])
        worst = int(ids[(ids >= self.vocab) | (ids < 0)][0])
        source = ""
        if names:
            prefix = self.prefixes.get(names[row])
            source = f" (dataset {names[row]!r}" + (f", file {prefix}.bin)" if prefix else ")")
        raise ConfigError(f"{what}{source} holds token id {worst}, outside the model's "
                          f"vocabulary of {self.vocab} (ids 0..{self.vocab - 1}); the data "
                          f"was tokenized with a larger vocabulary than --tokenizer-model/"
                          f"--vocab-size gives")

    def next_microbatches(self) -> tuple[list[dict], dict[str, int]]:
        """This dp rank's micro-batches of the next step, on the device, and how many
        samples of the whole global batch came from each dataset."""
        start = self.consumed_samples
        mbs = []
        for _ in range(self.num_micro):
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ConfigError(f"the training data ran out at sample {start}; the blend "
                                  f"was built for {len(self.train)} samples") from None
            if not self.mock:
                self._check_ids(batch["tokens"], batch["labels"],
                                f"training micro-batch at sample {start}", batch["dataset"])
            mbs.append({"tokens": batch["tokens"].to(self.ctx.device, non_blocking=True),
                        "labels": batch["labels"].to(self.ctx.device, non_blocking=True)})
        self.consumed_samples += self.global_batch
        return mbs, self._counts(start, self.consumed_samples)

    def _counts(self, begin: int, end: int) -> dict[str, int]:
        """Samples of global positions [begin, end) per dataset (from the blend's index)."""
        idx = self.train.dataset_index[begin - self.train.start: end - self.train.start]
        counts = np.bincount(idx, minlength=len(self.train.names))
        return {n: int(c) for n, c in zip(self.train.names, counts) if c}

    def valid_microbatches(self, name: str) -> list[dict]:
        """This dp rank's share of the fixed validation samples of set `name`, on the device."""
        if name not in self._valid_cache:
            from megacpt.data.loader import build_loader

            ds = self.valid[name]
            if hasattr(ds, "limit"):
                ds.limit = self.eval_samples
            loader = build_loader(ds, self.mbs, 0, self.ctx.dp_rank, self.ctx.dp, 0)
            out = []
            for batch in loader:
                self._check_ids(batch["tokens"], batch["labels"], f"validation set {name!r}",
                                [name] * len(batch["tokens"]))
                out.append({"tokens": batch["tokens"].to(self.ctx.device),
                            "labels": batch["labels"].to(self.ctx.device)})
            self._valid_cache[name] = out
        return self._valid_cache[name]

    def state_dict(self) -> dict:
        return self.train.state_dict(self.consumed_samples)


def _real_valid(cfg: Config, name: str, prefix: str, eval_samples: int):
    from megacpt.data.build import build_valid_dataset
    from megacpt.data.indexed import IndexedDataset

    indexed = IndexedDataset(prefix)
    return build_valid_dataset(name, indexed, (0, len(indexed)), cfg.model.seq_length,
                               eval_samples, cfg.data.data_cache_path, True, None)
