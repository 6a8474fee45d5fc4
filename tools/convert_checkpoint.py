"""Convert checkpoints between parallel layouts, import/export HuggingFace LLaMA, import
Megatron-LM checkpoints, legacy or torch_dist (see megacpt.checkpoint.convert for the flags).

Thin wrapper: works as `python tools/convert_checkpoint.py` from a checkout with or without
`pip install -e .`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt.checkpoint.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
