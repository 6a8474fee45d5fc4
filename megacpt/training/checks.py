"""Bad-input checks that run before anything is built or computed.

Each failure raises `ConfigError` naming the flag (or file), the field and what was expected:

- the tokenizer model exists (`--tokenizer-model`);
- every training prefix (`--data-path`) and validation prefix (`--valid-data-path`) has a
  readable `.idx` / `.bin` pair in Megatron's format;
- no token id in those files (the first `--data-check-tokens` tokens of each, all of a small
  corpus) reaches the model's vocabulary size;
- `--init-from` is our checkpoint (any layout) or a HuggingFace LLaMA directory whose shape
  matches the model, and whose vocabulary is not larger than the model's embedding;
- a `--load` directory that holds a tracker points at a complete checkpoint; one that holds
  `iter_*` checkpoints but no tracker resumes from the newest that verifies, with a warning
  (`--load` is set to it), instead of starting again at iteration 0 over them;
- the blend names distinct prefixes with positive weights, and `--split` leaves each a
  non-empty train split;
- `--save` and `--log-dir` can be created and written to; `--save` has room for about one
  checkpoint (a warning only: other runs may free space meanwhile);
- `--device cuda` is only accepted where CUDA is available (`check_device`, run before the
  process group is created).
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile

import numpy as np

from megacpt.config import Config, ConfigError

log = logging.getLogger("megacpt.train")

_SCAN_CHUNK = 1 << 22  # tokens per read when scanning for out-of-vocabulary ids


def check_inputs(cfg: Config, opts) -> None:
    """All checks of this module, in order (cheap ones first)."""
    from megacpt.training.data import train_prefixes

    d = cfg.data
    check_device(cfg)
    if d.tokenizer_model and not os.path.exists(d.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: not found (expected a "
                          f"SentencePiece .model, a tokenizer.json or an HF model directory)")
    train = [] if opts.mock_data else train_prefixes(cfg)
    check_blend(train)
    prefixes = [("--data-path", n, p) for n, _, p in train]
    prefixes += [("--valid-data-path", n, p) for n, p in d.valid_data_path.items()]
    for flag, name, prefix in prefixes:
        ds = check_indexed(flag, name, prefix, cfg.model.vocab_size, opts.data_check_tokens)
        if flag == "--data-path":
            check_split(d.split, name, prefix, len(ds))
        check_tokenizer_sidecar(flag, name, prefix, d.tokenizer_model)
    if cfg.checkpoint.init_from:
        check_init_source(cfg.checkpoint.init_from, cfg)
    if cfg.checkpoint.load and not has_checkpoint(cfg.checkpoint.load):
        cfg.checkpoint.load = resume_untracked(cfg.checkpoint.load)
    if cfg.checkpoint.load and has_checkpoint(cfg.checkpoint.load):
        saved_state(cfg.checkpoint.load)
    for flag, path in (("--save", cfg.checkpoint.save), ("--log-dir", cfg.logging.log_dir)):
        if path:
            check_writable(flag, path)
    if cfg.checkpoint.save:
        check_free_space(cfg.checkpoint.save, checkpoint_bytes(cfg))


def check_device(cfg: Config) -> None:
    """`--device cuda` (or the nccl backend) needs a visible CUDA device."""
    import torch

    wants = "--device cuda" if cfg.training.device == "cuda" else \
        "--distributed-backend nccl" if cfg.parallel.distributed_backend == "nccl" else None
    if wants and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else \
            "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        raise ConfigError(f"{wants}: CUDA is not available ({why}); use --device cpu "
                          f"(and --distributed-backend gloo) or run on a GPU machine")


def check_blend(entries: list[tuple[str, float, str]]) -> None:
    """Distinct prefixes under distinct names, each with a positive weight."""
    seen: dict[str, str] = {}
    for name, weight, prefix in entries:
        key = os.path.realpath(prefix)
        if key in seen:
            raise ConfigError(f"--data-path: datasets {seen[key]!r} and {name!r} are the same "
                              f"prefix {prefix}; every batch would hold its documents twice "
                              f"as often as the weights say (give it once, with the sum of "
                              f"the weights)")
        seen[key] = name
        if not weight > 0:
            raise ConfigError(f"--data-path: dataset {name!r} ({prefix}) has weight 0; drop "
                              f"it from the blend (on resume, the other datasets continue "
                              f"where they stopped)")


def check_split(split: str, name: str, prefix: str, num_documents: int) -> None:
    from megacpt.data.gpt_dataset import split_ranges

    try:
        (tr0, tr1), _, _ = split_ranges(split, num_documents)
    except ValueError as e:
        raise ConfigError(f"--split {split}: {e}") from None
    if tr1 <= tr0:
        raise ConfigError(f"--split {split}: the train split of dataset {name!r} ({prefix}, "
                          f"{num_documents} documents) is empty; give training a share, "
                          f"e.g. --split 969,30,1 (or 100,0,0 with --valid-data-path)")


def check_tokenizer_sidecar(flag: str, name: str, prefix: str, tokenizer: str | None) -> None:
    """The dataset's tokenizer record (`megacpt.data.sidecar`) matches --tokenizer-model."""
    from megacpt.data import sidecar
    from megacpt.data.indexed import IndexedDataset

    try:
        found = sidecar.check(prefix, tokenizer, len(IndexedDataset(prefix)))
    except sidecar.TokenizerMismatch as e:
        raise ConfigError(f"{flag}: dataset {name!r}: {e}") from None
    if found == "no sidecar":
        log.info("%s: no %s record: cannot check which tokenizer made it", prefix,
                 sidecar.SUFFIX)


def resume_untracked(load: str) -> str:
    """`--load DIR` without a tracker: the newest complete checkpoint in DIR that verifies
    (a save killed between its rename and the tracker update, or a deleted tracker), with a
    warning; DIR itself when it holds none (a fresh start)."""
    from megacpt.checkpoint import integrity
    from megacpt.checkpoint.format import META, TRACKER

    if not os.path.isdir(load):
        return load
    found = sorted(n for n in os.listdir(load) if re.fullmatch(r"iter_\d+", n)
                   and os.path.isfile(os.path.join(load, n, META)))
    rejected = []
    for name in reversed(found):
        cand = os.path.join(load, name)
        bad = integrity.problems(cand)
        if not bad:
            log.warning("--load %s has no %s: resuming from its newest complete checkpoint "
                        "%s%s", load, TRACKER, cand, f" (skipping {', '.join(rejected)}: it "
                        f"does not verify)" if rejected else "")
            if int(os.environ.get("RANK", "0")) == 0:  # repair: name it in a new tracker
                from megacpt.checkpoint.format import write_tracker

                write_tracker(load, int(name.split("_")[1]))
            return cand
        rejected.append(f"{name} ({bad[0]})")
    if rejected:
        raise ConfigError(f"--load {load} has no {TRACKER} and none of its checkpoints "
                          f"verifies: {'; '.join(rejected)}")
    return load


def check_writable(flag: str, path: str) -> None:
    """The directory exists (created if needed) and a file can be created in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".megacpt-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: the directory is not writable ({e.strerror})") \
            from None


def checkpoint_bytes(cfg: Config) -> int:
    """About the size of one checkpoint: parameters, plus fp32 Adam moments (and fp32 master
    weights for bf16 parameters) unless --no-save-optim."""
    n = cfg.model.num_parameters()
    param = 2 if cfg.training.bf16 else 4
    optim = 0 if cfg.checkpoint.no_save_optim else 4 * (3 if cfg.training.bf16 else 2)
    return n * (param + optim)


def check_free_space(path: str, need_bytes: int) -> bool:
    """Warn when `path` has less free space than `need_bytes`; True if it warned."""
    free = shutil.disk_usage(path).free
    if free >= need_bytes:
        return False
    log.warning("--save %s: %.3g GB free, but one checkpoint needs about %.3g GB; saves will "
                "fail unless space is freed (the previous checkpoint is kept when they do)",
                path, free / 1e9, math.ceil(need_bytes / 1e6) / 1e3)
    return True


def check_indexed(flag: str, name: str, prefix: str, vocab_size: int, max_tokens: int) :
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
    return ds


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
    from megacpt.checkpoint.format import read_meta, resolve_iter_dir

    vp = int(read_meta(resolve_iter_dir(path))["layout"].get("vp", 1))
    if vp != ctx.vp:
        raise ConfigError(
            f"--load {path} was saved with {vp} virtual pipeline stage(s) per rank but this run "
            f"has {ctx.vp}: resume with --virtual-pipeline-model-parallel-size {vp}, or start "
            f"from its weights with --init-from")


def resolved_iter_dir(path: str) -> str:
    """The iteration directory `--load PATH` resumes from (PATH itself for an iter_* dir)."""
    from megacpt.checkpoint.format import resolve_iter_dir

    return resolve_iter_dir(path)


def same_blend(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(math.isclose(float(a[n]), float(b[n]), rel_tol=1e-9,
                                                 abs_tol=1e-12) for n in a)


def iteration_dir(save_dir: str, iteration: int) -> str:
    from megacpt.checkpoint.format import iter_dirname

    return os.path.join(save_dir, iter_dirname(iteration))
