"""Tokenizers behind one interface, with Megatron's tokenizer names: a SentencePiece `.model`
(LLaMA 2, our own `train_tokenizer.py` output) or a HuggingFace `tokenizer.json` (Llama 3.x,
Qwen2.5, Mistral: byte-level BPE read with the `tokenizers` package, no transformers).

Every tokenizer has: `vocab_size` (highest id + 1), `eod` (end of document, appended by
`preprocess_data.py --append-eod`: SentencePiece `</s>`, HF the `eos_token`), `bos` (the token
HF's own tokenizer puts in front of a text, or None), `pad` (a pad piece, else `eod`),
`tokenize` (no BOS/EOS), `tokenize_batch`, `detokenize`, `id_to_piece`, `piece_to_id`,
`token_bytes` (UTF-8 bytes per id, for bits per byte), `files()` (the files that make it up,
{name in a checkpoint or HF export: bytes}) and `write_hf(out_dir, max_len)` (the
tokenizer files of an HF export; returns (bos, eos) for config.json). `load_tokenizer(path)`
picks the kind from the path; `find_tokenizer(dir)` finds one in a checkpoint or HF directory.
Tokenizers pickle by path, so worker processes reload instead of shipping the model.
"""
from __future__ import annotations

import functools
import json
import os
import shutil

#: file names a tokenizer takes in a checkpoint or HF directory
SP_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL = "special_tokens_map.json"


class _PathPickle:
    model_path: str

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._load()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_PathPickle):
    kind = "sentencepiece"

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: SentencePiece model not found "
                                    f"(--tokenizer-model expects a .model file)")
        self.model_path = model_path
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"{self.model_path}: the model has no </s> piece (eos_id = -1); "
                             f"megacpt uses it as the end-of-document id")
        bos = self._sp.bos_id()
        self.bos = bos if bos >= 0 else None
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

    def files(self) -> dict[str, bytes]:
        """{name in a checkpoint: contents}: the model file."""
        with open(self.model_path, "rb") as f:
            return {SP_FILE: f.read()}

    def write_hf(self, out_dir: str, model_max_length: int) -> tuple[int | None, int | None]:
        """tokenizer.model + LlamaTokenizer's tokenizer_config.json and special_tokens_map."""
        shutil.copyfile(self.model_path, os.path.join(out_dir, SP_FILE))

        def piece(i):
            return self._sp.id_to_piece(i) if i is not None and i >= 0 else None

        special = {k: v for k, v in (("bos_token", piece(self.bos)),
                                     ("eos_token", piece(self.eod)),
                                     ("unk_token", piece(self.unk))) if v is not None}
        _write_json(os.path.join(out_dir, HF_SPECIAL), special)
        _write_json(os.path.join(out_dir, HF_CONFIG), {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": self.bos is not None,
            "add_eos_token": False, "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, "legacy": False, **special})
        return self.bos, self.eod


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable char -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HuggingFaceTokenizer(_PathPickle):
    """A HuggingFace fast tokenizer: `tokenizer.json` (a model directory or the file itself),
    with `tokenizer_config.json` / `special_tokens_map.json` beside it when present.

    `eod` is `eos_token` of tokenizer_config.json, else generation_config/config.json
    `eos_token_id`; `bos` is what the tokenizer's post-processor puts in front of a text
    (Llama 3's <|begin_of_text|>; none for Qwen2.5); `tokenize` adds no special tokens.
    """

    kind = "huggingface"

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._load()

    def _load(self) -> None:
        path = self.model_path
        self.json_path = os.path.join(path, HF_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(self.json_path):
            raise FileNotFoundError(f"{path}: no {HF_FILE} (HuggingFaceTokenizer expects a "
                                    f"model directory or a tokenizer.json file)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers "
                              "package: pip install 'megacpt[hf]'") from None
        try:
            self._tok = Tokenizer.from_file(self.json_path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ValueError(f"{self.json_path}: not a HuggingFace tokenizer.json ({e})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.folder = os.path.dirname(self.json_path)
        self.eod = self.pad = self._eos()
        start = self._tok.encode("", add_special_tokens=True).ids
        self.bos = start[0] if start and start[0] != self.eod else None
        self.unk = None

    def _eos(self) -> int:
        cfg = os.path.join(self.folder, HF_CONFIG)
        if os.path.isfile(cfg):
            token = _read_json(cfg).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token:
                i = self._tok.token_to_id(token)
                if i is None:
                    raise ValueError(f"{cfg}: eos_token {token!r} is not a token of "
                                     f"{self.json_path}")
                return i
        for name in ("generation_config.json", "config.json"):
            f = os.path.join(self.folder, name)
            if os.path.isfile(f):
                ids = _read_json(f).get("eos_token_id")
                if ids is not None:
                    return int(ids[0] if isinstance(ids, list) else ids)
        raise ValueError(f"{self.json_path}: no end-of-sequence token ({HF_CONFIG} eos_token "
                         f"or config.json eos_token_id beside it); megacpt uses it as the "
                         f"end-of-document id")

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself."""
        return self._tok

    @property
    def spec(self) -> dict:
        """The parsed tokenizer.json."""
        return json.loads(self._tok.to_str())

    def is_byte_level(self) -> bool:
        """Pieces are GPT-2 byte-level strings (Llama 3, Qwen2.5), not SentencePiece-style
        (Mistral): the decoder is (or contains) ByteLevel."""
        if self._tok.decoder is None:
            return False
        dec = json.loads(self._tok.decoder.__getstate__())
        parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
        return any(p.get("type") == "ByteLevel" for p in parts)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for: byte-level pieces their bytes; SentencePiece-style
        pieces (Mistral) as `SentencePieceTokenizer.token_bytes`; added/special tokens and
        unused ids 0."""
        out = [0] * self.vocab_size
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        dec = byte_decoder() if self.is_byte_level() else None
        for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
            if piece in special:
                continue
            if dec is not None:
                out[i] = sum(c in dec for c in piece) or len(piece.encode("utf-8"))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def files(self) -> dict[str, bytes]:
        """{name in a checkpoint: contents}: tokenizer.json, special_tokens_map.json when
        present, and tokenizer_config.json naming the eos (and bos) token, also when the
        source took them from config.json (a checkpoint has no HF config.json beside it)."""
        out = {}
        with open(self.json_path, "rb") as f:
            out[HF_FILE] = f.read()
        special = os.path.join(self.folder, HF_SPECIAL)
        if os.path.isfile(special):
            with open(special, "rb") as f:
                out[HF_SPECIAL] = f.read()
        cfg_path = os.path.join(self.folder, HF_CONFIG)
        cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if not cfg.get("eos_token"):
            cfg["eos_token"] = self.id_to_piece(self.eod)
        if self.bos is not None and not cfg.get("bos_token"):
            cfg["bos_token"] = self.id_to_piece(self.bos)
        if os.path.isfile(cfg_path) and cfg == _read_json(cfg_path):
            with open(cfg_path, "rb") as f:
                out[HF_CONFIG] = f.read()  # byte for byte
        else:
            out[HF_CONFIG] = json.dumps(cfg, indent=2, ensure_ascii=False).encode("utf-8")
        return out

    def write_hf(self, out_dir: str, model_max_length: int) -> tuple[int | None, int | None]:
        """tokenizer.json and its config files, so `AutoTokenizer` on the export encodes
        exactly like this tokenizer."""
        write_files(self.files(), out_dir)
        return self.bos, self.eod


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer")


def resolve_tokenizer(model_path: str, tokenizer_type: str | None = None) -> tuple[str, str]:
    """(kind "sentencepiece" | "huggingface", the tokenizer file) of `model_path` (a file, or a
    checkpoint / HF directory holding one), without loading it: of Megatron's
    `--tokenizer-type` when given, else a `.json` file is HuggingFace and anything else
    SentencePiece. Raises FileNotFoundError / ValueError naming the path and what was expected."""
    if tokenizer_type is not None and tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported "
                         f"(expected one of {', '.join(TOKENIZER_TYPES)})")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path}: file not found (expected a SentencePiece "
                                f".model, a tokenizer.json or an HF model directory)")
    if os.path.isdir(model_path):
        found = (os.path.join(model_path, HF_FILE) if tokenizer_type == "HuggingFaceTokenizer"
                 else find_tokenizer(model_path))
        if found is None or not os.path.isfile(found):
            raise FileNotFoundError(f"{model_path}: directory holds no {SP_FILE} (SentencePiece)"
                                    f" and no {HF_FILE} (HuggingFace)")
        model_path = found
    if tokenizer_type is None:
        hf = model_path.endswith(".json")
    else:
        hf = tokenizer_type == "HuggingFaceTokenizer"
    return ("huggingface" if hf else "sentencepiece"), model_path


def load_tokenizer(model_path: str, tokenizer_type: str | None = None):
    """The tokenizer at `model_path` (see `resolve_tokenizer`)."""
    kind, path = resolve_tokenizer(model_path, tokenizer_type)
    return HuggingFaceTokenizer(path) if kind == "huggingface" else SentencePieceTokenizer(path)


def build_tokenizer(tokenizer_type: str, model_path: str):
    """Megatron's `--tokenizer-type` names (kept for `preprocess_data.py`)."""
    return load_tokenizer(model_path, tokenizer_type)


def find_tokenizer(folder: str) -> str | None:
    """The tokenizer a checkpoint or HF directory carries: tokenizer.model, unless it is no
    SentencePiece model and a tokenizer.json is beside it (Llama 3 repositories may hold a
    tiktoken file of that name), else tokenizer.json; None when it has neither."""
    sp, hf = os.path.join(folder, SP_FILE), os.path.join(folder, HF_FILE)
    if os.path.isfile(sp):
        if not os.path.isfile(hf):
            return sp  # (loading it reports what is wrong with it)
        try:
            SentencePieceTokenizer(sp)
            return sp
        except ValueError:
            pass
    return hf if os.path.isfile(hf) else None


def write_files(files: dict[str, bytes], out_dir: str) -> None:
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)


def copy_tokenizer(model_path: str, out_dir: str) -> None:
    """Write the files of the tokenizer at `model_path` into `out_dir` under their standard
    names (`find_tokenizer(out_dir)` then finds it)."""
    write_files(load_tokenizer(model_path).files(), out_dir)
