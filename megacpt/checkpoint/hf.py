"""HuggingFace LLaMA interop: read a `LlamaForCausalLM` directory as a `Source`, and export any
`Source` as one that `transformers.LlamaForCausalLM.from_pretrained` loads.

Files of a HuggingFace LLaMA directory (read and written here):

    config.json                   model_type "llama": hidden_size, intermediate_size,
                                  num_hidden_layers, num_attention_heads, num_key_value_heads,
                                  rms_norm_eps, rope_theta (or rope_parameters.rope_theta),
                                  vocab_size, max_position_embeddings, tie_word_embeddings
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                  ({"metadata": {"total_size": bytes},
                                    "weight_map": {tensor name: file name}})
    pytorch_model.bin[.index.json]   read only, with torch.load(weights_only=True)
    generation_config.json, tokenizer.model (SentencePiece), tokenizer_config.json,
    special_tokens_map.json

Tensor mapping: the `hf` and `hf_fuse` columns of the parameter table (`megacpt.params`):
one HF tensor, q/k/v fused per query group (HF_QKV) or tensors concatenated on dim 0
(HF_CAT, gate and up); vocabulary rows (`vocab_rows`) are padded with zeros on import and
cut on export. E.g. (P = model.layers.{i}.):

    embedding.weight                    <- model.embed_tokens.weight   (rows padded with zeros)
    layers.i.attention.qkv.weight       <- per-group fuse of P self_attn.{q,k,v}_proj.weight
    layers.i.mlp.gate_up.weight         <- cat[P mlp.gate_proj.weight; P mlp.up_proj.weight]
    output.weight                       <- lm_head.weight              (rows padded with zeros)

HF's q/k weights are already in the rotate-half convention our rotary uses: no permutation.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from megacpt.checkpoint.format import CheckpointError, atomic_output_dir
from megacpt.checkpoint.source import Source
from megacpt.checkpoint.safetensors_io import (SafetensorsError, SafetensorsReader,
                                               SafetensorsWriter, nbytes)
from megacpt.checkpoint.writer import progress_iter
from megacpt import params
from megacpt.config import Config, ModelConfig
from megacpt.parallel.sharding import qkv_from_separate, qkv_to_separate

_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _hf_split(cfg: ModelConfig, spec: params.ParamSpec, full: torch.Tensor) -> list:
    """Our full tensor -> the HF tensors of its row (in `spec.hf` order)."""
    if spec.vocab_rows:
        full = full[: cfg.vocab_size]
    if spec.hf_fuse == params.HF_QKV:
        return list(qkv_to_separate(full, cfg.num_attention_heads, cfg.num_query_groups))
    if spec.hf_fuse == params.HF_CAT:
        return list(full.chunk(len(spec.hf)))
    return [full]


def _hf_fuse(cfg: ModelConfig, spec: params.ParamSpec, parts: list) -> torch.Tensor:
    """The HF tensors of a row -> our full tensor (inverse of `_hf_split`)."""
    if spec.hf_fuse == params.HF_QKV:
        full = qkv_from_separate(*parts, cfg.num_attention_heads, cfg.num_query_groups)
    elif spec.hf_fuse == params.HF_CAT:
        full = torch.cat(parts)
    else:
        full = parts[0]
    if spec.vocab_rows:  # padded rows are zero
        out = full.new_zeros(cfg.padded_vocab_size, *full.shape[1:])
        out[: cfg.vocab_size] = full
        full = out
    return full


def hf_tensors(cfg: ModelConfig, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our full tensor `name` -> [(HF name, tensor)] (inverse of `HFSource.get`)."""
    return list(zip(params.hf_names(name), _hf_split(cfg, params.lookup(name)[0], full)))


def hf_shapes(cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """(HF tensor name, shape) in the order our parameters produce them."""
    out = []
    for name in params.param_names(cfg):
        meta = torch.empty(params.full_shape(cfg, name), device="meta")
        out += [(n, tuple(t.shape)) for n, t in hf_tensors(cfg, name, meta)]
    return out


def config_from_hf(hf: dict, where: str, make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> ModelConfig:
    """Our ModelConfig from a HF config.json dict; anything not LLaMA-like is an error."""
    def bad(field, value, expected):
        raise CheckpointError(f"{where}: field {field!r} is {value!r}, expected {expected} "
                              f"(only LLaMA-like models can be imported)")

    if hf.get("model_type") != "llama":
        bad("model_type", hf.get("model_type"), "'llama'")
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in arch:
        bad("architectures", arch, "['LlamaForCausalLM']")
    for field, ok in (("tie_word_embeddings", False), ("attention_bias", False),
                      ("mlp_bias", False), ("rope_scaling", None)):
        if hf.get(field, ok) not in (ok,):
            bad(field, hf.get(field), repr(ok) if ok is not None else "null")
    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", hf.get("hidden_act"), "'silu'")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        bad("rope_parameters.rope_type", rope.get("rope_type"), "'default'")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            bad(field, hf.get(field), "a positive integer")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kv_channels = None if head_dim * heads == hf["hidden_size"] else head_dim
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    try:
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads, kv_channels=kv_channels,
            vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            seq_length=min(seq_length or max_pos, max_pos), max_position_embeddings=max_pos,
            rotary_base=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_method_std=float(hf.get("initializer_range", 0.02)))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def check_tokenizer(path: str, vocab_size: int | None = None):
    """Load a SentencePiece model; a clear error when unreadable or too large."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable SentencePiece tokenizer ({e})") from None
    if vocab_size is not None and sp.get_piece_size() > vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {sp.get_piece_size()} pieces but the "
                              f"model's vocab_size is {vocab_size}")
    return sp


class HFSource(Source):
    """A HuggingFace LLaMA directory, read tensor by tensor."""

    kind = "hf"

    def __init__(self, path: str, make_vocab_size_divisible_by: int = 128,
                 seq_length: int | None = None, **_ignored):
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        try:
            hf = json.load(open(cfg_path))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable ({e})") from None
        self.hf_config = hf
        mcfg = config_from_hf(hf, cfg_path, make_vocab_size_divisible_by, seq_length)
        self.cfg = Config(model=mcfg)
        self.iteration, self.state = 0, {}
        self._files: dict = {}
        self._map = self._weight_map()
        self._names = set(self.names())
        self._check_tensors()
        self.dtype = self._dtype("model.embed_tokens.weight")
        self.cfg.training.bf16 = self.dtype == torch.bfloat16
        tok = os.path.join(path, "tokenizer.model")
        self.tokenizer_path = None
        if os.path.isfile(tok):
            check_tokenizer(tok, mcfg.vocab_size)
            self.tokenizer_path = tok

    # ----- files -----
    def _weight_map(self) -> dict[str, str]:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            ipath = os.path.join(self.path, index)
            if os.path.isfile(ipath):
                try:
                    wmap = json.load(open(ipath))["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{ipath}: unreadable or no 'weight_map' ({e})") from None
                for f in sorted(set(wmap.values())):
                    if not os.path.isfile(os.path.join(self.path, f)):
                        raise CheckpointError(f"{ipath} lists shard {f}, which is missing")
                return wmap
            spath = os.path.join(self.path, single)
            if os.path.isfile(spath):
                return {k: single for k in self._open(single).keys()}
        raise CheckpointError(f"{self.path}: no weights (expected model.safetensors, "
                              f"model.safetensors.index.json or pytorch_model*.bin)")

    def _open(self, fname: str):
        if fname not in self._files:
            path = os.path.join(self.path, fname)
            if fname.endswith(".safetensors"):
                try:
                    self._files[fname] = SafetensorsReader(path)
                except SafetensorsError as e:
                    raise CheckpointError(str(e)) from None
            else:
                self._files = {k: v for k, v in self._files.items() if k.endswith(".safetensors")}
                self._files[fname] = _TorchBin(path)
        return self._files[fname]

    def _raw(self, hf_name: str) -> torch.Tensor:
        return self._open(self._map[hf_name]).get(hf_name)

    def _dtype(self, hf_name: str) -> torch.dtype:
        return self._open(self._map[hf_name]).dtype(hf_name)

    def _check_tensors(self) -> None:
        want = dict(hf_shapes(self.cfg.model))
        for name in self._map:
            if name in want or _IGNORED.search(name):
                continue
            what = "a bias" if name.endswith(".bias") else "an unexpected tensor"
            raise CheckpointError(f"{self.path}: {self._map[name]} holds {what} {name!r}; "
                                  f"only LLaMA-like models (no biases) can be imported")
        for name, shape in want.items():
            if name not in self._map:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the "
                                      f"weights (config.json implies it)")
            have = tuple(self._open(self._map[name]).shape(name))
            if have != shape:
                raise CheckpointError(f"{self.path}/{self._map[name]}: tensor {name!r} has shape "
                                      f"{have} but config.json implies {shape}")

    # ----- tensors in our names -----
    def get(self, name: str) -> torch.Tensor:
        try:
            spec, _ = params.lookup(name)
        except params.LayoutError:
            spec = None
        if spec is None or name not in self._names:
            raise CheckpointError(f"{self.path}: the model has no parameter {name!r}")
        return _hf_fuse(self.cfg.model, spec, [self._raw(n) for n in params.hf_names(name)])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class _TorchBin:
    """A pytorch_model*.bin, loaded with weights_only=True (memory-mapped when possible)."""

    def __init__(self, path: str):
        try:
            self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            self.sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors of any kind
            raise CheckpointError(f"{path}: unreadable with weights_only=True ({e})") from None

    def keys(self):
        return list(self.sd)

    def get(self, name):
        return self.sd[name].clone()

    def shape(self, name):
        return self.sd[name].shape

    def dtype(self, name):
        return self.sd[name].dtype

    def close(self):
        self.sd = {}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, bos: int | None, eos: int | None) -> dict:
    dt = str(dtype).replace("torch.", "")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "pretraining_tp": 1, "tie_word_embeddings": False, "vocab_size": cfg.vocab_size,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None, "use_cache": True,
        "torch_dtype": dt, "dtype": dt,
    }


def _plan_shards(entries, max_shard_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for name, dtype, shape in entries:
        b = nbytes(dtype, shape)
        if cur and size + b > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dtype, shape))
        size += b
    return shards + [cur]


def export_hf(source: Source, out_dir: str, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> str:
    """Write `source` as a HuggingFace LLaMA directory (atomically); returns `out_dir`."""
    cfg = source.cfg.model
    dtype = dtype or source.dtype
    entries = [(n, dtype, s) for n, s in hf_shapes(cfg)]
    shards = _plan_shards(entries, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {n: f for f, shard in zip(files, shards) for n, _, _ in shard}
    with atomic_output_dir(out_dir) as tmp:
        shard_i, writer = -1, None
        for name in progress_iter(source.names(), progress, "exporting to HF"):
            for hf_name, t in hf_tensors(cfg, name, source.get(name)):
                i = files.index(weight_map[hf_name])
                if i != shard_i:
                    if writer is not None:
                        writer.close()
                    shard_i = i
                    writer = SafetensorsWriter(os.path.join(tmp, files[i]), shards[i],
                                               {"format": "pt"})
                writer.write(hf_name, t.to(dtype))
        writer.close()
        total = sum(nbytes(d, s) for _, d, s in entries)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        bos, eos = 1, 2
        if source.tokenizer_path:
            bos, eos = _write_tokenizer(source.tokenizer_path, tmp, cfg)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, dtype, bos, eos), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None}, f,
                      indent=2)
    return out_dir


def _write_tokenizer(path: str, out: str, cfg: ModelConfig) -> tuple[int | None, int | None]:
    sp = check_tokenizer(path, cfg.vocab_size)
    shutil.copyfile(path, os.path.join(out, "tokenizer.model"))

    def piece(i):
        return sp.id_to_piece(i) if i >= 0 else None

    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    special = {k: v for k, v in (("bos_token", piece(bos)), ("eos_token", piece(eos)),
                                 ("unk_token", piece(unk))) if v is not None}
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": bos >= 0,
                   "add_eos_token": False, "model_max_length": cfg.max_position_embeddings,
                   "clean_up_tokenization_spaces": False, "legacy": False, **special}, f,
                  indent=2)
    return (bos if bos >= 0 else None), (eos if eos >= 0 else None)
