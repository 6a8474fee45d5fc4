"""Downstream accuracy in the CPT workflow: demo tasks per language, scoring a set of final
checkpoints, and Figure-3/6-style bar plots (per language and task, one bar per run).

Used by `examples/quickstart.py` (scratch / CPT / CPT + replay in both languages) and by the
study runner (`evaluate_runs`: each run's final checkpoint on the tasks its config names).
The demo tasks are a smoke signal built from held-out text (`megacpt.evaluation.demo_tasks`),
not the paper's benchmarks; `lm_eval:NAME` entries run lm-evaluation-harness tasks instead
(when lm-eval and the task's data are present locally).

downstream.json (written by `evaluate_runs`)::

    {"tasks": {task: file or "lm_eval:NAME"},
     "runs": {run: {task: {"acc", "acc_norm", "num_items", ...}}},
     "plot": "downstream.png"}
"""
from __future__ import annotations

import json
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


def evaluate_runs(checkpoints: dict[str, str], tasks: dict[str, str], out_dir: str,
                  data_dir: str | None = None, langs: list[str] | None = None,
                  num_items: int = 64, batch_size: int = 16) -> dict:
    """The study runner's step: score each run's final checkpoint on `tasks` (name -> file
    or "lm_eval:NAME"; plus demo tasks for `langs` from `data_dir` when given), write
    OUT/downstream.json and OUT/downstream.png; returns the downstream.json dict."""
    tasks = dict(tasks or {})
    if data_dir and langs:
        tasks.update(demo_task_files(data_dir, langs, os.path.join(out_dir, "tasks"),
                                     num_items))
    if not tasks or not checkpoints:
        return {}
    results = evaluate_checkpoints(checkpoints, tasks, batch_size)
    os.makedirs(out_dir, exist_ok=True)
    plot = plot_downstream(results, os.path.join(out_dir, "downstream.png"),
                           chance=chance_levels(tasks))
    doc = {"tasks": tasks, "runs": results, "plot": os.path.basename(plot)}
    with open(os.path.join(out_dir, "downstream.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return doc


# ----- the study runner's hook -----

DOWNSTREAM_KEYS = {"tasks": dict, "demo_items": int, "languages": list, "batch_size": int}


def check_study_downstream(section: dict, base: str, bad) -> dict:
    """Validate a study config's `downstream` mapping; relative task files are resolved
    against `base` (the config's folder). Keys: tasks {name: FILE.jsonl | lm_eval:NAME},
    demo_items (demo items per language from the corpus' held-out text; 0: none),
    languages (default: source and targets), batch_size."""
    out = {"tasks": {}, "demo_items": 0, "languages": None, "batch_size": 16}
    for key, value in (section or {}).items():
        if key not in DOWNSTREAM_KEYS:
            raise bad("downstream", f"unknown key {key!r}; known: {sorted(DOWNSTREAM_KEYS)}")
        if not isinstance(value, DOWNSTREAM_KEYS[key]) or isinstance(value, bool):
            raise bad("downstream", f"{key!r} must be a {DOWNSTREAM_KEYS[key].__name__}")
        out[key] = value
    tasks = {}
    for name, path in out["tasks"].items():
        if not isinstance(path, str):
            raise bad("downstream", f"tasks.{name} must be a file path or lm_eval:NAME")
        if not path.startswith("lm_eval:"):
            path = os.path.join(base, path)
            if not os.path.isfile(path):
                raise bad("downstream", f"tasks.{name}: {path} not found")
        tasks[name] = path
    out["tasks"] = tasks
    if out["demo_items"] < 0 or out["batch_size"] < 1:
        raise bad("downstream", "demo_items must be >= 0 and batch_size >= 1")
    return out


def study_downstream(cfg, runs) -> dict | None:
    """Score each finished run's final checkpoint on the tasks the study config names
    (`cfg.downstream`, checked by `check_study_downstream`), write
    OUT/downstream/{downstream.json, downstream.png}; None when no tasks are configured."""
    d = getattr(cfg, "downstream", None) or {}
    if not d.get("tasks") and not d.get("demo_items"):
        return None
    langs = d.get("languages") or [cfg.source_lang, *cfg.target_langs]
    corpus = (cfg.data or {}).get("corpus_dir")
    if d.get("demo_items") and not corpus:
        log.warning("downstream.demo_items needs data.corpus_dir (held-out text); skipped")
    ckpts = {r.name: r.ckpt_dir for r in runs}
    return evaluate_runs(ckpts, d.get("tasks", {}), os.path.join(cfg.out_dir, "downstream"),
                         corpus if d.get("demo_items") else None, langs,
                         d.get("demo_items", 0), d.get("batch_size", 16))


def downstream_markdown(doc: dict | None, out_dir: str) -> list[str]:
    """The report's "Downstream" section (table + bar plot) from `study_downstream`."""
    if not doc:
        return []
    tasks = list(doc["tasks"])
    lines = ["## Downstream (acc_norm; demo_* tasks are a smoke signal, not benchmarks)", "",
             "| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for run, res in doc["runs"].items():
        cells = [f"{res.get(t, {}).get('acc_norm', float('nan')):.3f}" for t in tasks]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", f"![downstream](downstream/{doc['plot']})", ""]
    return lines
