"""Model-size registry and the one source of truth for parameter counts and FLOPs per token.

The paper's Appendix D table (42 LLaMA2 shapes, 49M ... 5534M) is registered under the name of
its parameter column ("1393M"); the public checkpoints people continue (Llama-3.2-1B/3B,
Llama-3.1-8B, Qwen2.5-0.5B/1.5B/3B/7B, Mistral-7B) under their hub names, with their
config.json values (vocabulary, tying, q/k/v biases, RoPE base and scaling, norm eps); tiny
debug sizes ("tiny", "debug-*") are for tests and the
CPU quickstart. The paper's parameter column does not follow exactly from the shapes under the
standard LLaMA2 count; `param_count` reports our own count and says what it includes.

This module does not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass

#: the paper's vocabulary (bilingual SentencePiece BPE)
PAPER_VOCAB_SIZE = 36152


@dataclass(frozen=True)
class ModelShape:
    """One registered model shape."""

    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_layers: int
    num_query_groups: int | None = None
    #: head dim when hidden_size is not a multiple of the head count (Megatron's kv_channels)
    kv_channels: int | None = None
    #: the parameter count the paper's table gives, in millions (None for debug sizes)
    paper_params_m: int | None = None
    #: the checkpoint's own vocabulary (public models); a tokenizer given to the run wins
    vocab_size: int | None = None
    #: model variant fields (public models), as in `megacpt.config.ModelConfig`
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    rotary_base: float | None = None
    norm_eps: float | None = None
    rope_scaling: tuple | None = None  # sorted (key, value) items of the HF dict (hashable)
    max_position_embeddings: int | None = None
    model_family: str | None = None
    #: HuggingFace hub id the values come from
    hf_id: str | None = None

    def variant_fields(self) -> dict:
        """ModelConfig fields beyond the shape that this registered model fixes."""
        out = {"tie_word_embeddings": self.tie_word_embeddings,
               "add_qkv_bias": self.add_qkv_bias}
        for name in ("rotary_base", "norm_eps", "model_family"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out


# params(M) hidden ffn heads layers, verbatim from the paper's Appendix D table
_PAPER_TABLE = """
49 512 3072 8 8 | 66 576 3584 9 9 | 86 640 3584 10 10 | 105 640 3584 10 13 |
125 640 3584 10 16 | 137 768 4608 12 12 | 166 768 4608 12 15 | 194 768 4608 12 18 |
208 896 5120 14 14 | 234 896 5120 14 16 | 259 896 5120 14 18 | 301 1024 5632 16 16 |
334 1024 5632 16 18 | 368 1024 5632 16 20 | 512 1280 7168 10 18 | 591 1280 7168 10 21 |
616 1408 7680 11 18 | 670 1280 7168 10 24 | 711 1408 7680 11 21 | 766 1536 8704 12 19 |
806 1408 7680 11 24 | 879 1536 8704 12 22 | 992 1536 8704 12 25 | 1085 1792 9728 14 20 |
1239 1792 9728 14 23 | 1393 1792 9728 14 26 | 1542 2048 11264 16 22 |
1736 2176 11776 17 22 | 1743 2048 11264 16 25 | 1944 2048 11264 16 28 |
1963 2176 11776 17 25 | 2112 2304 12800 18 24 | 2191 2176 11776 17 28 |
2452 2304 12800 18 28 | 2791 2304 12800 18 32 | 2808 2560 13824 20 26 |
3227 2560 13824 20 30 | 3647 2560 13824 20 34 | 4016 2688 14848 22 34 |
4248 2688 14848 21 36 | 4657 2816 15360 22 36 | 5534 3072 16896 24 36
"""


def _parse_paper_table() -> dict[str, ModelShape]:
    sizes = {}
    for entry in _PAPER_TABLE.replace("\n", " ").split("|"):
        fields = entry.split()
        if not fields:
            continue
        params, hidden, ffn, heads, layers = (int(v) for v in fields)
        # 4016M (2688 wide, 22 heads) is the one row whose width is not a multiple of its head
        # count; we keep the shape as given and use the table's usual head dim of 128
        kv = None if hidden % heads == 0 else 128
        sizes[f"{params}M"] = ModelShape(hidden, ffn, heads, layers, kv_channels=kv,
                                         paper_params_m=params)
    return sizes


PAPER_SIZES: dict[str, ModelShape] = _parse_paper_table()

DEBUG_SIZES: dict[str, ModelShape] = {
    # hidden, ffn, heads, layers, query groups
    "debug-3xs": ModelShape(16, 48, 2, 1, 2),  # the CPU demo study (examples/study_demo.yaml)
    "debug-2xs": ModelShape(32, 96, 2, 2, 2),  # the CPU demo study
    "tiny": ModelShape(64, 176, 4, 2, 2),
    "debug-xs": ModelShape(64, 176, 4, 4, 2),
    "debug-s": ModelShape(128, 352, 4, 4, 2),
    "debug-m": ModelShape(256, 688, 8, 6, 4),
    "debug-l": ModelShape(384, 1024, 6, 8, 6),
}

_LLAMA3_SCALING = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA31_SCALING = (("factor", 8.0),) + _LLAMA3_SCALING[1:]


def _llama3(hidden, ffn, heads, layers, kv, tied, scaling, hf_id, head_dim=None):
    return ModelShape(hidden, ffn, heads, layers, kv, head_dim, vocab_size=128256,
                      tie_word_embeddings=tied, rotary_base=500000.0, norm_eps=1e-5,
                      rope_scaling=scaling, max_position_embeddings=131072,
                      model_family="llama", hf_id=hf_id)


def _qwen25(hidden, ffn, heads, layers, kv, tied, vocab, hf_id):
    return ModelShape(hidden, ffn, heads, layers, kv, vocab_size=vocab,
                      tie_word_embeddings=tied, add_qkv_bias=True, rotary_base=1000000.0,
                      norm_eps=1e-6, max_position_embeddings=32768, model_family="qwen2",
                      hf_id=hf_id)


#: public checkpoints, values from their config.json (hidden, ffn, heads, layers, kv heads)
PUBLIC_SIZES: dict[str, ModelShape] = {
    "Llama-3.2-1B": _llama3(2048, 8192, 32, 16, 8, True, _LLAMA3_SCALING,
                            "meta-llama/Llama-3.2-1B", head_dim=64),
    "Llama-3.2-3B": _llama3(3072, 8192, 24, 28, 8, True, _LLAMA3_SCALING,
                            "meta-llama/Llama-3.2-3B", head_dim=128),
    "Llama-3.1-8B": _llama3(4096, 14336, 32, 32, 8, False, _LLAMA31_SCALING,
                            "meta-llama/Llama-3.1-8B", head_dim=128),
    "Qwen2.5-0.5B": _qwen25(896, 4864, 14, 24, 2, True, 151936, "Qwen/Qwen2.5-0.5B"),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 12, 28, 2, True, 151936, "Qwen/Qwen2.5-1.5B"),
    "Qwen2.5-3B": _qwen25(2048, 11008, 16, 36, 2, True, 151936, "Qwen/Qwen2.5-3B"),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, False, 152064, "Qwen/Qwen2.5-7B"),
    # v0.1 has sliding_window 4096 (imports for sequences up to 4096); v0.3 has none
    "Mistral-7B": ModelShape(4096, 14336, 32, 32, 8, vocab_size=32000, rotary_base=10000.0,
                             norm_eps=1e-5, max_position_embeddings=32768,
                             model_family="mistral", hf_id="mistralai/Mistral-7B-v0.1"),
    "Mistral-7B-v0.3": ModelShape(4096, 14336, 32, 32, 8, vocab_size=32768,
                                  rotary_base=1000000.0, norm_eps=1e-5,
                                  max_position_embeddings=32768, model_family="mistral",
                                  hf_id="mistralai/Mistral-7B-v0.3"),
}

SIZES: dict[str, ModelShape] = {**DEBUG_SIZES, **PAPER_SIZES, **PUBLIC_SIZES}


def get_size(name: str) -> ModelShape:
    """Look up a registered size; the error lists what exists."""
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(
            f"unknown --model-size {name!r}; registered sizes: {', '.join(SIZES)}"
        ) from None


def pad_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Padded vocabulary: the tokenizer's size rounded up to `divisible_by`.

    Depends only on the tokenizer and `--make-vocab-size-divisible-by`, never on the
    tensor-parallel size, so every layout holds the same model (Megatron multiplies by tp).
    """
    if vocab_size <= 0 or divisible_by <= 0:
        raise ValueError(f"vocab_size ({vocab_size}) and divisible_by ({divisible_by}) must be > 0")
    return -(-vocab_size // divisible_by) * divisible_by


def param_count(
    hidden_size: int,
    ffn_hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int | None,
    vocab_size: int,
    include_embeddings: bool = True,
    head_dim: int | None = None,
    tied: bool = False,
    qkv_bias: bool = False,
) -> int:
    """Parameters of our LLaMA-family model.

    Counts, per layer: fused QKV (hidden x (heads + 2*groups)*head_dim, plus its bias with
    `qkv_bias`), attention output projection (heads*head_dim x hidden), the three MLP matrices
    (gate, up, down: 3 x hidden x ffn) and two RMSNorm weights; plus the final RMSNorm. With
    `include_embeddings`, also the input embedding and the output layer (once when `tied`) at
    the given (pass the padded one to count what is allocated) vocabulary size.
    """
    groups = num_query_groups or num_attention_heads
    head_dim = head_dim or hidden_size // num_attention_heads
    qkv = (hidden_size + qkv_bias) * (num_attention_heads + 2 * groups) * head_dim
    proj = num_attention_heads * head_dim * hidden_size
    mlp = 3 * hidden_size * ffn_hidden_size
    per_layer = qkv + proj + mlp + 2 * hidden_size
    total = num_layers * per_layer + hidden_size
    if include_embeddings:
        total += (1 if tied else 2) * vocab_size * hidden_size
    return total


def flops_per_token(
    hidden_size: int,
    ffn_hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int | None,
    vocab_size: int,
    seq_length: int,
    causal: bool = True,
    head_dim: int | None = None,
) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6N plus the attention term.

    N is the non-embedding matmul parameters plus the output layer (the input embedding is a
    lookup, not a matmul). The attention term counts QK^T and AV: forward 2 * 2 * s * h per
    layer per token (h = heads * head_dim), halved for causal masking (the work a causal
    kernel actually does), so training adds 6 * num_layers * seq_length * h * (1 if causal
    else 2).
    """
    head_dim = head_dim or hidden_size // num_attention_heads
    n_matmul = param_count(
        hidden_size, ffn_hidden_size, num_layers, num_attention_heads, num_query_groups,
        vocab_size, include_embeddings=False, head_dim=head_dim,
    ) - (2 * num_layers + 1) * hidden_size + vocab_size * hidden_size
    attn_width = num_attention_heads * head_dim
    attn = 6 * num_layers * seq_length * attn_width * (1 if causal else 2)
    return 6.0 * n_matmul + attn
