"""Moved: the chunked LM head + loss lives in `megacpt.parallel.cross_entropy` (the loss's one
home). This name stays for existing imports."""
from megacpt.parallel.cross_entropy import chunked_lm_head_loss  # noqa: F401
