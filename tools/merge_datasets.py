"""Merge .bin/.idx datasets in order (see megacpt.data.preprocess).

Thin wrapper: works as `python tools/merge_datasets.py` from a checkout with or without
`pip install -e .`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacpt.data.preprocess import merge_main as main  # noqa: E402

if __name__ == "__main__":
    main()
