"""Entry point: `python -m megacpt.train [Megatron flags]` (also under torchrun / mpiexec).

    # pretraining from scratch, 20 tokens per parameter, the paper's LR recipe
    python -m megacpt.train --model-size 1393M --tokenizer-model tok.model \\
        --data-path 1.0 zh=data/zh_text_document --valid-data-path zh=data/zh_valid \\
        en=data/en_valid --seq-length 2048 --micro-batch-size 4 --global-batch-size 1024 \\
        --tokens-per-param 20 --bf16 --save ckpt/zh --log-dir runs/zh

    # continual pre-training from an English model with 30% English replay
    torchrun --nproc-per-node 8 -m megacpt.train ... --init-from ckpt/en \\
        --data-path 0.7 zh=data/zh_text_document 0.3 en=data/en_text_document

    # CPU smoke run on random tokens
    python -m megacpt.train --model-size tiny --mock-data --vocab-size 512 --seq-length 64 \\
        --train-iters 20 --log-interval 5

Exit codes: 0 finished (or stopped by SIGTERM/SIGUSR1/SIGINT or --exit-interval after
saving), 1 training error (non-finite losses, a dead rank, an unreadable checkpoint, a full
disk), 2 bad configuration or input (reported before any compute), 130 aborted by a second
SIGINT (no save). Errors are one line each, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys

from megacpt.training.signals import PreemptionHandler

EXIT_OK, EXIT_TRAINING_ERROR, EXIT_BAD_INPUT, EXIT_ABORTED = 0, 1, 2, 130


def setup_logging() -> None:
    """INFO on global rank 0 (or a single process), warnings only on the other ranks."""
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0")))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"[%(asctime)s rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def cpu_threads() -> None:
    """On CPU with several local ranks and no OMP_NUM_THREADS, share the cores out evenly."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    # first: a signal during start-up is not lost
    with PreemptionHandler(abort_after_first_sigint=True) as preempt:
        log = logging.getLogger("megacpt.train")
        log.info("megacpt.train starting (pid %d)", os.getpid())
        try:
            from megacpt.arguments import parse_args
            from megacpt.config import ConfigError

            try:
                cfg, opts = parse_args(argv)
            except ConfigError as e:
                log.error("bad configuration: %s", e)
                return EXIT_BAD_INPUT
            return _run(cfg, opts, preempt)
        except KeyboardInterrupt:
            log.error("aborted by a second SIGINT: no checkpoint saved (the last one is kept)")
            return EXIT_ABORTED


def run(cfg, opts=None) -> int:
    """Train one resolved `Config` (+ `RunOptions`); the exit code of `main`.

    Programs that build configs (studies, the quickstart) call this directly;
    `megacpt.flags.config_to_argv(cfg, opts)` is the same run as a command line.
    """
    from megacpt.arguments import RunOptions

    with PreemptionHandler() as preempt:
        try:
            return _run(cfg, opts or RunOptions(), preempt)
        except KeyboardInterrupt:
            logging.getLogger("megacpt.train").error(
                "aborted by a second SIGINT: no checkpoint saved (the last one is kept)")
            return EXIT_ABORTED


def _run(cfg, opts, preempt: PreemptionHandler) -> int:
    cpu_threads()
    log = logging.getLogger("megacpt.train")
    import torch.distributed as dist

    from megacpt.checkpoint.format import CheckpointError
    from megacpt.config import ConfigError
    from megacpt.data.indexed import IndexedFormatError
    from megacpt.training.checks import check_device
    from megacpt.training.faults import TrainingError, collective_guard
    from megacpt.training.loop import Trainer, build_context

    try:
        check_device(cfg)
    except ConfigError as e:
        log.error("bad configuration: %s", e)
        return EXIT_BAD_INPUT
    rank = int(os.environ.get("RANK", "0"))
    timeout = cfg.parallel.distributed_timeout_minutes
    try:
        with collective_guard(rank, timeout, "start-up"):
            ctx = build_context(cfg)
            trainer = Trainer(cfg, opts, ctx)
    except (ConfigError, IndexedFormatError) as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    except CheckpointError as e:
        log.error("checkpoint error: %s", e)
        return EXIT_BAD_INPUT
    except TrainingError as e:
        log.error("%s", e)
        return EXIT_TRAINING_ERROR
    except OSError as e:
        log.error("start-up failed: %s", _os_error(e))
        return EXIT_TRAINING_ERROR
    try:
        result = trainer.run(preempt)
    except (TrainingError, CheckpointError, ConfigError) as e:
        log.error("training stopped: %s", e)
        return EXIT_TRAINING_ERROR
    except OSError as e:
        log.error("training stopped: %s", _os_error(e))
        return EXIT_TRAINING_ERROR
    log.info("finished at iteration %d (%s); %d skipped steps; last checkpoint: %s",
             result.iteration, result.reason, result.skipped_steps, result.last_checkpoint)
    if dist.is_initialized():
        try:
            with collective_guard(rank, timeout, "shutdown"):
                dist.barrier()
                dist.destroy_process_group()
        except TrainingError as e:  # the work is saved; a peer left early
            log.warning("%s", e)
    return EXIT_OK


def _os_error(e: OSError) -> str:
    """One line for a file-system error: what failed, on which file, and what to do."""
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    hint = {28: "; free disk space", 27: "; the file-size limit (ulimit -f) was reached",
            30: "; the file system is read-only", 13: "; check the permissions"}.get(
                e.errno or 0, "")
    return f"{what}{where}{hint}"


def cli() -> None:
    """The `megacpt-train` / `python -m megacpt.train` entry point: `sys.exit(main())`, except
    that an abort by a second Ctrl-C leaves at once with 130 (CPython re-raises SIGINT at exit,
    status -2, when a KeyboardInterrupt ever crossed C code such as an extension's import)."""
    code = main()
    if code == EXIT_ABORTED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
