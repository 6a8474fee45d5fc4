"""Checkpoint conversion: any (tp, pp) layout to any other, HuggingFace import/export and
Megatron-LM import, legacy or torch_dist (`tools/convert_checkpoint.py`, console script `megacpt-convert`).

    python tools/convert_checkpoint.py --load-dir A --save-dir B \\
        --target-tensor-parallel-size T --target-pipeline-parallel-size P [--no-optimizer]
    python tools/convert_checkpoint.py --from-hf HF_DIR --save-dir B --target-... T ...
    python tools/convert_checkpoint.py --from-megatron MEGATRON_DIR --save-dir B ...
    python tools/convert_checkpoint.py --load-dir A --to-hf HF_DIR

A layout conversion keeps everything `--load` needs to resume: weights, optimizer state
(Adam moments and fp32 masters, re-split over the new tp; ZeRO-1 state is stored gathered over
dp, so any dp works), the LR schedule, data-consumption state, counters and the iteration.
Per-rank RNG state is dropped (the model has no dropout; the trainer keeps its seeded RNG).
The output records every file's checksum like a trainer save, and a source checkpoint of ours
is verified against its recorded checksums first (`--no-verify-checksums` skips that).
Conversion streams tensor by tensor (see `megacpt.checkpoint.writer`); the output directory
appears only when complete. Measured peak RSS (2 shared CPU cores, local disk), for a random
bf16 checkpoint of the registry's 1393M shape (1.82B parameters by our count, vocab 36152)
with fp32 Adam moments and masters, 24 GB on disk: tp2pp2 -> tp1pp1 0.76 GiB in 156 s;
weights only tp1pp1 -> tp2pp4 0.42 GiB; export to HF 0.56 GiB (the interpreter with torch
alone is 0.22 GiB). The peak is about twice the largest full tensor (the fp32 embedding).
"""
from __future__ import annotations

import argparse
import logging
import re
import resource
import sys
import time

import torch

from megacpt.checkpoint.format import CheckpointError
from megacpt.checkpoint.hf import export_hf
from megacpt.checkpoint.registry import detect_format, open_source
from megacpt.checkpoint.writer import verify_source, write_checkpoint
from megacpt.params import LayoutError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert_checkpoint(load: str, save_dir: str, tp: int | None = None, pp: int | None = None,
                       *, with_optimizer: bool = True, dtype: torch.dtype | None = None,
                       progress: bool = True, verify: bool = True, **source_options) -> str:
    """Write the checkpoint (ours in any layout, HF or Megatron legacy/torch_dist) at `load` to
    `save_dir` in layout tp x pp (default: the source's layout, or 1 x 1); returns the
    iteration directory written (its meta.json records checksums). `verify`: check a source
    of ours against its recorded checksums first."""
    with open_source(load, **source_options) as src:
        if src.kind == "megacpt":  # default: keep the source layout
            tp, pp = tp or src.tp, pp or src.pp
        tp, pp = tp or 1, pp or 1
        return write_checkpoint(src, save_dir, tp, pp, with_optimizer=with_optimizer,
                                dtype=dtype, progress=progress, verify=verify)


def export_to_hf(load: str, out_dir: str, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 2 * 2**30, progress: bool = True,
                 verify: bool = True, **source_options) -> str:
    """Export any checkpoint `load_weights` reads to a HuggingFace LLaMA directory
    (`verify`: check a source of ours against its recorded checksums first)."""
    with open_source(load, **source_options) as src:
        if verify:
            verify_source(src)
        return export_hf(src, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         progress=progress, tokenizer_model=source_options.get("tokenizer_model"))


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 500MB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load-dir", help="our checkpoint (save dir or iter_* dir), any layout; "
                     "HF and Megatron-LM (legacy, torch_dist) directories are detected too")
    src.add_argument("--from-hf", help="a HuggingFace LLaMA directory to import")
    src.add_argument("--from-megatron", help="a Megatron-LM checkpoint to import: legacy "
                     "model_optim_rng.pt or Megatron-Core torch_dist (weights only)")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--save-dir", help="where to write our checkpoint (must not exist)")
    dst.add_argument("--to-hf", help="where to write a HuggingFace LLaMA directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="tp of --save-dir (default: the source's for our checkpoints, else 1)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="pp of --save-dir (default: the source's for our checkpoints, else 1)")
    p.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the parameters (default: keep the stored dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocabulary padding for imports (default 128)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="training sequence length recorded for HF imports "
                        "(default: max_position_embeddings)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size of a Megatron-LM checkpoint (else from its args "
                        "or tokenizer)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer (SentencePiece .model, tokenizer.json or HF directory) of a "
                        "Megatron-LM checkpoint, or to export with --to-hf instead of the "
                        "checkpoint's own")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                   help="largest safetensors shard for --to-hf (default 2GB)")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="convert our checkpoint without first checking its files against the "
                        "checksums in its meta.json (default: checked; a corrupt file is "
                        "refused, naming it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        return _run(args, start)
    except (CheckpointError, LayoutError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args, start: float) -> int:
    load = args.load_dir or args.from_hf or args.from_megatron
    if args.from_hf and detect_format(load) != "hf":
        raise CheckpointError(f"--from-hf {load}: no config.json there (not a HuggingFace "
                              f"model directory)")
    if args.from_megatron and detect_format(load) != "megatron":
        raise CheckpointError(f"--from-megatron {load}: neither a legacy checkpoint "
                              f"(mp_rank_*/model_optim_rng.pt) nor a torch_dist one "
                              f"(metadata.json, *.distcp, common.pt) was found")
    opts = dict(make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                seq_length=args.seq_length, vocab_size=args.vocab_size,
                tokenizer_model=args.tokenizer_model)
    dtype = DTYPES[args.dtype] if args.dtype else None
    progress = not args.no_progress
    if args.to_hf:
        if args.target_tensor_parallel_size or args.target_pipeline_parallel_size:
            raise CheckpointError("--target-*-parallel-size apply to --save-dir, not --to-hf")
        out = export_to_hf(load, args.to_hf, dtype, args.max_shard_size, progress,
                           verify=not args.no_verify_checksums, **opts)
    else:
        out = convert_checkpoint(load, args.save_dir, args.target_tensor_parallel_size,
                                 args.target_pipeline_parallel_size,
                                 with_optimizer=not args.no_optimizer, dtype=dtype,
                                 progress=progress, verify=not args.no_verify_checksums,
                                 **opts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    log.info("wrote %s in %.1fs; peak RSS %.2f GiB", out, time.time() - start, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
