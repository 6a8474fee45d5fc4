"""The checkpoint directory layout (the one place it is defined) and small helpers around it.

    SAVE_DIR/
      latest_checkpointed_iteration.txt    the newest complete iteration, e.g. "100"; written
                                           last, atomically (temp file + os.replace)
      tokenizer.model                      the SentencePiece model the run uses (when known), or
      tokenizer.json [tokenizer_config.json, special_tokens_map.json]   its HuggingFace
                                           tokenizer (`megacpt.data.tokenizer.copy_tokenizer`)
      iter_0000100/                        one complete checkpoint (written as
                                           iter_0000100.tmp/ and renamed when complete)
        meta.json                          see below
        mp_rank_{tp:02d}_{pp:03d}/         one per (tensor, pipeline) rank of the layout
          model.safetensors                this shard's parameters under their GLOBAL names
                                           (`layers.5.attention.qkv.weight`), split over tp
                                           exactly as the table in `megacpt.params` says
          optimizer.safetensors            optimizer state tensors of this shard, named
                                           "{param name}/{key}" (key: exp_avg, exp_avg_sq,
                                           master, ...); each has its parameter's shard shape
                                           and is split over tp like the parameter (the
                                           distributed optimizer's dp shards are gathered
                                           first, so the file does not depend on dp)
          optimizer.pt                     everything else of `optimizer.state_dict()`
                                           (step, param_groups, non-tensor per-param state):
                                           torch.save of plain types, loaded weights_only
        rng/rank_{r}.pt                    per-global-rank RNG state (`state["rng"]`); absent
                                           after a layout conversion
      iter_0000200.tmp/.async/             only while an --async-save is being written: one
                                           rank_{r}.done (or .failed) marker per rank; rank 0
                                           removes it, then publishes (`async_save`)

`meta.json`:

    {"format": "megacpt-checkpoint", "version": 1, "iteration": int,
     "layout": {"tp": int, "pp": int, "dp": int},  # + "vp": int from interleaved runs
     "dtype": "float32" | "bfloat16" | ...,       # of the parameters in model.safetensors
     "has_optimizer": bool,
     "config": Config.to_dict(),                   # the run's resolved config
     "state": {"scheduler": {...}, "data": {...}, "counters": {...}, ...},   # JSON values
     "checksums": {...}}     # every file's checksum: see `megacpt.checkpoint.integrity`

Interleaved runs (vp virtual stages) use the same format: shard mp_rank_t_p holds the layers of
all of pp rank p's model chunks under their global indices (`stage_param_names(..., vp)`), so
any reader or conversion only needs "vp" from meta.json's layout to find them.

Only dp-rank-0 ranks write model/optimizer shards; every rank writes its RNG file; global
rank 0 writes meta.json, renames the directory and updates the tracker after a barrier, so a
crash mid-save leaves the previous checkpoint (and the tracker pointing at it) intact.
With `--keep-last-checkpoints N` rank 0 then deletes the oldest complete `iter_*` directories
beyond N (never the tracker's; each renamed to `iter_*.deleting` before removal).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import torch

from megacpt.config import Config, ModelConfig
# parameter names and shapes come from the parameter table; re-exported for the format's users
from megacpt.params import (LayoutError, check_layout, full_shape,  # noqa: F401
                            layer_param_names, local_shape, param_names, stage_param_names)

FORMAT_NAME, FORMAT_VERSION = "megacpt-checkpoint", 1
TRACKER = "latest_checkpointed_iteration.txt"
META = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_REST = "optimizer.pt"
RNG_DIR = "rng"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which
    file, which field and what was expected."""


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def parse_iter_dirname(name: str) -> int | None:
    """The iteration of a complete checkpoint directory's name (`iter_0000100`), else None
    (`iter_0000100.tmp` being written, anything else)."""
    m = re.fullmatch(r"iter_(\d{7,})", name)
    return int(m.group(1)) if m else None


def shard_dirname(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rng_filename(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank_{rank}.pt")


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "head_dim", "vocab_size", "padded_vocab_size")


NUMERIC_FIELDS = {"rotary_base": "--rotary-base", "norm_eps": "--norm-epsilon",
                  "tie_word_embeddings": "--tie-word-embeddings",
                  "add_qkv_bias": "--add-qkv-bias", "rope_scaling": "--use-rope-scaling"}


def check_same_model(have: ModelConfig, want: ModelConfig, source: str) -> None:
    """The checkpoint's model shape and numerics must equal the model being filled."""
    diffs = [f"{f}: checkpoint {getattr(have, f)} vs model {getattr(want, f)}"
             for f in SHAPE_FIELDS if getattr(have, f) != getattr(want, f)]
    if diffs:
        raise CheckpointError(f"{source} holds a different model shape than the one being "
                              f"loaded into: " + "; ".join(diffs))
    for f, flag in NUMERIC_FIELDS.items():
        if getattr(have, f) != getattr(want, f):
            raise CheckpointError(f"{source} was trained with {f} = {getattr(have, f)} but the "
                                  f"model has {getattr(want, f)}; pass {flag} "
                                  f"{getattr(have, f)}")


# ----- locating and reading checkpoints -----

def read_tracker(save_dir: str) -> int | None:
    path = os.path.join(save_dir, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, got {text[:40]!r}") from None


def write_tracker(save_dir: str, iteration: int) -> None:
    """Atomically point `save_dir` at `iteration` (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=save_dir, prefix=".tracker-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(save_dir, TRACKER))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    for name in os.listdir(save_dir):  # leftovers of saves killed mid-write (one writer)
        if name.startswith(".tracker-"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(save_dir, name))


def resolve_iter_dir(path: str) -> str:
    """The iteration directory of a save dir (via its tracker) or of an iter_* dir itself."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    it = read_tracker(path)
    if it is None:
        raise CheckpointError(f"{path} is not a checkpoint: it has neither {TRACKER} nor {META}")
    d = os.path.join(path, iter_dirname(it))
    if not os.path.isfile(os.path.join(d, META)):
        raise CheckpointError(f"{os.path.join(path, TRACKER)} names iteration {it} but "
                              f"{os.path.join(d, META)} is missing (incomplete checkpoint)")
    return d


def read_meta(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, META)
    try:
        meta = json.load(open(path))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: field 'format' is {meta.get('format')!r}, expected "
                              f"{FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'version' is {meta.get('version')!r}; this "
                              f"megacpt reads version {FORMAT_VERSION}")
    for key in ("iteration", "layout", "dtype", "config", "state"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return meta


def config_from_meta(meta: dict, where: str) -> Config:
    try:
        return Config.from_dict(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: field 'config' is not a valid config ({e})") from None


def write_meta(iter_dir: str, iteration: int, tp: int, pp: int, dp: int, dtype: str,
               has_optimizer: bool, config: dict, state: dict, vp: int = 1) -> None:
    layout = {"tp": tp, "pp": pp, "dp": dp} | ({"vp": vp} if vp > 1 else {})
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": int(iteration),
            "layout": layout, "dtype": dtype,
            "has_optimizer": bool(has_optimizer), "config": config,
            "state": json_safe(state, "state")}
    with open(os.path.join(iter_dir, META), "w") as f:
        json.dump(meta, f, indent=1)


def json_safe(obj, where: str):
    """Plain JSON values from dicts/lists of numbers, strings, numpy/torch scalars."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "item") and tuple(getattr(obj, "shape", (1,))) == ():
        return obj.item()  # numpy / torch scalar
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise CheckpointError(f"checkpoint {where} holds a {type(obj).__name__}, which cannot be "
                          f"stored in meta.json; pass numbers, strings, lists and dicts")


# ----- writing a directory atomically -----

@contextlib.contextmanager
def atomic_output_dir(final: str):
    """Yield a temp directory beside `final`; rename it to `final` only on success."""
    final = os.path.abspath(final)
    if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
        raise CheckpointError(f"output directory {final} already exists and is not empty; "
                              f"choose another --save-dir or remove it")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(final) + ".tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final):
        os.rmdir(final)
    os.rename(tmp, final)


# ----- plain (non-tensor) files -----

def load_plain(path: str):
    """torch.load of plain types only (weights_only); a clear error when missing/corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise CheckpointError(f"{path}: unreadable with weights_only=True ({e})") from None
