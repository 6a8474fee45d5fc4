"""Zero-shot multiple-choice evaluation of any checkpoint, with lm-evaluation-harness's numbers.

    python -m megacpt.evaluate --load ckpt/cpt --task-file demo_zh=zh_choice.jsonl \\
        --task-file demo_en=en_choice.jsonl --output results.json
    torchrun --nproc-per-node 4 -m megacpt.evaluate --load ckpt/cpt \\
        --tensor-model-parallel-size 2 --task-file ...        # tp2 x dp2: dp splits the items
    python -m megacpt.evaluate --load ckpt/cpt --lm-eval-tasks xnli_zh,xcopa_zh   # needs lm-eval

`--load` reads what `--init-from` reads: our checkpoint in any tp/pp layout, a HuggingFace
LLaMA directory or a Megatron-LM checkpoint. Task files and metrics are described in
`megacpt.evaluation.tasks`; scoring in `megacpt.evaluation.runner`.

RESULTS.json::

    {"tasks": {NAME: {"acc": x, "acc_stderr": e, "acc_norm": y, "acc_norm_stderr": e,
                      "num_items": n, "truncated_items": k,
                      "per_language": {lang: {"acc", "acc_norm", "num_items"}}  # if given
                      }},
     "lm_eval": {...lm-eval's "results" dict...},          # with --lm-eval-tasks
     "load": PATH, "layout": "tp1pp1dp1", "num_requests": r, "seconds": t,
     "requests_per_second": r / t, "items_per_second": items / t}

Exit codes: 0 done, 2 bad input (task file, checkpoint, tokenizer, flags; one line, no
traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

EXIT_OK, EXIT_BAD_INPUT = 0, 2
log = logging.getLogger("megacpt.evaluate")


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megacpt.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--load", required=True, help="checkpoint: ours (any layout), HF or Megatron")
    ap.add_argument("--task-file", action="append", default=[], metavar="NAME=FILE.jsonl",
                    help="a multiple-choice task file (repeatable)")
    ap.add_argument("--output", help="write RESULTS.json here")
    ap.add_argument("--target-delimiter", default=" ",
                    help="put between the context and each choice (lm-eval's default)")
    ap.add_argument("--tokenizer-model", help="SentencePiece .model, tokenizer.json or HF directory "
                    "(default: the checkpoint's)")
    ap.add_argument("--micro-batch-size", "--batch-size", dest="batch_size", type=int,
                    default=16, help="requests per forward pass")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--bf16", action="store_true", help="run in bf16 (default: the checkpoint's "
                                                        "dtype)")
    ap.add_argument("--fp32", action="store_true", help="run in fp32")
    ap.add_argument("--attention-backend", choices=("auto", "sdpa", "eager", "flash_attn"))
    ap.add_argument("--limit", type=int, help="only the first N items of each task")
    ap.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness task names "
                                            "(needs pip install 'megacpt[eval]')")
    ap.add_argument("--lm-eval-include-path", help="extra lm-eval task YAML directory")
    ap.add_argument("--num-fewshot", type=int, default=0, help="for --lm-eval-tasks")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.task_file and not args.lm_eval_tasks:
        ap.error("give at least one --task-file NAME=FILE.jsonl or --lm-eval-tasks")
    if args.batch_size < 1:
        ap.error(f"--micro-batch-size must be >= 1, got {args.batch_size}")
    return args


def parse_task_files(specs: list[str]) -> dict[str, str]:
    from megacpt.evaluation.tasks import EvalInputError

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"--task-file {spec!r}: expected NAME=FILE.jsonl")
        if name in out:
            raise EvalInputError(f"--task-file: task name {name!r} given twice")
        out[name] = path
    return out


def evaluate_tasks(model, tasks: dict[str, list], delimiter: str = " ", batch_size: int = 16,
                   progress: bool = True, return_lls: bool = False) -> tuple[dict[str, dict], dict]:
    """Score every task's items on `model` (an `EvalModel`, any layout; collective).

    Returns ({task: metrics}, {"num_requests", "seconds", ...}); identical on every rank.
    `return_lls` adds each task's per-item, per-choice log-likelihoods ("loglikelihoods").
    """
    from megacpt.evaluation.runner import count_truncated, loglikelihoods
    from megacpt.evaluation.tasks import PairEncoder, item_requests, task_metrics

    enc = PairEncoder(model.tokenizer)
    requests, owners = [], []
    for name, items in tasks.items():
        for k, item in enumerate(items):
            for ctx_text, cont_text in item_requests(item, delimiter):
                requests.append(enc.pair(ctx_text, cont_text))
                owners.append((name, k))
    t0 = time.time()
    scored = loglikelihoods(model, requests, batch_size, progress)
    seconds = time.time() - t0
    lls: dict[str, list[list[float]]] = {n: [[] for _ in items] for n, items in tasks.items()}
    trunc: dict[str, set] = {n: set() for n in tasks}
    for (name, k), (ll, _), req in zip(owners, scored, requests):
        lls[name][k].append(ll)
        if count_truncated([req], model.max_length):
            trunc[name].add(k)
    results = {}
    for name, items in tasks.items():
        results[name] = task_metrics(items, lls[name])
        results[name]["truncated_items"] = len(trunc[name])
        if return_lls:
            results[name]["loglikelihoods"] = lls[name]
        if trunc[name] and model.ctx.rank == 0:
            log.warning("%s: %d of %d items are longer than the model's %d tokens and were "
                        "truncated from the left (as lm-eval does)", name, len(trunc[name]),
                        len(items), model.max_length)
    n_items = sum(len(v) for v in tasks.values())
    stats = {"num_requests": len(requests), "seconds": round(seconds, 3),
             "requests_per_second": len(requests) / max(seconds, 1e-9),
             "items_per_second": n_items / max(seconds, 1e-9)}
    return results, stats


def build_eval_context(args):
    from megacpt.parallel.context import ParallelContext, init_distributed
    from megacpt.train import cpu_threads

    cpu_threads()
    init_distributed()
    return ParallelContext.build(args.tensor_model_parallel_size,
                                 args.pipeline_model_parallel_size, device=args.device)


def run(args) -> dict:
    """Load, score, report; returns the results dict (every rank)."""
    import torch

    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import markdown_table, read_task_file

    files = parse_task_files(args.task_file)
    tasks = {name: read_task_file(path) for name, path in files.items()}
    if args.limit:
        tasks = {n: items[: args.limit] for n, items in tasks.items()}
    if args.lm_eval_tasks:  # before any loading: say how to install it when missing
        from megacpt.evaluation.lm_eval_adapter import require_lm_eval

        require_lm_eval()
    ctx = build_eval_context(args)
    dtype = torch.bfloat16 if args.bf16 else (torch.float32 if args.fp32 else None)
    model = EvalModel.load(args.load, ctx, args.tokenizer_model, dtype, args.attention_backend)
    out: dict = {"tasks": {}, "load": args.load, "layout": ctx.layout}
    if tasks:
        results, stats = evaluate_tasks(model, tasks, args.target_delimiter, args.batch_size,
                                        not args.no_progress)
        out["tasks"].update(results)
        out.update(stats)
    if args.lm_eval_tasks:
        from megacpt.evaluation.lm_eval_adapter import run_lm_eval

        out["lm_eval"] = run_lm_eval(model, args.lm_eval_tasks.split(","), args.batch_size,
                                     args.num_fewshot, args.limit, args.lm_eval_include_path)
        for name, res in out["lm_eval"].items():
            out["tasks"].setdefault(name, res)
    if ctx.rank == 0:
        print(markdown_table(out["tasks"]), flush=True)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=2, ensure_ascii=False)
                f.write("\n")
            log.info("wrote %s", args.output)
    return out


def main(argv=None) -> int:
    from megacpt.train import setup_logging

    setup_logging()
    args = get_args(argv)
    from megacpt.config import ConfigError
    from megacpt.evaluation.tasks import EvalInputError

    try:
        run(args)
    except (EvalInputError, ConfigError) as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
