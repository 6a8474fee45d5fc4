"""Downstream evaluation: multiple-choice task files scored like lm-evaluation-harness, on any
checkpoint in any layout (`megacpt.evaluate` is the CLI).

    read_task_file(path) -> [TaskItem]                   tasks.py (format, metrics)
    EvalModel.load(path, ctx) ; loglikelihoods(...)      runner.py (layouts, batching)
    an item's context encoded once, choices from its KV cache   shared_context.py
    evaluate_tasks(model, {name: items}) -> (metrics, stats)   megacpt.evaluate
"""
from megacpt.evaluation.tasks import EvalInputError, TaskItem, read_task_file

__all__ = ["EvalInputError", "TaskItem", "read_task_file"]
