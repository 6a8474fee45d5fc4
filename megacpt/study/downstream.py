"""Downstream evaluation of a study's final checkpoints (the config's `downstream:` section).

Every end-of-schedule run (source models, cosine runs, WSD cooldown branches; not the stable
trunks) is scored on the configured tasks once it has finished: `evaluate_run` loads its final
checkpoint (`megacpt.evaluation`, lm-evaluation-harness's metrics) and writes
`run_dir/eval.json`::

    {"iteration": 120, "checkpoint": ".../checkpoints/zh_tiny_cpt", "task_sources": {...},
     "tasks": {"demo_zh": {"acc": 0.41, "acc_norm": 0.44, "num_items": 32, ...}, ...}}

An eval.json whose iteration is the checkpoint's and which holds every configured task is
kept, so a resumed study does not evaluate again; a run trained (again) is always scored
anew. Local launch evaluates each run right after training it; print and slurm launch append
`tools/run_study.py --evaluate-run NAME` to the run's command (its array task, with its
GPUs); the analysis step evaluates whatever is still missing.

Task sources: `tasks` (JSON-lines task files), `lm_eval_tasks` (lm-eval task names, when
lm-eval and their data are present), and `demo_items` > 0 demo items per language built
from the corpus' held-out text (`megacpt.evaluation.demo_tasks`: a smoke signal, not the
paper's benchmarks) into `out_dir/downstream/tasks/`.
"""
from __future__ import annotations

import json
import logging
import os
import time

from megacpt.study.config import StudyConfig
from megacpt.study.plan import Run, run_finished

log = logging.getLogger("megacpt.study")
EVAL_FILE = "eval.json"
"""A run's downstream scores, in its run_dir."""


def evaluated(run: Run) -> bool:
    """Whether the study evaluates this run: its last checkpoint ends a schedule."""
    return run.end_of_schedule


def task_sources(cfg: StudyConfig) -> dict[str, str]:
    """{task name: JSON-lines file or "lm_eval:NAME"}; demo task files are built (once,
    atomically: slurm array tasks may race) in out_dir/downstream/tasks/."""
    from megacpt.evaluation.demo_tasks import write_demo_task

    d = cfg.downstream
    out = dict(d["tasks"])
    if d["demo_items"]:
        folder = os.path.join(cfg.out_dir, "downstream", "tasks")
        os.makedirs(folder, exist_ok=True)
        for lang in d["languages"]:
            path = os.path.join(folder, f"demo_{lang}.jsonl")
            if not os.path.isfile(path):
                tmp = f"{path}.{os.getpid()}.tmp"
                write_demo_task(os.path.join(cfg.data["corpus_dir"], f"{lang}_valid.jsonl.gz"),
                                lang, tmp, num_items=d["demo_items"], seed=cfg.seed)
                os.replace(tmp, path)
            out[f"demo_{lang}"] = path
    out.update({t: f"lm_eval:{t}" for t in d["lm_eval_tasks"]})
    return out


def read_eval(run: Run) -> dict | None:
    path = os.path.join(run.run_dir, EVAL_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def eval_current(cfg: StudyConfig, run: Run) -> bool:
    """eval.json exists for the checkpoint's iteration and holds every configured task."""
    from megacpt.checkpoint.format import read_tracker

    ev = read_eval(run)
    names = set(cfg.downstream["tasks"]) | set(cfg.downstream["lm_eval_tasks"]) | \
        ({f"demo_{x}" for x in cfg.downstream["languages"]} if cfg.downstream["demo_items"]
         else set())
    return ev is not None and ev.get("iteration") == read_tracker(run.ckpt_dir) and \
        names <= set(ev.get("tasks", {}))


def evaluate_run(cfg: StudyConfig, run: Run, force: bool = False) -> bool:
    """Score the run's final checkpoint and write run_dir/eval.json, unless it is current
    (`force`: a run just trained is scored anyway) or the study has no downstream tasks;
    whether it evaluated."""
    from megacpt.checkpoint.format import read_tracker
    from megacpt.evaluation.report import evaluate_checkpoints
    from megacpt.evaluation.tasks import EvalInputError

    if not cfg.downstream or not evaluated(run) or (not force and eval_current(cfg, run)):
        return False
    it = read_tracker(run.ckpt_dir)
    if it != run.train_iters:
        raise RuntimeError(f"run {run.name}: its checkpoint is at iteration {it}, not the final "
                           f"{run.train_iters}; train it before evaluating")
    tasks, t0 = task_sources(cfg), time.time()
    try:
        res = evaluate_checkpoints({run.name: run.ckpt_dir}, tasks,
                                   cfg.downstream["batch_size"], device=cfg.device)[run.name]
    except EvalInputError as e:  # a bad task file, lm-eval data not present, ...
        raise RuntimeError(f"run {run.name}: downstream evaluation: {e}") from None
    doc = {"iteration": it, "checkpoint": run.ckpt_dir, "task_sources": tasks, "tasks": res}
    path = os.path.join(run.run_dir, EVAL_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    log.info("downstream %s: %d tasks in %.1fs -> %s", run.name, len(res), time.time() - t0,
             path)
    return True


def evaluate_pending(cfg: StudyConfig, runs: list[Run]) -> int:
    """Evaluate every finished run whose eval.json is missing or stale; how many were."""
    if not cfg.downstream:
        return 0
    todo = [r for r in runs if evaluated(r) and run_finished(r) and not eval_current(cfg, r)]
    for k, r in enumerate(todo, 1):
        log.info("downstream evaluation %d/%d: %s", k, len(todo), r.name)
        evaluate_run(cfg, r)
    return len(todo)


def summarize(cfg: StudyConfig, runs: list[Run]) -> dict | None:
    """results.json's "downstream": tasks, chance levels and each evaluated run's scores."""
    from megacpt.evaluation.report import chance_levels

    if not cfg.downstream:
        return None
    tasks = task_sources(cfg)
    rows = []
    for r in (r for r in runs if evaluated(r)):
        ev = read_eval(r)
        if ev is not None:
            rows.append({"run": r.name, "lang": r.lang, "size": r.size, "kind": r.kind,
                         "strategy": r.strategy, "replay": r.replay, "budget": r.budget,
                         "iteration": ev["iteration"], "tasks": ev["tasks"]})
    return {"tasks": tasks, "chance": chance_levels(tasks), "runs": rows}
