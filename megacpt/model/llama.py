"""LLaMA2 decoder written like single-device code; parallelism comes from the layers it uses.

Pre-norm RMSNorm, rotary embeddings (rotate-half; base and optional llama3/linear frequency
scaling from the config), grouped-query attention with a fused per-group QKV projection
(optional q/k/v biases, Qwen2), SwiGLU MLP with a fused gate-up projection, and an output
layer that is its own weight or, with `tie_word_embeddings`, the input embedding's.
Activations inside the stack are `[s, b, h]` (`[s/tp, b, h]` with sequence parallelism). Parameter names are global and listed in the table in `megacpt.params`.

A pipeline stage holds the layers `ctx.stage_layers(num_layers)`; the first stage also holds
the embedding, the last the final norm and output layer. With virtual stages (ctx.vp > 1) a
rank holds vp model chunks (`ctx.chunk_layers`) and `forward(x, labels, chunk=v)` runs chunk
v only: the embedding before chunk 0 of the first rank, the head after the last chunk of the
last rank. With tied embeddings and pp > 1 the
last stage also holds `embedding.weight` (a copy with the same name, init and updates: its
gradient is summed with the first stage's over `ctx.embedding_group` before the dp reduction,
see `megacpt.parallel.grads`). `forward(x, labels)` takes token
ids `[b, s]` on the first stage or the previous stage's hidden states otherwise, and returns
hidden states (not last stage), per-token loss `[b, s]` (labels given) or logits
`[b, s, vocab_size]` (no labels; gathered over tp, vocabulary padding removed).
"""
from __future__ import annotations

import logging

import torch
import torch.utils.checkpoint
from torch import nn

from megacpt import kernels, params  # kernels imports no triton until a kernel runs
from megacpt.config import ModelConfig
from megacpt.model.attention import attention, resolve_backend, rotary_tables
from megacpt.parallel import comm, sharding
from megacpt.parallel.context import ParallelContext
from megacpt.parallel.cross_entropy import chunked_lm_head_loss, vocab_parallel_cross_entropy
from megacpt.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

log = logging.getLogger(__name__)


def resolve_use_kernels(requested: bool | None, device: torch.device) -> bool:
    """Whether the Triton kernels run: on by default on CUDA when they can; an error if asked
    for where they can't (the message says why)."""
    ok, why = kernels.kernels_available(device)
    if requested is None:
        return ok and device.type == "cuda"
    if requested and not ok:
        raise RuntimeError(f"--use-kernels was requested but the Triton kernels can't run on "
                           f"{device}: {why}")
    return bool(requested)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, use_kernels: bool, sequence_parallel: bool,
                 dtype, device):
        super().__init__()
        self.eps, self.use_kernels = eps, use_kernels
        self._norm = kernels.rms_norm if use_kernels else kernels.rms_norm_ref
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))
        # grads of a norm weight under sequence parallelism are partial over tp ranks
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x):
        return self._norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, use_kernels: bool,
                 dtype, device):
        super().__init__()
        # QKV split + rotary: one Triton kernel, or the same in plain torch
        self._qkv_rope = kernels.qkv_rope if use_kernels else kernels.qkv_rope_ref
        tp, sp = ctx.tp, ctx.sequence_parallel
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_query_groups // tp  # local query groups
        self.per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.backend = backend
        qkv_out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, ctx.tp_group, sp,
                                        dtype=dtype, device=device, bias=cfg.add_qkv_bias)
        self.proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size,
                                      ctx.tp_group, sp, dtype=dtype, device=device)

    def forward(self, x, cos, sin):  # x: [s(/tp), b, h]
        qkv = self.qkv(x)  # [s, b, ng_l * (per + 2) * d]
        s, b = qkv.shape[:2]
        # q [b, s, nh_l, d], k/v [b, s, ng_l, d]; q and k rotated
        q, k, v = self._qkv_rope(qkv, cos, sin, self.groups, self.per_group, self.head_dim)
        out = attention(q, k, v, self.backend)  # [b, s, nh_l, d]
        out = out.transpose(0, 1).reshape(s, b, -1)  # [s, b, nh_l * d]
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, use_kernels: bool, dtype, device):
        super().__init__()
        sp = ctx.sequence_parallel
        self.use_kernels = use_kernels
        self._act = kernels.swiglu_fused if use_kernels else kernels.swiglu_fused_ref
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size,
                                            ctx.tp_group, sp, dtype=dtype, device=device)
        self.down = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, ctx.tp_group, sp,
                                      dtype=dtype, device=device)

    def forward(self, x):  # x: [s(/tp), b, h]
        y = self.gate_up(x)  # [s, b, 2 ffn/tp] = [gate_r | up_r]
        y = self._act(y)  # [s, b, ffn/tp]
        return self.down(y)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, use_kernels: bool,
                 dtype, device):
        super().__init__()
        sp = ctx.sequence_parallel
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, use_kernels, sp, dtype, device)
        self.attention = Attention(cfg, ctx, backend, use_kernels, dtype, device)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, use_kernels, sp,
                                           dtype, device)
        self.mlp = MLP(cfg, ctx, use_kernels, dtype, device)

    def forward(self, x, cos, sin):  # [s(/tp), b, h]
        x = x + self.attention(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attention_norm(x))


class LlamaModel(nn.Module):
    """One pipeline stage of the LLaMA2 decoder (the whole model when pp = 1)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None,
                 dtype: torch.dtype = torch.float32, device=None, seed: int | None = 1234):
        super().__init__()
        ctx = ctx or ParallelContext.single(device)
        device = torch.device(device) if device is not None else ctx.device
        ctx.check_model(cfg)
        self.cfg, self.ctx = cfg, ctx
        self.backend = resolve_backend(cfg.attention_backend, device, dtype)
        self.use_kernels = resolve_use_kernels(cfg.use_kernels, device)
        self.pre_process, self.post_process = ctx.is_first_stage, ctx.is_last_stage
        sp, tpg = ctx.sequence_parallel, ctx.tp_group
        tied = cfg.tie_word_embeddings
        if self.pre_process or (self.post_process and tied):
            self.embedding = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, tpg,
                                                    sp, dtype=dtype, device=device)
        # compiled layers get inductor's fused code instead of the Triton kernels
        layer_kernels = self.use_kernels and not cfg.compile
        self.chunks = ctx.chunk_layers(cfg.num_layers)  # global layer indices per model chunk
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, ctx, self.backend, layer_kernels, dtype, device)
            for i in ctx.stage_layers(cfg.num_layers)})
        if cfg.compile:
            for layer in self.layers.values():
                layer.compile()  # in place: parameter names stay as they are
        if self.post_process:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, self.use_kernels, sp,
                                      dtype, device)
            self.output = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, tpg, sp,
                                               dtype=dtype, device=device,
                                               skip_weight_param_allocation=tied)
        cos, sin = rotary_tables(cfg.max_position_embeddings, cfg.head_dim, cfg.rotary_base,
                                 device, scaling=cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if seed is not None:
            init_weights(self, seed)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head's weight shard [v/tp, h]: its own, or the tied embedding's."""
        return self.embedding.weight if self.cfg.tie_word_embeddings else self.output.weight

    def describe(self) -> str:
        """One line saying what runs: layout, attention backend, kernels."""
        chunk = self.cfg.cross_entropy_chunk_tokens
        return (f"LLaMA {self.cfg.name or ''} layers {list(self.layers)[0]}-"
                f"{list(self.layers)[-1]} on {self.ctx.layout}, attention={self.backend}, "
                f"triton kernels={'on' if self.use_kernels else 'off'}, "
                f"compiled layers={'on' if self.cfg.compile else 'off'}, LM-head loss "
                f"{f'in chunks of {chunk} tokens' if chunk else 'whole'}")

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                chunk: int | None = None) -> torch.Tensor:
        """Run model chunk `chunk` of this rank (None: all of its layers, vp = 1 only)."""
        if chunk is None and len(self.chunks) > 1:
            raise ValueError("a rank with virtual pipeline stages runs one chunk at a time: "
                             "pass chunk=")
        v = 0 if chunk is None else chunk
        if self.pre_process and v == 0:
            x = self.embedding(x)  # [b, s] -> [s(/tp), b, h]
        s = x.shape[0] * (self.ctx.tp if self.ctx.sequence_parallel else 1)
        if s > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {s} tokens is longer than max_position_embeddings "
                             f"{self.rope_cos.shape[0]}")
        if self.cfg.sliding_window is not None and s > self.cfg.sliding_window:
            raise ValueError(f"sequence of {s} tokens is longer than the model's sliding_window "
                             f"{self.cfg.sliding_window} (attention here is full causal)")
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for i in self.chunks[v]:
            layer = self.layers[str(i)]
            if self.cfg.recompute_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        if not self.post_process or v != len(self.chunks) - 1:
            return x
        x = self.final_norm(x)
        if labels is not None and self.cfg.cross_entropy_chunk_tokens:
            return self._chunked_loss(x, labels)  # [b, s], no whole logits
        logits = self.output(x, self.output_weight)  # [s, b, v/tp]
        if labels is not None:
            # with the kernels, the loss's gradient is written into the logits' memory
            loss = vocab_parallel_cross_entropy(logits, labels.t(), self.ctx.tp_group,
                                                self.cfg.vocab_size, self.use_kernels)  # [s, b]
            return loss.t()  # [b, s]
        logits = comm.gather_from_tp(logits, self.ctx.tp_group)  # [s, b, V_padded]
        return logits.transpose(0, 1)[..., : self.cfg.vocab_size]  # [b, s, V]

    def _chunked_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] of the LM head run cross_entropy_chunk_tokens rows at a time."""
        x = self.output.gather_input(x)  # [s(/tp), b, h] -> [s, b, h]
        s, b, h = x.shape
        loss = chunked_lm_head_loss(x.reshape(s * b, h), self.output_weight,
                                    labels.t().reshape(s * b), self.ctx.tp_group,
                                    self.cfg.vocab_size, self.cfg.cross_entropy_chunk_tokens,
                                    self.use_kernels)  # [s * b]
        return loss.view(s, b).t()  # [b, s]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Layout-independent init by the rule in the parameter table (`megacpt.params`): each
    full tensor is drawn from a generator seeded by the run seed and the parameter's global
    name, then this rank keeps its shard; constant rules (norms: ones) are filled."""
    cfg, ctx = model.cfg, model.ctx
    for name, p in model.named_parameters():
        std = params.init_std(cfg, name)
        if std is None:
            p.fill_(params.init_constant(name))
            continue
        gen_device = p.device if p.device.type == "cuda" else "cpu"
        gen = torch.Generator(device=gen_device).manual_seed(sharding.param_seed(seed, name))
        shape = sharding.full_shape(name, p.shape, ctx.tp)
        full = torch.empty(shape, dtype=torch.float32, device=gen_device).normal_(
            0.0, std, generator=gen)
        p.copy_(sharding.shard(name, full, ctx.tp_rank, ctx.tp))
