"""Extend a model's vocabulary for a new language: train target-language SentencePiece
pieces, merge them into the source tokenizer (existing ids unchanged), grow the embedding and
output layers and initialise new rows from the source sub-pieces (see megacpt.checkpoint.vocab).

Thin wrapper: works as `python tools/extend_vocab.py` from a checkout with or without
`pip install -e .`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt.checkpoint.vocab import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
