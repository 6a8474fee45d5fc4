"""Checkpoints: save/resume per rank, layout conversion, HuggingFace and Megatron-LM interop,
vocabulary extension. The on-disk layout is documented in `megacpt.checkpoint.format`.

    save_checkpoint(save_dir, iteration, model, optimizer, cfg, ctx, state) -> iter dir
    load_checkpoint(load_dir, model, optimizer, cfg, ctx) -> (iteration, state)
    load_weights(path, model, ctx=None)        any layout / HF dir / Megatron legacy
    load_model(path, device="cpu", dtype=None) -> single-device LlamaModel
    convert_checkpoint(load, save_dir, tp, pp, ...) / export_hf(load, out_dir, ...)
"""
from megacpt.checkpoint.checkpointing import (load_checkpoint, load_model, load_weights,
                                              save_checkpoint)
from megacpt.checkpoint.format import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "load_model",
           "CheckpointError"]
