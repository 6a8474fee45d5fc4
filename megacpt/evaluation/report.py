"""Downstream accuracy in the CPT workflow: demo tasks per language, scoring a set of final
checkpoints, and Figure-3/6-style bar plots (per language and task, one bar per run).

Used by `examples/quickstart.py` (scratch / CPT / CPT + replay in both languages) and by the
study runner (`megacpt.study.downstream`: each run's final checkpoint on the tasks its config
names). The demo tasks are a smoke signal built from held-out text
(`megacpt.evaluation.demo_tasks`), not the paper's benchmarks; `lm_eval:NAME` entries run
lm-evaluation-harness tasks instead (when lm-eval and the task's data are present locally).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def demo_task_files(data_dir: str, langs: list[str], out_dir: str, num_items: int = 64,
                    seed: int = 0) -> dict[str, str]:
    """{"demo_LANG": file} built from `data_dir/LANG_valid.jsonl.gz` for each language."""
    from megacpt.evaluation.demo_tasks import write_demo_task

    os.makedirs(out_dir, exist_ok=True)
    return {f"demo_{lang}": write_demo_task(
        os.path.join(data_dir, f"{lang}_valid.jsonl.gz"), lang,
        os.path.join(out_dir, f"demo_{lang}.jsonl"), num_items=num_items, seed=seed)
        for lang in langs}


def evaluate_checkpoints(checkpoints: dict[str, str], task_files: dict[str, str],
                         batch_size: int = 16, device: str | None = None,
                         progress: bool = False) -> dict[str, dict[str, dict]]:
    """{run: {task: metrics}}: each checkpoint (any format) scored in this one process.
    Task values are JSON-lines files, or "lm_eval:NAME" for an lm-eval task."""
    from megacpt.evaluate import evaluate_tasks
    from megacpt.evaluation.runner import EvalModel
    from megacpt.evaluation.tasks import read_task_file
    from megacpt.parallel.context import ParallelContext

    files = {n: p for n, p in task_files.items() if not p.startswith("lm_eval:")}
    lm_tasks = {n: p.split(":", 1)[1] for n, p in task_files.items() if p.startswith("lm_eval:")}
    items = {n: read_task_file(p) for n, p in files.items()}
    out = {}
    for run, path in checkpoints.items():
        model = EvalModel.load(path, ParallelContext.single(device))
        res, stats = evaluate_tasks(model, items, batch_size=batch_size, progress=progress) \
            if items else ({}, {})
        if lm_tasks:
            from megacpt.evaluation.lm_eval_adapter import run_lm_eval

            got = run_lm_eval(model, list(lm_tasks.values()), batch_size)
            res.update({n: got.get(t, {}) for n, t in lm_tasks.items()})
        out[run] = res
        log.info("downstream %s: %s (%.1f items/s)", run, ", ".join(
            f"{t} acc_norm {m.get('acc_norm', float('nan')):.3f}" for t, m in res.items()),
            stats.get("items_per_second", 0.0))
    return out


def plot_downstream(results: dict[str, dict[str, dict]], path: str, metric: str = "acc_norm",
                    chance: dict[str, float] | None = None, title: str | None = None) -> str:
    """Grouped bars: one group per task (language), one bar per run, with the task's chance
    level as a dotted line (Figure 3 / 6 of the paper, in miniature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results)
    tasks = sorted({t for r in results.values() for t in r})
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks) * max(1, len(runs)) / 2, 3.8))
    for k, run in enumerate(runs):
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
        ys = [results[run].get(t, {}).get(metric, float("nan")) for t in tasks]
        ax.bar(xs, ys, width, label=run)
    for i, t in enumerate(tasks):
        if chance and t in chance:
            ax.hlines(chance[t], i - 0.45, i + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(title or f"downstream {metric} (dotted: chance)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chance_levels(task_files: dict[str, str]) -> dict[str, float]:
    """Mean 1 / number of choices per task file."""
    from megacpt.evaluation.tasks import read_task_file

    out = {}
    for n, p in task_files.items():
        if not p.startswith("lm_eval:"):
            items = read_task_file(p)
            out[n] = sum(1 / len(it.choices) for it in items) / len(items)
    return out
