"""Read and extend a serialized SentencePiece model without the protobuf package.

A `.model` file is a protobuf `sentencepiece.ModelProto` (sentencepiece_model.proto):

    ModelProto      1: repeated SentencePiece pieces   2: TrainerSpec   3: NormalizerSpec
    SentencePiece   1: string piece   2: float score   3: Type (1 NORMAL, 2 UNKNOWN,
                    3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE)
    TrainerSpec     3: model_type (1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR)  4: vocab_size
                    20: max_sentencepiece_length  22: split_by_whitespace
                    24: treat_whitespace_as_suffix  25: split_digits
                    26: allow_whitespace_only_pieces  35: byte_fallback
    NormalizerSpec  1: name  3: add_dummy_prefix  4: remove_extra_whitespaces

Only the protobuf wire format is needed: fields are (key varint = number << 3 | wire type,
value) records, and a repeated field may continue anywhere in the message, so appending
encoded `pieces` records to the end of the file appends pieces to the vocabulary with new
ids after the existing ones; nothing else in the model changes.
"""
from __future__ import annotations

import struct

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
