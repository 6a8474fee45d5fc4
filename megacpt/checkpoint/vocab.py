"""Vocabulary extension for a new language (`tools/extend_vocab.py`).

1. Train a SentencePiece model of the source's type and normalisation on the target corpus
   (JSON lines, `--json-keys`, default `text`).
2. Select up to K of its NORMAL pieces the source lacks, in the target model's order, new
   single characters first (BPE merges start from characters, so a multi-character piece is
   only reachable when its characters and intermediate pieces exist).
3. Append them to the source tokenizer (`append_pieces`): existing ids and pieces
   do not change; new ids are V, V+1, ... For BPE the new scores sit below every source
   score (source merges keep priority; the target order is kept among new pieces); for
   unigram they keep their target log-probabilities.
4. Grow the embedding and output layers to the new vocabulary (padded to
   make_vocab_size_divisible_by; padded rows zero). Row V+j is the mean of the source rows of
   the pieces the SOURCE tokenizer splits piece j into (FOCUS / CLP-Transfer style
   initialisation), each layer from its own matrix.
5. Write a weights-only checkpoint (iteration 0) with the merged `tokenizer.model` and
   `vocab_extension.json`:

       {"source_vocab_size": V, "new_vocab_size": V + k, "new_pieces": k,
        "pieces": [{"id": int, "piece": str, "source_ids": [int, ...]}, ...],
        "tokens_per_char": {"before": float, "after": float}, "target_chars": int}

Continual pre-training then starts with `--init-from OUT --tokenizer-model OUT/tokenizer.model`.

A HuggingFace `tokenizer.json` (Llama 3.x, Qwen2.5) is extended by `vocab_bpe.plan` instead
(new tokens as BPE merges after the source's; see there why not added tokens); steps 4-5 are
the same, with OUT/tokenizer.json (and the source's tokenizer_config.json) in the checkpoint:
`--tokenizer-model OUT/tokenizer.json`. Its model may have more rows than tokenizer ids
(Qwen2.5); new ids then take unused rows first and the model grows only when needed.

The SentencePiece `.model` file (owned here for reading and extending) is a protobuf
`sentencepiece.ModelProto` (sentencepiece_model.proto), edited without the protobuf package:

    ModelProto      1: repeated SentencePiece pieces   2: TrainerSpec   3: NormalizerSpec
    SentencePiece   1: string piece   2: float score   3: Type (1 NORMAL, 2 UNKNOWN,
                    3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE)
    TrainerSpec     3: model_type (1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR)  4: vocab_size
                    20: max_sentencepiece_length  22: split_by_whitespace
                    24: treat_whitespace_as_suffix  25: split_digits
                    26: allow_whitespace_only_pieces  35: byte_fallback
    NormalizerSpec  1: name  3: add_dummy_prefix  4: remove_extra_whitespaces

Only the wire format is needed: fields are (key varint = number << 3 | wire type, value)
records, and a repeated field may continue anywhere in a message, so appending encoded
`pieces` records to the end of the file appends pieces to the vocabulary with ids after the
existing ones; nothing else in the model changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import struct
import sys
import time

import torch

from megacpt.checkpoint.format import CheckpointError
from megacpt.params import LayoutError
from megacpt.checkpoint.registry import open_source
from megacpt.checkpoint.writer import write_checkpoint

log = logging.getLogger(__name__)


# ----- the SentencePiece model file (protobuf wire format) -----

MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
NORMAL = 1


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        result |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return result, i
        shift += 7


def iter_fields(buf: bytes):
    """Yield (field number, wire type, value) of one message: ints for varints, bytes else."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i)
        elif wt == 1:
            value, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wt == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} (field {field})")
        if i > len(buf):
            raise ValueError(f"truncated field {field}")
        yield field, wt, value


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def encode_piece(piece: str, score: float, type_: int = NORMAL) -> bytes:
    """One `ModelProto.pieces` record (field 1 of ModelProto)."""
    msg = (_len_field(1, piece.encode("utf-8"))
           + _encode_varint(2 << 3 | 5) + struct.pack("<f", score)
           + _encode_varint(3 << 3 | 0) + _encode_varint(type_))
    return _len_field(1, msg)


def append_pieces(model: bytes, pieces: list[tuple[str, float]]) -> bytes:
    """The model with NORMAL `pieces` (piece, score) appended (ids continue after the end)."""
    return model + b"".join(encode_piece(p, s) for p, s in pieces)


def read_spec(model: bytes) -> dict:
    """The trainer/normalizer settings a compatible target tokenizer should be trained with."""
    spec = {"model_type": "unigram", "vocab_size": None, "max_sentencepiece_length": 16,
            "split_by_whitespace": True, "treat_whitespace_as_suffix": False,
            "split_digits": False, "allow_whitespace_only_pieces": False,
            "byte_fallback": False, "normalization_rule_name": "nmt_nfkc",
            "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    trainer_fields = {3: "model_type", 4: "vocab_size", 20: "max_sentencepiece_length",
                      22: "split_by_whitespace", 24: "treat_whitespace_as_suffix",
                      25: "split_digits", 26: "allow_whitespace_only_pieces",
                      35: "byte_fallback"}
    for field, wt, value in iter_fields(model):
        if field == 2 and wt == 2:
            for f, w, v in iter_fields(value):
                if f in trainer_fields and w == 0:
                    name = trainer_fields[f]
                    spec[name] = MODEL_TYPES.get(v, str(v)) if name == "model_type" else (
                        v if name in ("vocab_size", "max_sentencepiece_length") else bool(v))
        elif field == 3 and wt == 2:
            for f, w, v in iter_fields(value):
                if f == 1 and w == 2:
                    spec["normalization_rule_name"] = v.decode("utf-8")
                elif f == 3 and w == 0:
                    spec["add_dummy_prefix"] = bool(v)
                elif f == 4 and w == 0:
                    spec["remove_extra_whitespaces"] = bool(v)
    return spec


# ----- vocabulary extension -----

def read_corpus(path: str, keys: list[str]) -> list[str]:
    """Texts of a corpus file, glob or directory (JSON lines, text or Parquet, compressed or
    not: `megacpt.data.corpus`)."""
    from megacpt.data.corpus import CorpusError, expand_inputs, iter_documents
    from megacpt.data.jsonl import BadLine

    try:
        texts = [t for cf in expand_inputs([path]) for ts in iter_documents(cf, keys)
                 for t in ts if t]
    except (OSError, BadLine, CorpusError) as e:
        raise CheckpointError(f"--corpus: {e}") from None
    if not texts:
        raise CheckpointError(f"--corpus {path}: no text under keys {keys}")
    return texts


def load_sp(path: str):
    import sentencepiece as spm

    try:
        data = open(path, "rb").read()
        return spm.SentencePieceProcessor(model_proto=data), data
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"--tokenizer-model {path}: unreadable SentencePiece model "
                              f"({e})") from None


def train_target(texts: list[str], spec: dict, vocab_size: int, seed: int = 1234):
    """A SentencePiece model trained on `texts` with the source model's settings."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.set_random_generator_seed(seed)
    kinds = ("unigram", "bpe")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type=spec["model_type"] if spec["model_type"] in kinds else "bpe",
            character_coverage=1.0, byte_fallback=False, split_digits=spec["split_digits"],
            max_sentencepiece_length=spec["max_sentencepiece_length"],
            split_by_whitespace=spec["split_by_whitespace"],
            treat_whitespace_as_suffix=spec["treat_whitespace_as_suffix"],
            allow_whitespace_only_pieces=spec["allow_whitespace_only_pieces"],
            normalization_rule_name=spec["normalization_rule_name"],
            add_dummy_prefix=spec["add_dummy_prefix"],
            remove_extra_whitespaces=spec["remove_extra_whitespaces"],
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise CheckpointError(f"training target-language pieces failed: {e}") from None
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


def _normal_id(sp, piece: str) -> int | None:
    """Id of a NORMAL/user-defined piece of `sp`, else None."""
    i = sp.piece_to_id(piece)
    if i == sp.unk_id() and piece != sp.id_to_piece(i):
        return None
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i):
        return None
    return i


def select_new_pieces(target, source, k: int) -> list[tuple[str, float]]:
    """Up to k (piece, target score) the source lacks: new characters first, then the rest
    in the target model's order."""
    new = [(target.id_to_piece(i), target.get_score(i)) for i in range(target.get_piece_size())
           if not (target.is_control(i) or target.is_unknown(i) or target.is_unused(i)
                   or target.is_byte(i))
           and _normal_id(source, target.id_to_piece(i)) is None]
    chars = [p for p in new if len(p[0]) == 1]
    longer = [p for p in new if len(p[0]) > 1]
    return (chars + longer)[:k]


def merged_pieces(source, spec: dict, picked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Scores for the appended pieces (see the module docstring, step 3)."""
    if spec["model_type"] != "bpe":
        return picked
    low = min(source.get_score(i) for i in range(source.get_piece_size()))
    return [(p, low - 1.0 - j) for j, (p, _) in enumerate(picked)]


def source_split(source, spec: dict, piece: str) -> list[int]:
    """The source ids the source tokenizer turns the text of `piece` into."""
    syms: list[list[int]] = []  # per character: its id, or byte / unk fallback ids
    for ch in piece:
        i = _normal_id(source, ch)
        if i is not None:
            syms.append([i])
        elif spec["byte_fallback"]:
            syms.append([source.piece_to_id(f"<0x{b:02X}>") for b in ch.encode("utf-8")])
        else:
            syms.append([source.unk_id()])
    if spec["model_type"] == "bpe":
        return _bpe_merge(source, piece, syms)
    return _viterbi(source, piece, syms)


def _bpe_merge(source, piece: str, syms: list[list[int]]) -> list[int]:
    """SentencePiece BPE: merge the adjacent pair whose union is a piece of highest score."""
    spans = [(i, i + 1) for i in range(len(piece))]
    while True:
        best, best_score = None, -math.inf
        for j in range(len(spans) - 1):
            i = _normal_id(source, piece[spans[j][0]:spans[j + 1][1]])
            if i is not None and source.get_score(i) > best_score:
                best, best_score = j, source.get_score(i)
        if best is None:
            break
        spans[best:best + 2] = [(spans[best][0], spans[best + 1][1])]
    out = []
    for a, b in spans:
        out += syms[a] if b - a == 1 else [_normal_id(source, piece[a:b])]
    return out


def _viterbi(source, piece: str, syms: list[list[int]]) -> list[int]:
    """Unigram: the highest-scoring segmentation into source pieces (unknown chars fall back)."""
    n, unk_score = len(piece), min(source.get_score(i) for i in range(source.get_piece_size()))
    best = [(-math.inf, None)] * (n + 1)
    best[0] = (0.0, None)
    for end in range(1, n + 1):
        for start in range(max(0, end - 16), end):
            i = _normal_id(source, piece[start:end])
            score = source.get_score(i) if i is not None else (
                unk_score - 10.0 if end - start == 1 else None)
            if score is not None and best[start][0] + score > best[end][0]:
                best[end] = (best[start][0] + score, (start, i))
    out, end = [], n
    while end > 0:
        start, i = best[end][1]
        out[:0] = [i] if i is not None else syms[start]
        end = start
    return out


def tokens_per_char(ids: list[list[int]], texts: list[str]) -> float:
    return sum(len(x) for x in ids) / max(1, sum(len(t) for t in texts))


def plan_sentencepiece(tokenizer, texts: list[str], k: int,
                       target_vocab_size: int | None, seed: int = 1234) -> dict:
    """Steps 1-3 for a SentencePiece tokenizer (the planner's dict: see `extend_vocab`)."""
    import sentencepiece as spm

    source_sp, source_bytes = load_sp(tokenizer.model_path)
    spec = read_spec(source_bytes)
    target = train_target(texts, spec, target_vocab_size or 2 * k + 256, seed)
    picked = select_new_pieces(target, source_sp, k)
    merged_bytes = append_pieces(source_bytes, merged_pieces(source_sp, spec, picked))
    merged = spm.SentencePieceProcessor(model_proto=merged_bytes)
    return {"pieces": [p for p, _ in picked], "tokens": [p for p, _ in picked],
            "splits": [source_split(source_sp, spec, p) for p, _ in picked],
            "files": {"tokenizer.model": merged_bytes}, "exact_model_vocab": True,
            "new_vocab_size": merged.get_piece_size(), "encode_after": merged.encode}


def _load_source_tokenizer(path: str):
    from megacpt.data.tokenizer import load_tokenizer, resolve_tokenizer

    try:
        kind, file = resolve_tokenizer(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--tokenizer-model {path}: {e}") from None
    if kind == "sentencepiece":
        load_sp(file)  # (its own message for an unreadable file)
    try:
        return load_tokenizer(path)
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"--tokenizer-model {path}: {e}") from None


def extend_vocab(tokenizer_model: str, corpus: str, new_pieces: int, load: str, save_dir: str,
                 json_keys: tuple[str, ...] = ("text",), target_vocab_size: int | None = None,
                 tp: int = 1, pp: int = 1, seed: int = 1234, progress: bool = True,
                 **source_options) -> dict:
    """Run steps 1-5 of the module docstring; returns the vocab_extension.json report.

    The tokenizer's kind picks the planner (SentencePiece here, HF BPE `vocab_bpe.plan`); a
    planner returns {"pieces" (text), "tokens" (as stored), "splits" (source ids per new
    token), "files" (tokenizer files to write), "new_vocab_size", "encode_after"}.
    """
    from megacpt.checkpoint import vocab_bpe

    if new_pieces < 1:
        raise CheckpointError(f"--new-pieces must be >= 1, got {new_pieces}")
    tok = _load_source_tokenizer(tokenizer_model)
    texts = read_corpus(corpus, list(json_keys))
    if tok.kind == "huggingface":
        plan, method = vocab_bpe.plan(tok, texts, new_pieces, target_vocab_size), "bpe-merges"
    else:
        plan = plan_sentencepiece(tok, texts, new_pieces, target_vocab_size, seed)
        method = "sentencepiece-pieces"
    k = len(plan["pieces"])
    if k < new_pieces:
        log.warning("only %d new pieces found (asked for %d): give a larger "
                    "--target-vocab-size or more target-language text", k, new_pieces)
    v_old, splits = tok.vocab_size, plan["splits"]
    report = {"source_vocab_size": v_old, "new_vocab_size": plan["new_vocab_size"],
              "new_pieces": k, "method": method,
              "pieces": [{"id": v_old + j, "piece": p, "token": t, "source_ids": s}
                         for j, (p, t, s) in enumerate(zip(plan["pieces"], plan["tokens"],
                                                           splits))],
              "tokens_per_char": {"before": tokens_per_char(tok.tokenize_batch(texts), texts),
                                  "after": tokens_per_char(plan["encode_after"](texts), texts)},
              "target_chars": sum(len(t) for t in texts)}
    with open_source(load, **source_options) as src:
        mcfg = src.cfg.model
        if mcfg.vocab_size < v_old or (plan.get("exact_model_vocab") and
                                       mcfg.vocab_size != v_old):
            raise CheckpointError(
                f"{load}: the model's vocab_size is {mcfg.vocab_size} but --tokenizer-model "
                f"{tokenizer_model} has {v_old} tokens (expected "
                f"{'equal' if plan.get('exact_model_vocab') else 'at least as many'}); pass "
                f"the tokenizer the model was trained with")
        new_cfg = dataclasses.replace(mcfg, vocab_size=max(mcfg.vocab_size,
                                                           plan["new_vocab_size"]))

        def grow(name: str, full: torch.Tensor) -> torch.Tensor:
            if name not in ("embedding.weight", "output.weight"):
                return full
            out = full.new_zeros(new_cfg.padded_vocab_size, full.shape[1])
            out[:mcfg.vocab_size] = full[:mcfg.vocab_size]
            for j, ids in enumerate(splits):
                out[v_old + j] = full[ids].float().mean(0).to(full.dtype)
            return out

        # the checkpoint carries the extended tokenizer (with the given one's config files),
        # not whatever tokenizer the source directory had
        files = tok.files()
        files.update(plan["files"])
        files["vocab_extension.json"] = json.dumps(report, indent=1, ensure_ascii=False).encode()
        src.tokenizer_path = None
        write_checkpoint(src, save_dir, tp, pp, with_optimizer=False, model_cfg=new_cfg,
                         transform=grow, extra_files=files, iteration=0, state={},
                         progress=progress)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extend_vocab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-model", required=True,
                   help="the source tokenizer: SentencePiece .model, or tokenizer.json / an HF "
                        "directory (byte-level BPE: new tokens become merges)")
    p.add_argument("--corpus", required=True, help="target-language JSON lines")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--new-pieces", type=int, required=True, help="pieces to add (K)")
    p.add_argument("--target-vocab-size", type=int, default=None,
                   help="size of the target-language model the pieces come from "
                        "(default 2K + 256)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load-dir", help="our checkpoint, any layout")
    src.add_argument("--from-hf", help="a HuggingFace LLaMA directory")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    a = build_parser().parse_args(argv)
    start = time.time()
    try:
        rep = extend_vocab(a.tokenizer_model, a.corpus, a.new_pieces, a.load_dir or a.from_hf,
                           a.save_dir, tuple(a.json_keys), a.target_vocab_size,
                           a.target_tensor_parallel_size, a.target_pipeline_parallel_size,
                           a.seed, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by)
    except (CheckpointError, LayoutError) as e:
        print(f"extend_vocab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tpc = rep["tokens_per_char"]
    print(f"added {rep['new_pieces']} pieces: vocab {rep['source_vocab_size']} -> "
          f"{rep['new_vocab_size']}; target tokens/char {tpc['before']:.4f} -> "
          f"{tpc['after']:.4f} ({rep['target_chars']} chars); wrote {a.save_dir} in "
          f"{time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
