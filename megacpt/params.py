"""The parameter table: the one place the model's parameters are described.

Every parameter has one row (`ParamSpec`): its global name template, full shape, how it is
split over tensor-parallel ranks, how it is initialised, its HuggingFace tensor name(s) and
its Megatron-LM key name(s). Everything that needs to know the parameter layout derives it
from here: the model's init (`megacpt.model.llama.init_weights`), the tp split rules
(`megacpt.parallel.sharding`), the checkpoint format (`megacpt.checkpoint.format`), the HF and
Megatron converters, the resharding loader. `check_layout(cfg, tp, pp)` is the one
divisibility check, `LayoutError` its one error type.

Names are global: layer indices count from 0 over the whole model, whatever the pipeline
stage, so a name means the same tensor in every layout (h hidden, d head dim, nh heads, ng
query groups, V' padded vocabulary):

| name                                   | full shape           | tp split         | init    |
|----------------------------------------|----------------------|------------------|---------|
| embedding.weight                       | [V', h]              | row (dim 0)      | normal  |
| layers.{i}.input_norm.weight           | [h]                  | replicated       | ones    |
| layers.{i}.attention.qkv.weight        | [(nh + 2 ng) d, h]   | row, by groups   | normal  |
| layers.{i}.attention.proj.weight       | [h, nh d]            | col (dim 1)      | scaled  |
| layers.{i}.post_attention_norm.weight  | [h]                  | replicated       | ones    |
| layers.{i}.mlp.gate_up.weight          | [2 ffn, h]           | each half, row   | normal  |
| layers.{i}.mlp.down.weight             | [h, ffn]             | col (dim 1)      | scaled  |
| final_norm.weight                      | [h]                  | replicated       | ones    |
| output.weight                          | [V', h]              | row (dim 0)      | normal  |

normal: N(0, init_method_std); scaled: N(0, init_method_std / sqrt(2 num_layers)).
The fused QKV rows are interleaved per query group (Megatron's layout: for each group its
nh/ng query heads, then its key head, then its value head, `d` rows each), so a contiguous
dim-0 chunk is whole groups. The fused gate-up is `cat[gate; up]` (Megatron's fc1); tp rank r
holds `cat[gate_r; up_r]`.

Adding a model variant is one row (or a `when` condition on a row). The variants in the table:

| layers.{i}.attention.qkv.bias  | [(nh + 2 ng) d] | row, by groups | zeros | when add_qkv_bias (Qwen2) |
| output.weight                  | (as above)      |                |       | when not tie_word_embeddings |

With tied embeddings and pp > 1 the last stage also holds `embedding.weight` (a copy, kept
equal by the embedding-group gradient all-reduce; `stage_param_names`).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

from megacpt.config import ConfigError, ModelConfig

# ----- tensor-parallel split kinds -----
ROW, COL, GATE_UP, REPLICATED = "row", "col", "gate_up", "replicated"
# ----- init rules -----
NORMAL, SCALED_NORMAL, ONES, ZEROS = "normal", "scaled_normal", "ones", "zeros"
# ----- how HF tensors make ours: one tensor, per-group fused q/k/v, cat on dim 0 -----
HF_ONE, HF_QKV, HF_CAT = "one", "qkv", "cat"
# ----- where a parameter lives in a pipeline -----
FIRST, LAYER, LAST = "first", "layer", "last"


class LayoutError(ConfigError):
    """A model that cannot be split in the requested tp x pp layout, or a name that is not
    a parameter of the model; the message names the field, the flag and what would fit."""


def _always(cfg: ModelConfig) -> bool:
    return True


@dataclass(frozen=True)
class ParamSpec:
    """One row of the parameter table."""

    template: str
    """Global name; layer parameters contain `{i}` (the global layer index)."""
    shape: Callable[[ModelConfig], tuple[int, ...]]
    """Full (unsharded) shape from the model config."""
    shard: str
    """Tensor-parallel split: ROW (dim 0), COL (dim 1), GATE_UP (each half of dim 0) or
    REPLICATED."""
    init: str
    """NORMAL, SCALED_NORMAL, ONES or ZEROS (see the module docstring)."""
    hf: tuple[str, ...]
    """HuggingFace tensor name(s) (with `{i}`); several are fused by `hf_fuse`."""
    hf_fuse: str = HF_ONE
    """HF_ONE (one tensor), HF_QKV (q, k, v fused per query group) or HF_CAT (cat on dim 0)."""
    megatron: tuple[str, ...] = ()
    """Megatron-Core key names (with `{i}`), preferred first, older aliases after."""
    vocab_rows: bool = False
    """Dim 0 is the padded vocabulary: other formats hold (or pad) their own row count."""
    when: Callable[[ModelConfig], bool] = _always
    """Whether the model of a config has this parameter (model variants)."""

    @property
    def stage(self) -> str:
        """LAYER for `layers.{i}.*`; FIRST / LAST for what the first / last stage holds."""
        if "{i}" in self.template:
            return LAYER
        return FIRST if self.template.startswith("embedding") else LAST

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        # an optional module prefix ("module.", "model.") is tolerated, as before
        body = re.escape(self.template).replace(r"\{i\}", r"(\d+)")
        return re.compile(rf"(?:.*\.)?{body}")


def _qkv_rows(c: ModelConfig) -> int:
    return (c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

#: The table. Order is model order within a stage (embedding, per-layer rows, final rows).
TABLE: tuple[ParamSpec, ...] = (
    ParamSpec("embedding.weight", lambda c: (c.padded_vocab_size, c.hidden_size), ROW, NORMAL,
              ("model.embed_tokens.weight",), megatron=("embedding.word_embeddings.weight",),
              vocab_rows=True),
    ParamSpec("layers.{i}.input_norm.weight", lambda c: (c.hidden_size,), REPLICATED, ONES,
              (_H + "input_layernorm.weight",),
              megatron=(_L + "self_attention.linear_qkv.layer_norm_weight",
                        _L + "input_layernorm.weight", _L + "input_norm.weight")),
    ParamSpec("layers.{i}.attention.qkv.weight", lambda c: (_qkv_rows(c), c.hidden_size), ROW,
              NORMAL, (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
                       _H + "self_attn.v_proj.weight"), HF_QKV,
              megatron=(_L + "self_attention.linear_qkv.weight",
                        _L + "self_attention.query_key_value.weight")),
    ParamSpec("layers.{i}.attention.qkv.bias", lambda c: (_qkv_rows(c),), ROW, ZEROS,
              (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias",
               _H + "self_attn.v_proj.bias"), HF_QKV,
              megatron=(_L + "self_attention.linear_qkv.bias",
                        _L + "self_attention.query_key_value.bias"),
              when=lambda c: c.add_qkv_bias),
    ParamSpec("layers.{i}.attention.proj.weight",
              lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim), COL, SCALED_NORMAL,
              (_H + "self_attn.o_proj.weight",),
              megatron=(_L + "self_attention.linear_proj.weight",
                        _L + "self_attention.dense.weight")),
    ParamSpec("layers.{i}.post_attention_norm.weight", lambda c: (c.hidden_size,), REPLICATED,
              ONES, (_H + "post_attention_layernorm.weight",),
              megatron=(_L + "mlp.linear_fc1.layer_norm_weight", _L + "pre_mlp_layernorm.weight",
                        _L + "post_attention_norm.weight",
                        _L + "post_attention_layernorm.weight")),
    ParamSpec("layers.{i}.mlp.gate_up.weight", lambda c: (2 * c.ffn_hidden_size, c.hidden_size),
              GATE_UP, NORMAL, (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), HF_CAT,
              megatron=(_L + "mlp.linear_fc1.weight", _L + "mlp.dense_h_to_4h.weight")),
    ParamSpec("layers.{i}.mlp.down.weight", lambda c: (c.hidden_size, c.ffn_hidden_size), COL,
              SCALED_NORMAL, (_H + "mlp.down_proj.weight",),
              megatron=(_L + "mlp.linear_fc2.weight", _L + "mlp.dense_4h_to_h.weight")),
    ParamSpec("final_norm.weight", lambda c: (c.hidden_size,), REPLICATED, ONES,
              ("model.norm.weight",),
              megatron=("decoder.final_layernorm.weight", "decoder.final_norm.weight")),
    ParamSpec("output.weight", lambda c: (c.padded_vocab_size, c.hidden_size), ROW, NORMAL,
              ("lm_head.weight",), megatron=("output_layer.weight",), vocab_rows=True,
              when=lambda c: not c.tie_word_embeddings),
)


# ----- looking rows up -----

def specs(cfg: ModelConfig, stage: str | None = None) -> list[ParamSpec]:
    """The rows the model of `cfg` has (optionally only those of one pipeline role)."""
    return [s for s in TABLE if s.when(cfg) and (stage is None or s.stage == stage)]


@functools.lru_cache(maxsize=4096)
def lookup(name: str) -> tuple[ParamSpec, int | None]:
    """(row, layer index or None) of a global parameter name; LayoutError if none matches."""
    for spec in TABLE:
        m = spec.pattern.fullmatch(name)
        if m:
            return spec, (int(m.group(1)) if m.groups() else None)
    raise LayoutError(f"{name!r} is not a parameter of the model (see megacpt.params.TABLE)")


def fill(template: str, layer: int | None) -> str:
    return template.replace("{i}", str(layer)) if layer is not None else template


def layer_param_names(cfg: ModelConfig, i: int) -> list[str]:
    return [fill(s.template, i) for s in specs(cfg, LAYER)]


def stage_layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    """Layers of stage `pp_rank` out of `pp`: contiguous, sizes differ by at most one
    (uneven splits: earlier stages get one more)."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def check_virtual_split(num_layers: int, pp: int, vp: int) -> None:
    """Interleaving needs num_layers = pp x vp x (layers per virtual stage) (as Megatron)."""
    if vp > 1 and num_layers % (pp * vp):
        raise LayoutError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
            f"x {vp} virtual stages: interleaving needs equal model chunks (as Megatron); "
            f"change --num-layers-per-virtual-pipeline-stage or run without virtual stages "
            f"(plain pipelines split uneven layer counts)")


def virtual_stage_layers(num_layers: int, pp: int, vp: int, pp_rank: int) -> list[range]:
    """Megatron's layer assignment: with L = num_layers / (pp vp) layers per virtual stage,
    chunk v of rank p holds layers [(v pp + p) L, (v pp + p + 1) L): virtual stage v pp + p of
    the pp vp stages in model order. vp = 1: the contiguous `stage_layer_range`."""
    if vp == 1:
        return [stage_layer_range(num_layers, pp, pp_rank)]
    check_virtual_split(num_layers, pp, vp)
    n = num_layers // (pp * vp)
    return [range((v * pp + pp_rank) * n, (v * pp + pp_rank + 1) * n) for v in range(vp)]


def stage_param_names(cfg: ModelConfig, pp: int, pp_rank: int, vp: int = 1) -> list[str]:
    """The global names one pipeline rank holds: all its model chunks (`vp` virtual stages per
    rank), in the order the chunks run."""
    names = [s.template for s in specs(cfg, FIRST)] if pp_rank == 0 else []
    for chunk in virtual_stage_layers(cfg.num_layers, pp, vp, pp_rank):
        for i in chunk:
            names += layer_param_names(cfg, i)
    if pp_rank == pp - 1:
        names += [s.template for s in specs(cfg, LAST)]
        if pp > 1 and cfg.tie_word_embeddings:  # the last stage's copy of the tied embedding
            names = [s.template for s in specs(cfg, FIRST)] + names
    return names


def param_names(cfg: ModelConfig) -> list[str]:
    """Every global parameter name, in model order (embedding, layers, final norm, output)."""
    return stage_param_names(cfg, 1, 0)


def shard_kind(name: str) -> str:
    return lookup(name)[0].shard


def full_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of the full (unsharded) tensor of a parameter."""
    return tuple(lookup(name)[0].shape(cfg))


def split_dim(kind: str) -> int | None:
    """The dim a split kind divides over tp ranks (None: replicated)."""
    return {ROW: 0, GATE_UP: 0, COL: 1}.get(kind)


def local_shape(cfg: ModelConfig, name: str, tp: int) -> tuple[int, ...]:
    """Shape of one tp rank's shard."""
    shape = list(full_shape(cfg, name))
    dim = split_dim(shard_kind(name))
    if dim is not None:
        shape[dim] //= tp
    return tuple(shape)


def init_std(cfg: ModelConfig, name: str) -> float | None:
    """Std of the normal init of a parameter, None for constant inits (`init_constant`)."""
    rule = lookup(name)[0].init
    if rule == NORMAL:
        return cfg.init_method_std
    if rule == SCALED_NORMAL:
        return cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    return None


def init_constant(name: str) -> float:
    return {ONES: 1.0, ZEROS: 0.0}[lookup(name)[0].init]


def hf_names(name: str) -> list[str]:
    """The HuggingFace tensor name(s) parameter `name` is made of."""
    spec, i = lookup(name)
    return [fill(t, i) for t in spec.hf]


def megatron_keys(name: str) -> list[str]:
    """Megatron-Core key names of parameter `name` (preferred first, aliases after)."""
    spec, i = lookup(name)
    return [fill(t, i) for t in spec.megatron]


# ----- the one layout check -----

def check_layout(cfg: ModelConfig, tp: int, pp: int, sequence_parallel: bool = False,
                 what: str = "layout") -> None:
    """Raise LayoutError unless the model splits tp x pp (the message says what to change)."""
    where = f"{what} tp{tp}pp{pp}"
    if tp < 1 or pp < 1:
        raise LayoutError(f"{where}: tensor/pipeline parallel sizes must be >= 1")
    checks = [(cfg.num_attention_heads, "num_attention_heads (--num-attention-heads)"),
              (cfg.num_query_groups, "num_query_groups (--num-query-groups)"),
              (cfg.ffn_hidden_size, "ffn_hidden_size (--ffn-hidden-size)"),
              (cfg.padded_vocab_size,
               "the padded vocabulary (--make-vocab-size-divisible-by)")]
    for spec in specs(cfg):  # every split dim, whatever rows variants add
        dim = split_dim(spec.shard)
        if dim is not None:
            checks.append((spec.shape(cfg)[dim] // (2 if spec.shard == GATE_UP else 1),
                           f"dim {dim} of {spec.template}"))
    for value, field in checks:
        if value % tp:
            raise LayoutError(f"{where}: the model's {field} = {value} is not divisible by "
                              f"tensor-parallel size {tp} (--tensor-model-parallel-size); "
                              f"choose a tensor-parallel size that divides it")
    if sequence_parallel and cfg.seq_length % tp:
        raise LayoutError(f"{where}: --seq-length {cfg.seq_length} must be divisible by "
                          f"--tensor-model-parallel-size {tp} with --sequence-parallel")
    if cfg.num_layers < pp:
        raise LayoutError(f"{where}: the model has {cfg.num_layers} layers (--num-layers), "
                          f"fewer than pipeline-parallel size {pp} "
                          f"(--pipeline-model-parallel-size)")
