"""Train a SentencePiece BPE tokenizer on JSON lines (see megacpt.data.tokenizer_train).

Thin wrapper: works as `python tools/train_tokenizer.py` from a checkout with or without
`pip install -e .`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt.data.tokenizer_train import main  # noqa: E402

if __name__ == "__main__":
    main()
