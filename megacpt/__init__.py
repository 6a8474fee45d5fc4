"""megacpt: Megatron-style distributed trainer for cross-lingual continual pre-training.

Importing the package is cheap and does not import torch: `megacpt.data` (the preprocessing
side) and `megacpt.scaling` must stay usable without it.
"""
__version__ = "0.1.0"
