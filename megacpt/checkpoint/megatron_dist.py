"""Import Megatron-Core `torch_dist` (distributed) checkpoints of LLaMA-style GPT models.

This is the default `--ckpt-format` of current Megatron-LM. Weights only: optimizer state,
RNG state and `_extra_state` entries are skipped (and never unpickled). Layout read (written
by `megatron.core.dist_checkpointing.save` through torch.distributed.checkpoint; checked
against megatron-core 0.16.1):

    DIR/latest_checkpointed_iteration.txt          an iteration number or "release"
    DIR/iter_{it:07d}/ (or DIR/release/, or the iteration directory given directly)
      metadata.json     {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                         "common_backend": "torch", ...}
      .metadata         torch.distributed.checkpoint Metadata: every key's global shape,
                        dtype and the chunks each __R_K.distcp file holds
      __{rank}_{k}.distcp   tensor bytes, whatever the (tp, pp, dp) layout of the saving run
      common.pt         the non-sharded entries: {"args": argparse.Namespace, "iteration",
                        "checkpoint_version", "opt_param_scheduler", ...}, read with
                        torch.load(weights_only=True) and the legacy importer's allow-list

Keys are global (independent of the saving layout). Transformer layers are stacked on a
leading [num_layers] axis (megatron-core's TransformerBlock prepends the global layer offset);
the local (non-TransformerEngine) layer spec saves the same TE-style names through its
sharded_state_dict_keys_map. With L layers, h hidden, V' Megatron's padded vocabulary:

    embedding.word_embeddings.weight                    [V', h]           -> embedding.weight
    decoder.layers.self_attention.linear_qkv.layer_norm_weight  [L, h]    -> layers.i.input_norm
    decoder.layers.self_attention.linear_qkv.weight     [L, (nh+2ng)d, h] -> layers.i.attention.qkv
    decoder.layers.self_attention.linear_proj.weight    [L, h, nh d]      -> layers.i.attention.proj
    decoder.layers.mlp.linear_fc1.layer_norm_weight     [L, h]   -> layers.i.post_attention_norm
    decoder.layers.mlp.linear_fc1.weight                [L, 2 ffn, h]     -> layers.i.mlp.gate_up
    decoder.layers.mlp.linear_fc2.weight                [L, h, ffn]       -> layers.i.mlp.down
    decoder.final_layernorm.weight                      [h]               -> final_norm.weight
    output_layer.weight                                 [V', h]           -> output.weight

Also accepted: the older local names (input_layernorm, pre_mlp_layernorm, ...), per-layer
keys `decoder.layers.{i}.<name>` instead of stacked ones, a leading "model." (NeMo-style), and
fc1 stored as two keys `linear_fc1.weight_w` / `_v` (gate / up). The global QKV is interleaved
per query group and the global fc1 is `[gate; up]` (megatron-core's swiglu sharded factory
splits each tp rank's `[gate_r; up_r]` into the two halves of the global tensor), which are
exactly our full layouts. Tensors are read one at a time (one layer slice of a stacked key)
into a preallocated tensor with torch.distributed.checkpoint, no process group needed; the
vocabulary is re-padded to ours as in `megacpt.checkpoint.megatron_legacy`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                   StorageMeta, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megacpt.checkpoint.format import CheckpointError, full_shape
from megacpt.checkpoint.megatron_common import (IGNORED, LAYER_RE, config_and_tokenizer,
                                                expected_key, layer_keys, legacy_iter_dir,
                                                load_legacy_file, repad_vocab, top_keys)
from megacpt.checkpoint.source import Source

META_JSON = "metadata.json"
COMMON = "common.pt"
_STACKED_RE = re.compile(r"decoder\.layers\.([^\d].*)$")
_SPLIT_FC1 = ("mlp.linear_fc1.weight_w", "mlp.linear_fc1.weight_v")
_SKIP = re.compile(r"^(optimizer|rng_state|rerun_state_machine)")


def dist_iter_dir(path: str) -> str | None:
    """The iteration directory holding metadata.json (save dir with tracker, or itself)."""
    d = legacy_iter_dir(path)
    return d if d and os.path.isfile(os.path.join(d, META_JSON)) else None


def is_megatron_dist(path: str) -> bool:
    """True for a megatron-core dist_checkpointing directory (any sharded backend: the
    source then says which it supports)."""
    return dist_iter_dir(path) is not None


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_EXTRA_GLOBALS = (("torch", "Size"), ("torch.serialization", "_get_layout"))
_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")  # checkpoint_id


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file allowing only what one holds: the checkpoint
    metadata/planner/filesystem record classes, torch.Size, torch dtypes and layouts, paths
    (torch's own reader uses a bare pickle.load, which would run any code in the file)."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        obj = None
        if (module in _DCP_MODULES or (module, name) in _EXTRA_GLOBALS
                or (module in ("pathlib", "pathlib._local") and name in _PATHS)):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None or not (isinstance(obj, (type, torch.dtype)) or
                               (module, name) == ("torch.serialization", "_get_layout")):
            raise CheckpointError(f"{self.path}: refers to {module}.{name}, which a "
                                  "torch.distributed.checkpoint .metadata file does not hold; "
                                  "refusing to unpickle it")
        return obj


class _CachedReader(dcp.FileSystemReader):
    """FileSystemReader that reads .metadata once, through `_MetadataUnpickler`."""

    def __init__(self, path: str):
        super().__init__(path)
        self._md: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._md is None:
            path = os.path.join(str(self.path), ".metadata")
            try:
                with open(path, "rb") as f:
                    md = _MetadataUnpickler(f, path).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise CheckpointError(f"{path}: unreadable torch.distributed.checkpoint "
                                      f"metadata ({type(e).__name__}: {e})") from None
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{path}: holds a {type(md).__name__}, expected "
                                      "torch.distributed.checkpoint Metadata")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._md = md
        return self._md


class _SlicePlanner(DefaultLoadPlanner):
    """Loads the box `offsets` + dest.shape of one stored tensor into `dest`."""

    def __init__(self, key: str, dest: torch.Tensor, offsets: tuple[int, ...]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.dest, self.offsets = key, dest, offsets

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.shape)
        self.plan = LoadPlan(create_read_items_for_chunk_list(self.key, md, [chunk]))
        return self.plan

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.dest


class MegatronDistSource(Source):
    """A Megatron-Core torch_dist checkpoint (weights only)."""

    kind = "megatron_dist"

    def __init__(self, path: str, vocab_size: int | None = None,
                 tokenizer_model: str | None = None, make_vocab_size_divisible_by: int = 128,
                 **_ignored):
        self.path = path
        d = dist_iter_dir(path)
        if d is None:
            raise CheckpointError(f"{path}: not a Megatron-Core distributed checkpoint (no "
                                  f"{META_JSON} in it or in the iteration its tracker names)")
        self.iter_dir = d
        self._check_backend(os.path.join(d, META_JSON))
        common_path = os.path.join(d, COMMON)
        common = load_legacy_file(common_path)
        args = common.get("args") if isinstance(common, dict) else None
        if args is None:
            raise CheckpointError(f"{common_path}: has no 'args' (expected Megatron-LM's "
                                  f"argparse.Namespace, as its save_checkpoint writes)")
        self.native_tp = None  # vocabulary re-padding: always go through full tensors
        self.tokenizer_path, self.cfg = config_and_tokenizer(
            args, common_path, vocab_size, tokenizer_model, make_vocab_size_divisible_by)
        self.iteration, self.state = 0, {}
        self._reader = _CachedReader(d)
        try:
            self._md = self._reader.read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 - missing or corrupt .metadata
            raise CheckpointError(f"{d}: cannot read torch.distributed.checkpoint .metadata "
                                  f"({type(e).__name__}: {e})") from None
        self._index()
        self.dtype = self._md[self._where["embedding.weight"][0][0]].properties.dtype
        self.cfg.training.bf16 = self.dtype == torch.bfloat16

    @staticmethod
    def _check_backend(meta_path: str) -> None:
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
        backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
        if backend != "torch_dist":
            raise CheckpointError(f"{meta_path}: sharded_backend is {backend!r}, expected "
                                  f"'torch_dist' (only torch_dist checkpoints can be imported)")

    def _index(self) -> None:
        """Our name -> ([stored keys concatenated on dim 0], layer index in a stacked key or
        None); unknown model tensors (biases, other layer types) are an error."""
        self._where: dict[str, tuple[list[str], int | None]] = {}
        mcfg = self.cfg.model
        L = mcfg.num_layers
        layer_map, top_map = layer_keys(), top_keys()
        for key, md in self._md.items():
            if not isinstance(md, TensorStorageMetadata) or _SKIP.search(key):
                continue  # bytes (_extra_state, RNG), optimizer state
            name = key.removeprefix("model.")
            if IGNORED.search(name):
                continue
            stacked = _STACKED_RE.match(name)
            per_layer = LAYER_RE.match(name)
            if stacked and stacked.group(1) in layer_map:
                self._check_stacked(key, md, L)
                for i in range(L):
                    self._where[f"layers.{i}.{layer_map[stacked.group(1)]}"] = ([key], i)
            elif stacked and stacked.group(1) == _SPLIT_FC1[0]:
                self._check_stacked(key, md, L)
                other = key[:-1] + "v"
                for i in range(L):
                    self._where[f"layers.{i}.mlp.gate_up.weight"] = ([key, other], i)
            elif stacked and stacked.group(1) == _SPLIT_FC1[1]:
                continue  # read together with its _w half
            elif per_layer and per_layer.group(2) in layer_map:
                ours = f"layers.{int(per_layer.group(1))}.{layer_map[per_layer.group(2)]}"
                self._where[ours] = ([key], None)
            elif name in top_map:
                self._where[top_map[name]] = ([key], None)
            else:
                raise CheckpointError(f"{self.iter_dir}: unexpected model tensor {key!r} "
                                      f"(biases or non-LLaMA layers cannot be imported)")
        extra = sorted(set(self._where) - set(self.names()))
        if extra:
            raise CheckpointError(f"{self.iter_dir}: holds {extra[0]!r} beyond args.num_layers "
                                  f"= {L}")
        for name in self.names():
            if name not in self._where:
                raise CheckpointError(f"{self.iter_dir}: no tensor for {name!r} in .metadata "
                                      f"(expected e.g. {expected_key(name, stacked=True)!r})")
            keys, _ = self._where[name]
            for k in keys:
                if k not in self._md:
                    raise CheckpointError(f"{self.iter_dir}: {keys[0]!r} needs its other half "
                                          f"{k!r}, which .metadata does not list")
            have = self._shape(name)
            want = full_shape(mcfg, name)
            if name in ("embedding.weight", "output.weight"):
                want = (have[0], want[1])  # Megatron's own padding; rows checked in get()
            if have != tuple(want):
                raise CheckpointError(f"{self.iter_dir}: {keys[0]} gives {name} shape {have}, "
                                      f"the args in {COMMON} imply {tuple(want)}")

    def _check_stacked(self, key: str, md: TensorStorageMetadata, layers: int) -> None:
        if md.size[0] != layers:
            raise CheckpointError(f"{self.iter_dir}: stacked key {key!r} has {md.size[0]} "
                                  f"layers on dim 0, args.num_layers is {layers}")

    def _shape(self, name: str) -> tuple[int, ...]:
        keys, layer = self._where[name]
        sizes = [tuple(self._md[k].size) for k in keys]
        if layer is not None:
            sizes = [s[1:] for s in sizes]
        return (sum(s[0] for s in sizes),) + sizes[0][1:]

    def _read(self, key: str, layer: int | None) -> torch.Tensor:
        md = self._md[key]
        shape = tuple(md.size)
        offsets = (0,) * len(shape)
        if layer is not None:
            shape, offsets = (1,) + shape[1:], (layer,) + offsets[1:]
        out = torch.empty(shape, dtype=md.properties.dtype)
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ...": intended
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load({key: out}, storage_reader=self._reader,
                         planner=_SlicePlanner(key, out, offsets), no_dist=True)
        except Exception as e:  # noqa: BLE001 - missing/truncated .distcp file
            raise CheckpointError(f"{self.iter_dir}: reading {key!r} failed "
                                  f"({type(e).__name__}: {e})") from None
        return out[0] if layer is not None else out

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: the model has no parameter {name!r}")
        keys, layer = self._where[name]
        parts = [self._read(k, layer) for k in keys]
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        return repad_vocab(self.cfg.model, name, full, self.iter_dir)
