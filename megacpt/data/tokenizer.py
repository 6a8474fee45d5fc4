"""SentencePiece (and HuggingFace tokenizer.json) wrappers with Megatron's tokenizer names.

`eod` (end of document, appended by `preprocess_data.py --append-eod`) is the model's `</s>`
id; `bos` its `<s>` id; `pad` its `<pad>` id, or `eod` when the model has no pad piece
(LLaMA2's tokenizer has none). `tokenize` never adds BOS/EOS. Pickles by model path, so
worker processes reload the model instead of shipping it.
"""
from __future__ import annotations

import os

import sentencepiece as spm


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: SentencePiece model not found "
                                    f"(--tokenizer-model expects a .model file)")
        self.model_path = model_path
        self._load()

    def _load(self) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{self.model_path}: the model has no </s> piece (eos_id = -1); "
                             f"megacpt uses it as the end-of-document id")
        self.bos = self._sp.bos_id()
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 else self.eod
        self.unk = self._sp.unk_id()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS, no EOS)."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts in one C++ call (`num_threads` threads)."""
        return self._sp.encode(texts, num_threads=num_threads)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for (bits per byte): a byte-fallback piece 1, control
        and unknown pieces 0, others their text with "\u2581" as one space byte."""
        out = []
        for i in range(self.vocab_size):
            if self._sp.is_byte(i):
                out.append(1)
            elif self._sp.is_control(i) or self._sp.is_unknown(i):
                out.append(0)
            else:
                out.append(len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        return out

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._load()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


class HuggingFaceTokenizer:
    """A HuggingFace fast tokenizer (`tokenizer.json` in a model directory: Llama 3, Qwen2.5,
    Mistral), read with the `tokenizers` package (no transformers, no torch).

    `eod` is the model's end-of-sequence token (`eos_token` of tokenizer_config.json, else
    generation_config/config.json `eos_token_id`); `tokenize` adds no special tokens.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._load()

    def _load(self) -> None:
        import json

        path = self.model_path
        tok_json = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tok_json):
            raise FileNotFoundError(f"{path}: no tokenizer.json (HuggingFaceTokenizer expects a "
                                    f"model directory or a tokenizer.json file)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers "
                              "package: pip install 'megacpt[hf]'") from None
        self._tok = Tokenizer.from_file(tok_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        folder = os.path.dirname(tok_json)
        eos = None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            token = json.load(open(cfg_path)).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            eos = self._tok.token_to_id(token) if token else None
        for name in ("generation_config.json", "config.json"):
            f = os.path.join(folder, name)
            if eos is None and os.path.isfile(f):
                ids = json.load(open(f)).get("eos_token_id")
                eos = ids[0] if isinstance(ids, list) else ids
        if eos is None:
            raise ValueError(f"{path}: no end-of-sequence token (tokenizer_config.json "
                             f"eos_token or config.json eos_token_id); megacpt uses it as the "
                             f"end-of-document id")
        self.eod = self.pad = int(eos)
        self.bos = self.unk = None

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._tok.token_to_id(piece)

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._load()


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer")


def build_tokenizer(tokenizer_type: str, model_path: str):
    """Megatron's `--tokenizer-type` names: a SentencePiece model, or HuggingFaceTokenizer
    (a tokenizer.json of Llama 3 / Qwen2.5 / Mistral)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported "
                         f"(expected one of {', '.join(TOKENIZER_TYPES)})")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(model_path)
    return SentencePieceTokenizer(model_path)
