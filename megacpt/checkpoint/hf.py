"""HuggingFace interop: read a `LlamaForCausalLM` (Llama 2, 3.0, 3.1, 3.2),
`Qwen2ForCausalLM` (Qwen2, Qwen2.5) or `MistralForCausalLM` directory as a `Source`, and export
any `Source` as one that transformers' class of its family (`ModelConfig.model_family`) loads.

Variants (from config.json): `tie_word_embeddings` (no output.weight; a stored lm_head.weight
is ignored), `rope_scaling` / `rope_parameters` of type default, linear or llama3 (others are
refused by name), `head_dim` apart from hidden/heads, Qwen2's q/k/v biases, Mistral's and
Qwen2's `sliding_window` (null, or not shorter than the sequence; else refused).

Files of a HuggingFace LLaMA directory (read and written here):

    config.json                   model_type "llama" | "qwen2" | "mistral": hidden_size, intermediate_size,
                                  num_hidden_layers, num_attention_heads, num_key_value_heads,
                                  rms_norm_eps, rope_theta (or rope_parameters.rope_theta),
                                  vocab_size, max_position_embeddings, tie_word_embeddings
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                  ({"metadata": {"total_size": bytes},
                                    "weight_map": {tensor name: file name}})
    pytorch_model.bin[.index.json]   read only, with torch.load(weights_only=True)
    generation_config.json, tokenizer.model (SentencePiece) or tokenizer.json (HF fast
    tokenizer: Llama 3, Qwen2.5), tokenizer_config.json, special_tokens_map.json; the tokenizer
    files are written by the tokenizer itself (`megacpt.data.tokenizer`, `write_hf`)

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

import torch

from megacpt.checkpoint.format import CheckpointError, atomic_output_dir
from megacpt.checkpoint.source import Source
from megacpt.checkpoint.safetensors_io import (SafetensorsError, SafetensorsReader,
                                               SafetensorsWriter, nbytes)
from megacpt.checkpoint.writer import progress_iter
from megacpt import params
from megacpt.config import Config, ModelConfig
from megacpt.data.tokenizer import find_tokenizer
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


#: model_type -> the architecture transformers builds for it
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "mistral": "MistralForCausalLM"}


def _rope_scaling(hf: dict) -> dict | None:
    """transformers' RoPE scaling of a config.json (`rope_scaling`, or the newer
    `rope_parameters`), None when there is none."""
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    out = {k: v for k, v in rs.items() if k not in ("rope_theta", "type", "rope_type")}
    return {"rope_type": kind, **out}


def config_from_hf(hf: dict, where: str, make_vocab_size_divisible_by: int = 128,
                   seq_length: int | None = None) -> ModelConfig:
    """Our ModelConfig from a HF config.json dict of a Llama (2, 3.x), Qwen2 (2.5) or Mistral
    model; anything else, or a feature we do not implement, is an error naming the field."""
    def bad(field, value, expected):
        raise CheckpointError(f"{where}: field {field!r} is {value!r}, expected {expected}")

    family = hf.get("model_type")
    if family not in HF_ARCHITECTURES:
        bad("model_type", family, " or ".join(map(repr, HF_ARCHITECTURES)))
    arch = hf.get("architectures") or [HF_ARCHITECTURES[family]]
    if HF_ARCHITECTURES[family] not in arch:
        bad("architectures", arch, f"[{HF_ARCHITECTURES[family]!r}]")
    if family == "llama":  # Llama's attention_bias also biases o_proj: not implemented
        for field in ("attention_bias", "mlp_bias"):
            if hf.get(field, False):
                bad(field, hf.get(field), "false (biases on o_proj / the MLP)")
    if hf.get("hidden_act", "silu") != "silu":
        bad("hidden_act", hf.get("hidden_act"), "'silu'")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(field), int) or hf[field] <= 0:
            bad(field, hf.get(field), "a positive integer")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    kv_channels = None if head_dim * heads == hf["hidden_size"] else head_dim
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    seq = min(seq_length or max_pos, max_pos)
    window = hf.get("sliding_window")
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2 applies it only with use_sliding_window
    if family == "llama":
        window = None
    if window is not None and window < seq:
        raise CheckpointError(f"{where}: field 'sliding_window' is {window}, shorter than the "
                              f"sequence length {seq}; megacpt attends over the whole sequence, "
                              f"so import it with --seq-length {window} or less")
    rope = hf.get("rope_parameters") or {}
    try:
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads, kv_channels=kv_channels,
            vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            seq_length=seq, max_position_embeddings=max_pos,
            rotary_base=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            add_qkv_bias=family == "qwen2", rope_scaling=_rope_scaling(hf),
            model_family=family, sliding_window=window)
    except ValueError as e:  # ConfigError: e.g. a RoPE scaling type we do not implement
        raise CheckpointError(f"{where}: {e}") from None


def check_tokenizer(path: str, vocab_size: int | None = None):
    """Load a tokenizer (SentencePiece or tokenizer.json, `load_tokenizer`); a clear error
    when unreadable or larger than the model's vocabulary."""
    from megacpt.data.tokenizer import load_tokenizer, resolve_tokenizer

    kind = "tokenizer"
    try:
        kind = {"sentencepiece": "SentencePiece tokenizer", "huggingface": "HuggingFace "
                "tokenizer"}[resolve_tokenizer(path)[0]]
        tok = load_tokenizer(path)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"{path}: unreadable {kind} ({e})") from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the "
                              f"model's vocab_size is {vocab_size} (config.json / meta.json); "
                              f"extend the model's vocabulary (tools/extend_vocab.py)")
    return tok


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
        self.tokenizer_path = find_tokenizer(path)  # tokenizer.model or tokenizer.json
        if self.tokenizer_path:
            check_tokenizer(self.tokenizer_path, mcfg.vocab_size)

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
        tied = self.cfg.model.tie_word_embeddings
        for name in self._map:
            if name in want or _IGNORED.search(name) or (tied and name == "lm_head.weight"):
                continue  # (some tied checkpoints also store the shared lm_head)
            what = "a bias" if name.endswith(".bias") else "an unexpected tensor"
            raise CheckpointError(f"{self.path}: {self._map[name]} holds {what} {name!r}, "
                                  f"which config.json does not imply (model_type "
                                  f"{self.hf_config.get('model_type')!r})")
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
    """config.json of the model's family (`cfg.model_family`): Llama, Qwen2 or Mistral."""
    dt = str(dtype).replace("torch.", "")
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rotary_base}
    out = {
        "architectures": [HF_ARCHITECTURES[cfg.model_family]], "model_type": cfg.model_family,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings, "vocab_size": cfg.vocab_size,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None, "use_cache": True,
        "torch_dtype": dt, "dtype": dt,
    }
    if cfg.model_family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif cfg.model_family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
    else:
        out.update(sliding_window=cfg.sliding_window)
    return out


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
              max_shard_bytes: int = 2 * 2**30, progress: bool = True,
              tokenizer_model: str | None = None) -> str:
    """Write `source` as a HuggingFace directory of its family (atomically), with its
    tokenizer (`tokenizer_model`, else the source's) in HF's files; returns `out_dir`."""
    cfg = source.cfg.model
    tokenizer = tokenizer_model or source.tokenizer_path
    tok = check_tokenizer(tokenizer, cfg.vocab_size) if tokenizer else None
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
        if tok is not None:  # SentencePiece: tokenizer.model + LlamaTokenizer config;
            bos, eos = tok.write_hf(tmp, cfg.max_position_embeddings)  # HF: tokenizer.json
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, dtype, bos, eos), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None}, f,
                      indent=2)
    return out_dir
