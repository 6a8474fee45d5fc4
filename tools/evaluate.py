"""Zero-shot multiple-choice evaluation of any checkpoint (see megacpt.evaluate for the flags).

Thin wrapper: works as `python tools/evaluate.py` from a checkout with or without
`pip install -e .`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
