"""Bad-input checks that run before anything is built or computed.

Each failure raises `ConfigError` naming the flag (or file), the field and what was expected:

- the tokenizer model exists (`--tokenizer-model`);
- every training prefix (`--data-path`) and validation prefix (`--valid-data-path`) has a
  readable `.idx` / `.bin` pair in Megatron's format;
- no token id in those files (the first `--data-check-tokens` tokens of each, all of a small
  corpus) reaches the model's vocabulary size;
- `--init-from` is our checkpoint (any layout) or a HuggingFace LLaMA directory whose shape
  matches the model, and whose vocabulary is not larger than the model's embedding;
- a `--load` directory that holds a tracker points at a complete checkpoint;
- `--save` and `--log-dir` can be created.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from megacpt.config import Config, ConfigError

log = logging.getLogger("megacpt.train")

_SCAN_CHUNK = 1 << 22  # tokens per read when scanning for out-of-vocabulary ids


def check_inputs(cfg: Config, opts) -> None:
    """All checks of this module, in order (cheap ones first)."""
    from megacpt.training.data import train_prefixes

    d = cfg.data
    if d.tokenizer_model and not os.path.isfile(d.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: file not found")
    prefixes = [] if opts.mock_data else [("--data-path", n, p) for n, _, p in train_prefixes(cfg)]
    prefixes += [("--valid-data-path", n, p) for n, p in d.valid_data_path.items()]
    for flag, name, prefix in prefixes:
        check_indexed(flag, name, prefix, cfg.model.vocab_size, opts.data_check_tokens)
    if cfg.checkpoint.init_from:
        check_init_source(cfg.checkpoint.init_from, cfg)
    if cfg.checkpoint.load and has_checkpoint(cfg.checkpoint.load):
        saved_state(cfg.checkpoint.load)
    for flag, path in (("--save", cfg.checkpoint.save), ("--log-dir", cfg.logging.log_dir)):
        if path:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"{flag} {path}: cannot create the directory ({e})") from None


def check_indexed(flag: str, name: str, prefix: str, vocab_size: int, max_tokens: int) -> None:
    """The prefix opens as an indexed dataset and its token ids are < vocab_size."""
    from megacpt.data.indexed import IndexedDataset, IndexedFormatError, bin_path, idx_path

    missing = [p for p in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"{flag}: dataset {name!r} (prefix {prefix}) is missing "
                          f"{' and '.join(missing)}; build it with tools/preprocess_data.py")
    try:
        ds = IndexedDataset(prefix)
    except IndexedFormatError as e:
        raise ConfigError(f"{flag}: dataset {name!r}: {e}") from None
    if len(ds) == 0 or ds.num_tokens == 0:
        raise ConfigError(f"{flag}: dataset {name!r} ({prefix}) holds no tokens")
    if not np.issubdtype(ds.dtype, np.integer):
        raise ConfigError(f"{flag}: {idx_path(prefix)} stores {ds.dtype} tokens; expected "
                          f"integer token ids")
    worst, where = scan_max_token(bin_path(prefix), ds.dtype, max_tokens)
    if worst >= vocab_size or worst < 0:
        raise ConfigError(
            f"{flag}: {bin_path(prefix)} holds token id {worst} at token {where}, outside the "
            f"model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); the data was "
            f"tokenized with a larger vocabulary than --tokenizer-model/--vocab-size gives")


def scan_max_token(path: str, dtype: np.dtype, max_tokens: int) -> tuple[int, int]:
    """(largest |id|-wise extreme, its position) over the first `max_tokens` tokens of a .bin.

    Negative ids (signed dtypes) are returned as the extreme when present, since they are as
    invalid as ids past the vocabulary.
    """
    tokens = np.memmap(path, dtype=dtype, mode="r")
    n = min(len(tokens), max_tokens)
    if n < len(tokens):
        log.info("checking the first %d of %d tokens of %s for out-of-vocabulary ids", n,
                 len(tokens), path)
    worst, where = 0, 0
    for start in range(0, n, _SCAN_CHUNK):
        chunk = np.asarray(tokens[start:min(start + _SCAN_CHUNK, n)])
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0:
            return lo, start + int(chunk.argmin())
        if hi > worst:
            worst, where = hi, start + int(chunk.argmax())
    return worst, where


def check_init_source(path: str, cfg: Config) -> None:
    """`--init-from` opens (headers only) and holds a model of the configured shape."""
    from megacpt.checkpoint.format import CheckpointError
    from megacpt.checkpoint.registry import open_source

    if not os.path.exists(path):
        raise ConfigError(f"--init-from {path}: no such file or directory")
    try:
        with open_source(path) as src:
            have = src.cfg.model
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--init-from {path}: cannot read the weights: {e}") from None
    want = cfg.model
    if have.vocab_size > want.vocab_size or have.padded_vocab_size > want.padded_vocab_size:
        raise ConfigError(
            f"--init-from {path}: its vocabulary ({have.vocab_size} tokens, embedding "
            f"{have.padded_vocab_size} rows) is larger than this model's ({want.vocab_size}, "
            f"embedding {want.padded_vocab_size} rows); use its tokenizer, or extend the "
            f"model's vocabulary with tools/extend_vocab.py")
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "head_dim", "padded_vocab_size")
    diffs = [f"{f} {getattr(have, f)} vs {getattr(want, f)}" for f in fields
             if getattr(have, f) != getattr(want, f)]
    if diffs:
        raise ConfigError(f"--init-from {path}: the checkpoint's model shape differs from the "
                          f"configured one (checkpoint vs flags): {'; '.join(diffs)}; pass the "
                          f"source model's --model-size / shape flags"
                          + ("" if have.padded_vocab_size == want.padded_vocab_size else
                             ", or extend the vocabulary with tools/extend_vocab.py"))


def has_checkpoint(path: str) -> bool:
    """Whether `path` is a save directory with a tracker file or an iteration directory."""
    from megacpt.checkpoint.format import META, TRACKER

    return os.path.isfile(os.path.join(path, TRACKER)) or \
        os.path.isfile(os.path.join(path, META))


def saved_state(path: str) -> dict:
    """The `state` dict of the checkpoint `--load` would resume from (meta.json)."""
    from megacpt.checkpoint.format import CheckpointError
    from megacpt.checkpoint.reader import MegacptSource

    try:
        with MegacptSource(path) as src:
            return src.state
    except CheckpointError as e:
        raise ConfigError(f"--load {path}: {e}") from None


def check_resume_layout(path: str, ctx) -> None:
    """A checkpoint of any (tp, pp, dp) layout resumes in this one (resharded on load); it
    must be complete (every shard of its layout, shapes as its config says) and its model
    must split in this run's layout."""
    from megacpt.checkpoint.format import CheckpointError
    from megacpt.checkpoint.reader import MegacptSource

    try:
        with MegacptSource(path) as src:
            tp, pp = src.tp, src.pp
            ctx.check_model(src.cfg.model)
    except CheckpointError as e:
        raise ConfigError(f"--load {path}: {e}") from None
    if (tp, pp) != (ctx.tp, ctx.pp) and ctx.rank == 0:
        log.info("--load %s: saved in layout tp%dpp%d, resharding to tp%dpp%d", path, tp, pp,
                 ctx.tp, ctx.pp)


def iteration_dir(save_dir: str, iteration: int) -> str:
    from megacpt.checkpoint.format import iter_dirname

    return os.path.join(save_dir, iter_dirname(iteration))
