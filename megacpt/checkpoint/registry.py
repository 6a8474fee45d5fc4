"""Which format a checkpoint directory holds, and the `Source` that reads it.

`FORMATS` is the registry: (kind, detector, opener) in the order they are tried; the first
detector that recognises the directory wins, and our own format is the fallback (its reader
gives the clear error when the directory is not a checkpoint at all). A new format is one
module with a `Source` subclass and one entry here; no other module imports its subclass.
"""
from __future__ import annotations

import os
from typing import Callable

from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.hf import HFSource
from megacpt.checkpoint.megatron_dist import MegatronDistSource, is_megatron_dist
from megacpt.checkpoint.megatron_legacy import MegatronSource, is_megatron_legacy
from megacpt.checkpoint.reader import MegacptSource
from megacpt.checkpoint.source import Source


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


#: (kind as `detect_format` names it, detector, opener(path, **options))
FORMATS: list[tuple[str, Callable[[str], bool], Callable[..., Source]]] = [
    ("hf", _is_hf, HFSource),
    ("megatron", is_megatron_dist, MegatronDistSource),
    ("megatron", is_megatron_legacy, MegatronSource),
    ("megacpt", lambda path: True, lambda path, **_: MegacptSource(path)),
]


def detect_format(path: str) -> str:
    """"hf", "megatron" or "megacpt" from the files in `path`. "megatron" covers both
    Megatron-LM formats, legacy (mp_rank_*/model_optim_rng.pt) and Megatron-Core torch_dist
    (metadata.json + *.distcp); `open_source` tells them apart."""
    return next(kind for kind, detect, _ in FORMATS if detect(path))


def open_source(path: str, **options) -> Source:
    """A reader for our checkpoint (save dir or iter dir), a HuggingFace LLaMA directory, a
    Megatron-LM legacy or a Megatron-Core torch_dist checkpoint, chosen from the directory's
    contents. `options` (vocabulary padding, sequence length, ...) go to importers."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} does not exist or is not a directory")
    opener = next(op for _, detect, op in FORMATS if detect(path))
    return opener(path, **options)
