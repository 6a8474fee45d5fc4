"""The one reader of our own checkpoint format (`megacpt.checkpoint.format`), any layout.

`MegacptSource` opens a save dir or iter dir, checks meta.json and every shard's tensor list
and shapes against the parameter table, and reads parameters and optimizer state whole, as one
tp rank's part in any tp, or as any box of them (`get_slice`: only those bytes are read,
safetensors slicing). Training resume (`checkpointing.load_checkpoint`), `--init-from`, the
converters and the trainer's input checks all read our checkpoints through it.
"""
from __future__ import annotations

import os

import torch

from megacpt.checkpoint import format as fmt
from megacpt.checkpoint.format import CheckpointError, load_plain
from megacpt.checkpoint.source import Source
from megacpt.checkpoint.safetensors_io import SafetensorsError, SafetensorsReader
from megacpt.data.tokenizer import find_tokenizer
from megacpt.parallel import sharding


class MegacptSource(Source):
    """Our checkpoint, any layout; validates every shard's tensor list and shapes on open."""

    kind = "megacpt"
    reads_slices = True

    def __init__(self, path: str):
        self.iter_dir = fmt.resolve_iter_dir(path)
        self.path = self.iter_dir
        self.meta = fmt.read_meta(self.iter_dir)
        meta_path = os.path.join(self.iter_dir, fmt.META)
        self.cfg = fmt.config_from_meta(self.meta, meta_path)
        self.tp, self.pp = int(self.meta["layout"]["tp"]), int(self.meta["layout"]["pp"])
        self.native_tp = self.tp
        self.dp = int(self.meta["layout"].get("dp", 1))
        self.vp = int(self.meta["layout"].get("vp", 1))  # interleaved runs' virtual stages
        self.iteration = int(self.meta["iteration"])
        self.state = self.meta["state"]
        self.has_optimizer = bool(self.meta.get("has_optimizer"))
        try:
            self.dtype = getattr(torch, self.meta["dtype"])
        except AttributeError:
            raise CheckpointError(f"{meta_path}: field 'dtype' is {self.meta['dtype']!r}, "
                                  f"not a torch dtype") from None
        mcfg = self.cfg.model
        fmt.check_layout(mcfg, self.tp, self.pp, f"{meta_path} layout")
        self._stage = {n: p for p in range(self.pp)
                       for n in fmt.stage_param_names(mcfg, self.pp, p, self.vp)}
        self._model, self._optim = {}, {}
        for t in range(self.tp):
            for p in range(self.pp):
                self._open_shard(t, p)
        self.tokenizer_path = (find_tokenizer(self.iter_dir)
                               or find_tokenizer(os.path.dirname(self.iter_dir)))

    def _open_shard(self, t: int, p: int) -> None:
        d = os.path.join(self.iter_dir, fmt.shard_dirname(t, p))
        if not os.path.isdir(d):
            raise CheckpointError(f"{self.iter_dir}: shard directory {fmt.shard_dirname(t, p)} "
                                  f"is missing (layout tp{self.tp}pp{self.pp} needs "
                                  f"{self.tp * self.pp} shards)")
        mcfg = self.cfg.model
        want = fmt.stage_param_names(mcfg, self.pp, p, self.vp)
        try:
            r = SafetensorsReader(os.path.join(d, fmt.MODEL_FILE))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        missing = [n for n in want if n not in r]
        extra = [n for n in r.keys() if n not in set(want)]
        if missing or extra:
            raise CheckpointError(f"{r.path}: tensors do not match the config's model "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for n in want:
            shape = fmt.local_shape(mcfg, n, self.tp)
            if tuple(r.shape(n)) != shape:
                raise CheckpointError(f"{r.path}: tensor {n!r} has shape {tuple(r.shape(n))} "
                                      f"but the config in meta.json implies {shape} at tp{self.tp}")
        self._model[(t, p)] = r
        if self.has_optimizer:
            path = os.path.join(d, fmt.OPTIM_TENSORS)
            try:
                self._optim[(t, p)] = SafetensorsReader(path)
            except SafetensorsError as e:
                raise CheckpointError(f"{e} (meta.json says the checkpoint has optimizer "
                                      f"state)") from None

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far from all shard files (resharding reads only slices)."""
        return sum(r.bytes_read for r in list(self._model.values()) + list(self._optim.values()))

    def stage_of(self, name: str) -> int:
        try:
            return self._stage[name]
        except KeyError:
            raise CheckpointError(f"{self.iter_dir}: the model has no parameter {name!r}") from None

    def get(self, name: str) -> torch.Tensor:
        p = self.stage_of(name)
        return sharding.unshard(name, [self._model[(t, p)].get(name) for t in range(self.tp)])

    def get_shard(self, name: str, tp: int, tp_rank: int) -> torch.Tensor:
        """One tp rank's part in a tp-way layout, reading only the bytes it holds."""
        p = self.stage_of(name)
        if tp == self.tp:
            return self._model[(tp_rank, p)].get(name)
        return self._read_part([self._model[(t, p)] for t in range(self.tp)], name, name,
                               fmt.full_shape(self.cfg.model, name), tp, tp_rank)

    def _read_part(self, readers: list, key: str, name: str, full: tuple, tp: int,
                   tp_rank: int) -> torch.Tensor:
        """Part `tp_rank` of `tp` of tensor `key` (split like parameter `name`, full shape
        `full`) from the saved tp ranks' files `readers`: the ranges each saved part holds
        (`sharding.segments`) are intersected with the ranges the new part needs, and only
        the overlaps are read (safetensors slices); the pieces are joined in order."""
        dim = sharding.split_dim(sharding.shard_kind(name))
        if dim is None:
            return readers[0].get(key)
        _, want = sharding.segments(name, full[dim], tp, tp_rank)
        have = [sharding.segments(name, full[dim], self.tp, t)[1] for t in range(self.tp)]
        pieces = []
        for lo, hi in want:
            for t, ranges in enumerate(have):
                offset = 0  # where this saved range starts in rank t's part
                for slo, shi in ranges:
                    a, b = max(lo, slo), min(hi, shi)
                    if a < b:
                        pieces.append((a, readers[t].get_slice(key, dim, offset + a - slo,
                                                               offset + b - slo)))
                    offset += shi - slo
        pieces.sort(key=lambda x: x[0])
        return torch.cat([t for _, t in pieces], dim)

    def optimizer_entries(self, name: str):
        if not self.has_optimizer:
            return []
        p = self.stage_of(name)
        r = self._optim[(0, p)]
        local = fmt.local_shape(self.cfg.model, name, self.tp)
        out = []
        for k in r.keys():
            pname, _, key = k.rpartition("/")
            if pname != name:
                continue
            shape = tuple(r.shape(k))
            sharded = shape == local
            if sharded:
                shape = fmt.full_shape(self.cfg.model, name)
            out.append((key, r.dtype(k), sharded, shape))
        return out

    def optimizer_get(self, name: str, key: str) -> torch.Tensor:
        p = self.stage_of(name)
        k = f"{name}/{key}"
        parts = [self._optim[(t, p)].get(k) for t in range(self.tp)]
        if tuple(parts[0].shape) == fmt.local_shape(self.cfg.model, name, self.tp):
            return sharding.unshard(name, parts)
        return parts[0]

    def optimizer_get_shard(self, name: str, key: str, tp: int, tp_rank: int) -> torch.Tensor:
        """One tp rank's part of an optimizer state tensor, reading only its bytes."""
        p = self.stage_of(name)
        k = f"{name}/{key}"
        if tp == self.tp:
            return self._optim[(tp_rank, p)].get(k)
        readers = [self._optim[(t, p)] for t in range(self.tp)]
        if tuple(readers[0].shape(k)) != fmt.local_shape(self.cfg.model, name, self.tp):
            return readers[0].get(k)  # not split like the parameter (e.g. a scalar)
        return self._read_part(readers, k, name, fmt.full_shape(self.cfg.model, name), tp,
                               tp_rank)

    def optimizer_rest(self) -> dict:
        """The non-tensor optimizer state of every stage, merged (see `merge_rest`)."""
        if not self.has_optimizer:
            return {}
        rests = []
        for p in range(self.pp):
            path = os.path.join(self.iter_dir, fmt.shard_dirname(0, p), fmt.OPTIM_REST)
            rests.append(load_plain(path))
        return merge_rest(rests, self.iter_dir)

    def close(self) -> None:
        for r in list(self._model.values()) + list(self._optim.values()):
            r.close()


def merge_rest(rests: list[dict], where: str) -> dict:
    """Merge the non-tensor optimizer state of pipeline stages into one model-wide dict.

    Top-level values come from stage 0; "state" (per-parameter, keyed by global name) is the
    union; "param_groups" are merged group by group with "params" lists (of global names)
    concatenated. Integer parameter indices cannot be mapped between layouts and are an error.
    """
    merged = {k: v for k, v in rests[0].items() if k not in ("state", "param_groups")}
    merged["state"] = {}
    for r in rests:
        merged["state"].update(r.get("state", {}))
    if any("param_groups" in r for r in rests):
        groups = [dict(g) for g in rests[0].get("param_groups", [])]
        for g in groups:
            g["params"] = []
        for r in rests:
            rg = r.get("param_groups", [])
            if len(rg) != len(groups):
                raise CheckpointError(f"{where}: pipeline stages have different numbers of "
                                      f"optimizer param_groups ({len(rg)} vs {len(groups)})")
            for g, src in zip(groups, rg):
                params = src.get("params", [])
                if any(not isinstance(x, str) for x in params):
                    raise CheckpointError(f"{where}: optimizer param_groups list parameters by "
                                          f"index, not by global name; cannot change layout")
                g["params"].extend(params)
        merged["param_groups"] = groups
    return merged


def split_rest(rest: dict, names: list[str]) -> dict:
    """The part of a merged optimizer rest that belongs to the parameters `names`."""
    keep = set(names)
    out = {k: v for k, v in rest.items() if k not in ("state", "param_groups")}
    out["state"] = {n: v for n, v in rest.get("state", {}).items() if n in keep}
    if "param_groups" in rest:
        out["param_groups"] = [{**g, "params": [n for n in g.get("params", []) if n in keep]}
                               for g in rest["param_groups"]]
    return out
