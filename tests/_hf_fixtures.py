"""Offline HuggingFace fixtures: tiny byte-level BPE `tokenizer.json`s built with the
`tokenizers` library the way Llama 3.x and Qwen2.5 ship theirs (their pre-tokenizer regexes,
special tokens appended after the BPE vocabulary, Llama 3's BOS post-processor), and tiny
random LlamaForCausalLM / Qwen2ForCausalLM directories that use them. No network."""
from __future__ import annotations

import json
import os

#: English and Chinese text the tokenizers are trained on and the tests encode
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're training models.",
    "Language models learn from text; continual pre-training adds a new language.",
    "今天天气很好，我们去公园散步吧。语言模型从大量文本中学习。",
    "机器学习是人工智能的一个分支。我们正在训练一个新的语言模型。",
    "Hello world! 你好，世界！ Numbers 12345 and symbols #@$ too.",
]
ZH_CORPUS = [  # target-language documents for vocabulary extension
    "北京是中国的首都，有很多历史悠久的名胜古迹。",
    "学生们在图书馆里认真学习，准备明天的考试。",
    "春天来了，花园里的花都开了，空气中弥漫着花香。",
    "人工智能技术正在改变我们的生活和工作方式。",
    "他每天早上六点起床，然后去公园跑步锻炼身体。",
] * 4

_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = {  # family: (regex, special tokens, bos, eos, tokenizer_class, model/config class)
    "llama3": (_LLAMA3_RE, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "PreTrainedTokenizerFast",
               ("LlamaForCausalLM", "LlamaConfig")),
    "qwen2": (_QWEN2_RE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|endoftext|>", "Qwen2Tokenizer", ("Qwen2ForCausalLM", "Qwen2Config")),
}


def build_tokenizer_json(folder: str, family: str = "llama3", vocab_size: int = 400) -> str:
    """A tiny byte-level BPE tokenizer of `family`'s shape in `folder` (tokenizer.json +
    tokenizer_config.json); returns the folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    regex, specials, bos, eos, cls, _ = FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.add_special_tokens(specials)
    if bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for t in specials}
    cfg = {"tokenizer_class": cls, "bos_token": bos, "eos_token": eos,
           "added_tokens_decoder": added, "clean_up_tokenization_spaces": False,
           "model_max_length": 64}
    if family == "qwen2":
        cfg.update(pad_token="<|endoftext|>", errors="replace", split_special_tokens=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return folder


def build_hf_model(folder: str, family: str = "llama3", vocab_size: int | None = None,
                   seed: int = 0):
    """A tiny random model of `family` (tied embeddings, GQA) saved with the tokenizer of
    `build_tokenizer_json`; returns the transformers model. The vocabulary defaults to the
    tokenizer's size for Llama 3 and to more rows than ids (512) for Qwen2, as they ship."""
    import torch
    import transformers

    from megacpt.data.tokenizer import load_tokenizer

    model_cls, config_cls = FAMILIES[family][5]
    build_tokenizer_json(folder, family)
    tok = load_tokenizer(folder)
    vocab_size = vocab_size or (tok.vocab_size if family == "llama3" else 512)
    torch.manual_seed(seed)
    extra = dict(rope_theta=500000.0) if family == "llama3" else dict(rope_theta=1000000.0)
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos, eos_token_id=tok.eod,
        **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
    model.save_pretrained(folder)
    return model
