"""Vocabulary extension of a HuggingFace BPE `tokenizer.json` (Llama 3.x, Qwen2.5: byte-level
BPE) for a new language: the planner behind `tools/extend_vocab.py` for such tokenizers.

New tokens are added as BPE **merges**, not as "added tokens". An added token is matched
literally before pre-tokenization, anywhere in the text, so it would cut words and change the
tokenization of text the source handled (and it must be mirrored in tokenizer_config.json's
`added_tokens_decoder`). A merge `(x, y) -> xy` appended after the source's merges has a
lower priority than every source merge, so BPE first finishes the source's segmentation and
only then joins adjacent source tokens: text the source tokenized keeps its tokens unless a
new token applies, and a new token's embedding initialisation from its source split is exact.

1. Train a byte-level BPE model on the target corpus with the source's normalizer and
   pre-tokenizer (`tokenizers`' BpeTrainer; `--target-vocab-size`, default 2K + 256).
2. Walk its merges in order; the merged string `t` of each is a candidate. Segment `t` with
   the current (source + already added) merges; when that gives exactly two tokens x, y,
   append the merge (x, y) and the token t with the next id (ids after every source id,
   added/special tokens included, so no existing id moves; the added tokens are also put in
   the BPE vocabulary at their ids, see `_contiguous_vocab`). Candidates that need several
   steps from current tokens are skipped (their intermediates usually come earlier in the
   target's order). Stop after K.
3. Each new token's `source_ids` are what the source model splits it into (the rows whose
   mean initialises its embedding and output rows, as for SentencePiece).
"""
from __future__ import annotations

import json

from megacpt.checkpoint.format import CheckpointError
from megacpt.data.tokenizer import byte_decoder


def _pair(m) -> tuple[str, str]:
    return tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1])


def _segment(word: str, vocab: dict, ranks: dict, ignore_merges: bool) -> list[str] | None:
    """HF BPE on one pre-token (lowest-rank adjacent pair first); None when a character is
    not in the vocabulary."""
    if ignore_merges and word in vocab:
        return [word]
    syms = list(word)
    if any(c not in vocab for c in syms):
        return None
    while len(syms) > 1:
        best = min(range(len(syms) - 1),
                   key=lambda i: ranks.get((syms[i], syms[i + 1]), float("inf")))
        if (syms[best], syms[best + 1]) not in ranks:
            break
        syms[best:best + 2] = [syms[best] + syms[best + 1]]
    return syms


def _contiguous_vocab(spec: dict, where: str) -> dict:
    """The BPE vocabulary with the added tokens in it at their ids (as GPT-2's <|endoftext|>
    is): `tokenizers` numbers added tokens absent from the model after the model's last id
    when it loads a file, so new model tokens after them would shift their ids. Added tokens
    are matched before the model sees the text, so this changes no tokenization."""
    vocab = dict(spec["model"]["vocab"])
    taken = set(vocab.values())
    for a in spec.get("added_tokens", []):
        if a["content"] not in vocab and a["id"] not in taken:
            vocab[a["content"]] = a["id"]
            taken.add(a["id"])
    ids = sorted(set(vocab.values()))
    if ids != list(range(len(ids))):
        gap = next(i for i, j in enumerate(ids) if i != j)
        raise CheckpointError(f"{where}: token ids are not contiguous (no token has id {gap}); "
                              f"new tokens cannot be appended without moving ids")
    return vocab


def _text(source, token: str) -> str:
    """A token's text for the report: its UTF-8 bytes decoded, partial characters as \\xNN."""
    if not source.is_byte_level():
        return token
    dec = byte_decoder()
    return bytes(dec[c] for c in token).decode("utf-8", "backslashreplace")


def train_target(source, texts: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """Merges of a BPE model trained on `texts` with the source's normalizer and
    pre-tokenizer, in the trainer's order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    src = source.backend
    tgt = Tokenizer(models.BPE())
    if src.normalizer is not None:
        tgt.normalizer = src.normalizer
    if src.pre_tokenizer is not None:
        tgt.pre_tokenizer = src.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if source.is_byte_level() else []
    tgt.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet))
    return [_pair(m) for m in json.loads(tgt.to_str())["model"]["merges"]]


def plan(source, texts: list[str], k: int, target_vocab_size: int | None) -> dict:
    """Steps 1-3 for the HuggingFaceTokenizer `source`: the planner's dict of
    `megacpt.checkpoint.vocab.extend_vocab` ("pieces", "tokens", "splits", "files",
    "new_vocab_size", "encode_after")."""
    spec = source.spec
    model = spec.get("model") or {}
    where = source.json_path
    if model.get("type") != "BPE":
        raise CheckpointError(f"{where}: field 'model.type' is {model.get('type')!r}; only BPE "
                              f"tokenizers (Llama 3, Qwen2.5, Mistral) can be extended")
    for field in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field):
            raise CheckpointError(f"{where}: field 'model.{field}' is {model[field]!r}, "
                                  f"expected null (not supported by the extension)")
    vocab = _contiguous_vocab(spec, where)
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    ranks = {_pair(m): i for i, m in enumerate(model["merges"])}
    ignore = bool(model.get("ignore_merges", False))
    next_id = source.vocab_size
    added: list[tuple[str, str, str]] = []  # (token, x, y)
    for a, b in train_target(source, texts, target_vocab_size or 2 * k + 256):
        if len(added) == k:
            break
        t = a + b
        if t in vocab:
            continue
        seg = _segment(t, vocab, ranks, ignore)
        if seg is None or len(seg) != 2 or (string_merges and " " in t):
            continue  # (a "x y" merge string cannot hold a space)
        ranks[tuple(seg)] = len(ranks)
        vocab[t] = next_id + len(added)
        added.append((t, *seg))
    model["vocab"] = vocab
    model["merges"] = list(model["merges"]) + [f"{x} {y}" if string_merges else [x, y]
                                               for _, x, y in added]
    data = json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8")
    after = type(source.backend).from_str(data.decode("utf-8"))
    for t, want in [(a["content"], a["id"]) for a in spec.get("added_tokens", [])] + \
            [(t, vocab[t]) for t, _, _ in added]:
        if after.token_to_id(t) != want:
            raise CheckpointError(f"{where}: the extended tokenizer gives {t!r} id "
                                  f"{after.token_to_id(t)}, expected {want} (internal error)")
    src_model = source.backend.model
    splits = [[tok.id for tok in src_model.tokenize(t)] for t, _, _ in added]
    return {"pieces": [_text(source, t) for t, _, _ in added],
            "tokens": [t for t, _, _ in added], "splits": splits,
            "files": {"tokenizer.json": data}, "new_vocab_size": next_id + len(added),
            "encode_after": lambda texts: [e.ids for e in after.encode_batch(
                texts, add_special_tokens=False)]}
