"""Checkpoints: save/resume per rank, layout conversion, HuggingFace and Megatron-LM interop,
vocabulary extension. The on-disk layout is documented in `megacpt.checkpoint.format`.

    save_checkpoint(save_dir, iteration, model, optimizer, cfg, ctx, state) -> iter dir
    load_checkpoint(load_dir, model, optimizer, cfg, ctx) -> (iteration, state)
    load_weights(path, model, ctx=None)          ours (any layout) / HF / Megatron legacy, torch_dist
    load_model(path, device="cpu", dtype=None) -> single-device LlamaModel (logits [b, s, V])
    convert_checkpoint(load, save_dir, tp, pp, with_optimizer=True) -> iter dir
    export_to_hf(load, out_dir) -> out_dir
    extend_vocab(tokenizer_model, corpus, new_pieces, load, save_dir) -> report dict
"""
from megacpt.checkpoint.checkpointing import (load_checkpoint, load_model, load_weights,
                                              save_checkpoint)
from megacpt.checkpoint.convert import convert_checkpoint, export_to_hf
from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.vocab import extend_vocab

__all__ = ["save_checkpoint", "load_checkpoint", "load_weights", "load_model",
           "convert_checkpoint", "export_to_hf", "extend_vocab", "CheckpointError"]
