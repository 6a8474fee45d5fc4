"""Checksums of a checkpoint's files: recorded in meta.json when saving, verified on load.

`meta.json` of a checkpoint (layout in `megacpt.checkpoint.format`) gains

    "checksums": {"algorithm": "xxh3_128" | "sha256",
                  "files": {"mp_rank_00_000/model.safetensors": HEX, "rng/rank_0.pt": HEX, ...},
                  "meta": HEX}     # of meta.json itself without this field (canonical JSON)

with one entry per file of the iteration directory, paths relative to it. xxh3_128 (the
`xxhash` package, several GB/s) is used when installed, else sha256 from the standard
library; a checkpoint records which, and verifying needs the same one. Checkpoints written
before this field existed load with an INFO line saying they are unverified.

Saving (`gather_checksums` + `record_checksums`, called by `save_checkpoint` after every
rank's files are complete and before the directory is renamed into place): each rank hashes
the files it wrote, rank 0 gathers them and rewrites meta.json atomically. `--async-save`
does the same without collectives: each rank's background writer hashes its files
(`digests`) into its completion marker, and rank 0's writer records them all before it
publishes (`megacpt.checkpoint.async_save`).

Loading (`verify_for_rank`, from `load_checkpoint`; `verify_model_files`, from
`load_weights`): each rank hashes the files it is about to read; a mismatch raises
`IntegrityError` naming the file and the newest older checkpoint in the same save directory
that verifies completely (or saying there is none), so a flipped bit never trains on
silently. `--no-verify-checksums` skips the check (it costs one extra read of the files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from megacpt.checkpoint import format as fmt
from megacpt.checkpoint.format import CheckpointError

log = logging.getLogger(__name__)

FIELD = "checksums"
_CHUNK = 1 << 22


class IntegrityError(CheckpointError):
    """A checkpoint file does not match the checksum recorded when it was saved."""


def default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def _hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            raise CheckpointError("this checkpoint's checksums are xxh3_128, which needs the "
                                  "xxhash package: pip install xxhash (or skip the check with "
                                  "--no-verify-checksums)") from None
        return xxhash.xxh3_128()
    raise CheckpointError(f"unknown checksum algorithm {algorithm!r} in meta.json")


def file_digest(path: str, algorithm: str) -> str:
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def meta_digest(meta: dict, algorithm: str) -> str:
    """Digest of meta.json's content without the checksums field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != FIELD}
    h = _hasher(algorithm)
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


def rank_files(iter_dir: str, ctx) -> list[str]:
    """Paths (relative to `iter_dir`) of the files this rank writes and reads on resume: its
    (tp, pp) shard's files and its RNG state."""
    shard = fmt.shard_dirname(ctx.tp_rank, ctx.pp_rank)
    out = []
    if os.path.isdir(os.path.join(iter_dir, shard)):
        out = [f"{shard}/{n}" for n in sorted(os.listdir(os.path.join(iter_dir, shard)))]
    rng = fmt.rng_filename(ctx.rank).replace(os.sep, "/")
    if os.path.isfile(os.path.join(iter_dir, rng)):
        out.append(rng)
    return out


# ----- saving -----

def digests(iter_dir: str, rels: list[str]) -> dict[str, str]:
    """{relpath: digest} of the given files of `iter_dir` (no collectives: the background
    writer of `--async-save` hashes the files it wrote; rank 0 records them all)."""
    algorithm = default_algorithm()
    return {rel: file_digest(os.path.join(iter_dir, rel), algorithm) for rel in rels}


def gather_checksums(iter_dir: str, ctx) -> dict[str, str]:
    """Collective: every rank hashes the files it wrote; all get {relpath: digest}."""
    algorithm = default_algorithm()
    mine = {}
    for rel in rank_files(iter_dir, ctx):
        if ctx.dp_rank == 0 or rel.startswith(fmt.RNG_DIR + "/"):
            mine[rel] = file_digest(os.path.join(iter_dir, rel), algorithm)
    if ctx.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            parts: list = [None] * ctx.world_size
            dist.all_gather_object(parts, mine)
            mine = {k: v for p in parts for k, v in p.items()}
    return mine


def record_checksums(iter_dir: str, files: dict[str, str]) -> None:
    """Rank 0: add the checksums field to meta.json (rewritten atomically)."""
    algorithm = default_algorithm()
    path = os.path.join(iter_dir, fmt.META)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    meta[FIELD] = {"algorithm": algorithm, "files": dict(sorted(files.items())),
                   "meta": meta_digest(meta, algorithm)}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_all(iter_dir: str) -> None:
    """Single process (converters, `megacpt.checkpoint.writer`): hash every file of
    `iter_dir` into its meta.json."""
    algorithm = default_algorithm()
    files = {}
    for root, _, names in os.walk(iter_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), iter_dir).replace(os.sep, "/")
            if rel != fmt.META:
                files[rel] = file_digest(os.path.join(iter_dir, rel), algorithm)
    record_checksums(iter_dir, files)


# ----- verifying -----

def problems(iter_dir: str, only: list[str] | None = None) -> list[str]:
    """What is wrong with `iter_dir` (empty: it verifies). `only`: check just these files
    (relative paths) besides meta.json; default every recorded file."""
    path = os.path.join(iter_dir, fmt.META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return [f"{path}: unreadable ({e})"]
    sums = meta.get(FIELD)
    if not isinstance(sums, dict):
        return []  # written before checksums existed: nothing to compare with
    algorithm = sums.get("algorithm", "")
    if meta_digest(meta, algorithm) != sums.get("meta"):
        return [f"{path}: its content does not match its recorded checksum"]
    recorded = sums.get("files", {})
    out = []
    for rel in sorted(recorded) if only is None else only:
        full = os.path.join(iter_dir, rel)
        if rel not in recorded:
            out.append(f"{full}: not listed in the checksums of {path}")
        elif not os.path.isfile(full):
            out.append(f"{full}: missing")
        elif file_digest(full, algorithm) != recorded[rel]:
            out.append(f"{full}: {algorithm} checksum mismatch (the file changed or is "
                       f"corrupt since it was saved)")
    return out


def newest_good(iter_dir: str) -> str | None:
    """The newest checkpoint older than `iter_dir` in its save directory that verifies."""
    iter_dir = os.path.abspath(iter_dir)
    save_dir = os.path.dirname(iter_dir)
    m = re.fullmatch(r"iter_(\d+)", os.path.basename(iter_dir))
    if not m or not os.path.isdir(save_dir):
        return None
    older = sorted((int(n[5:]), n) for n in os.listdir(save_dir)
                   if re.fullmatch(r"iter_\d+", n) and int(n[5:]) < int(m.group(1)))
    for _, name in reversed(older):
        cand = os.path.join(save_dir, name)
        if os.path.isfile(os.path.join(cand, fmt.META)) and not problems(cand):
            return cand
    return None


def refusal(iter_dir: str, problem: str) -> IntegrityError:
    good = newest_good(iter_dir)
    where = (f"The newest older checkpoint that verifies is {good}: resume from it with "
             f"--load {good}" if good else "No older checkpoint in its directory verifies")
    return IntegrityError(f"{problem}; refusing to load {iter_dir}. {where} (or load it "
                          f"anyway with --no-verify-checksums)")


def _check(iter_dir: str, only: list[str] | None) -> None:
    found = problems(iter_dir, only)
    if found:
        raise refusal(iter_dir, found[0])
    if not os.path.isfile(os.path.join(iter_dir, fmt.META)):
        return
    with open(os.path.join(iter_dir, fmt.META), encoding="utf-8") as f:
        if FIELD not in json.load(f):
            log.info("%s has no recorded checksums (saved by an older megacpt): not verified",
                     iter_dir)


def verify_all(iter_dir: str) -> None:
    """Every recorded file and meta.json (converters, before they read a checkpoint: a
    conversion must not carry a corrupt file into a new checkpoint with fresh checksums)."""
    _check(iter_dir, None)


def verify_model_files(iter_dir: str, tp: int, pp: int) -> None:
    """Weights-only loads (`--init-from`): every model shard and meta.json."""
    _check(iter_dir, [f"{fmt.shard_dirname(t, p)}/{fmt.MODEL_FILE}"
                      for t in range(tp) for p in range(pp)])


def files_to_verify(iter_dir: str, ctx) -> list[str]:
    """What this rank verifies on an exact resume. Same (tp, pp) layout: the files it reads
    (its shard's and its RNG state). Another layout (resharding): a rank reads slices of
    several saved shards, so the recorded files are dealt out over the ranks (largest first,
    each to the rank with the fewest bytes so far: the same deal on every rank), each file
    hashed once in all, none left out."""
    try:
        with open(os.path.join(iter_dir, fmt.META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return rank_files(iter_dir, ctx)  # _check reports the unreadable meta.json
    layout = meta.get("layout") or {}
    if (layout.get("tp"), layout.get("pp"), layout.get("vp", 1)) == (ctx.tp, ctx.pp, ctx.vp):
        return rank_files(iter_dir, ctx)
    def size(rel):
        full = os.path.join(iter_dir, rel)
        return os.path.getsize(full) if os.path.isfile(full) else 0
    load, mine = [0] * ctx.world_size, []
    for rel in sorted(meta.get(FIELD, {}).get("files", {}), key=lambda r: (-size(r), r)):
        r = load.index(min(load))
        load[r] += size(rel)
        if r == ctx.rank:
            mine.append(rel)
    return mine


def verify_for_rank(iter_dir: str, ctx) -> None:
    """Exact resume: each rank checks the files it reads (`files_to_verify`); all ranks
    agree before going on (a rank whose files are fine raises too, naming the ranks that
    failed)."""
    error = None
    try:
        _check(iter_dir, files_to_verify(iter_dir, ctx))
    except IntegrityError as e:
        error = e
    if ctx.world_size > 1:
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            flags = torch.zeros(ctx.world_size, device=ctx.device)
            flags[ctx.rank] = float(error is not None)
            dist.all_reduce(flags)
            failed = [r for r, f in enumerate(flags.tolist()) if f]
            if failed and error is None:
                error = IntegrityError(f"{iter_dir} failed verification on rank(s) {failed} "
                                       f"(see their messages); refusing to load it")
    if error is not None:
        raise error
