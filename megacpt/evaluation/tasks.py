"""Zero-shot multiple-choice task files, their requests and lm-evaluation-harness's metrics.

Task file format (JSON Lines, UTF-8, one item per line; blank lines are skipped)::

    {"context": str, "choices": [str, ...], "gold": int, "language": str (optional),
     "target_delimiter": str (optional; overrides --target-delimiter for this item)}

Each choice is scored by the log-likelihood of `target_delimiter + choice` given `context`
(lm-eval's `multiple_choice` output type, default delimiter " "). Requests are tokenized as
lm-eval's `TemplateLM.loglikelihood` / `_encode_pair` do for a causal model:

- trailing whitespace of the context moves to the front of the continuation;
- `whole = encode(context + continuation)`, `ctx = encode(context)`,
  `cont = whole[len(ctx):]` (split by token count, so a piece straddling the boundary
  belongs to the continuation);
- `encode` prepends BOS when the tokenizer has one (the exported HF tokenizer's
  `add_bos_token`), except for a string that already starts with the BOS piece's text;
- an empty context becomes `[BOS]` (or the first continuation token when that is BOS).

Metrics, as lm-eval's `ConfigurableTask.process_results` defines them: `acc` = argmax of the
log-likelihoods is gold; `acc_norm` = argmax of log-likelihood / len(choice) in characters
(the choice without the delimiter); `*_stderr` = sample standard deviation / sqrt(n).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass


class EvalInputError(ValueError):
    """Bad evaluation input (task file, checkpoint, tokenizer); the message names the place."""


@dataclass
class TaskItem:
    context: str
    choices: list[str]
    gold: int
    language: str | None = None
    target_delimiter: str | None = None


def _bad(path: str, line: int, field: str, what: str) -> EvalInputError:
    return EvalInputError(f"{path}:{line}: field {field!r} {what}")


def read_task_file(path: str) -> list[TaskItem]:
    """Items of a task file; a clear error naming file, line and field for bad input."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: task file not found (--task-file NAME=FILE.jsonl)")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}:{n}: malformed JSON ({e.msg} at column "
                                     f"{e.colno})") from None
            if not isinstance(row, dict):
                raise EvalInputError(f"{path}:{n}: expected a JSON object with 'context', "
                                     f"'choices' and 'gold', got {type(row).__name__}")
            items.append(_item(row, path, n))
    if not items:
        raise EvalInputError(f"{path}: no items (expected one JSON object per line)")
    return items


def _item(row: dict, path: str, n: int) -> TaskItem:
    ctx = row.get("context")
    if not isinstance(ctx, str):
        raise _bad(path, n, "context", f"must be a string, got {ctx!r:.40}")
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _bad(path, n, "choices", f"must be a non-empty list of strings, got "
                                       f"{choices!r:.60}")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise _bad(path, n, f"choices[{i}]", f"must be a non-empty string, got {c!r:.40}")
    gold = row.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise _bad(path, n, "gold", f"must be an integer index into choices, got {gold!r}")
    if not 0 <= gold < len(choices):
        raise _bad(path, n, "gold", f"is {gold}, out of range for {len(choices)} choices "
                                    f"(expected 0..{len(choices) - 1})")
    lang = row.get("language")
    if lang is not None and not isinstance(lang, str):
        raise _bad(path, n, "language", f"must be a string, got {lang!r}")
    delim = row.get("target_delimiter")
    if delim is not None and not isinstance(delim, str):
        raise _bad(path, n, "target_delimiter", f"must be a string, got {delim!r}")
    return TaskItem(ctx, list(choices), gold, lang, delim)


# ----- tokenization as lm-eval does it -----

class PairEncoder:
    """lm-eval's causal context/continuation encoding over any `megacpt.data.tokenizer`
    tokenizer (BOS when the HF tokenizer of the export would add one)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = tokenizer.bos
        self.bos_text = tokenizer.id_to_piece(self.bos) if self.bos is not None else None

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS (lm-eval's HFLM.prefix_token_id)."""
        return self.bos if self.bos is not None else self.tok.eod

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        add = add_special_tokens
        if add is None:
            add = not (self.bos_text and text.startswith(self.bos_text))
        ids = self.tok.tokenize(text)
        return ([self.bos] + ids) if (add and self.bos is not None) else ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def item_requests(item: TaskItem, delimiter: str) -> list[tuple[str, str]]:
    """(context, continuation) per choice."""
    if item.target_delimiter is not None:
        delimiter = item.target_delimiter
    return [(item.context, delimiter + c) for c in item.choices]


# ----- metrics -----

def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like np.argmax


def _stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def item_scores(item: TaskItem, lls: list[float]) -> dict[str, float]:
    norm = [ll / float(len(c)) for ll, c in zip(lls, item.choices)]
    return {"acc": float(_argmax(lls) == item.gold), "acc_norm": float(_argmax(norm) == item.gold)}


def task_metrics(items: list[TaskItem], lls: list[list[float]]) -> dict:
    """{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_items", "languages"?}."""
    scores = [item_scores(it, ll) for it, ll in zip(items, lls)]
    out: dict = {}
    for m in ("acc", "acc_norm"):
        xs = [s[m] for s in scores]
        out[m] = sum(xs) / len(xs)
        out[m + "_stderr"] = _stderr(xs)
    out["num_items"] = len(items)
    langs = sorted({it.language for it in items if it.language})
    if langs:
        out["per_language"] = {}
        for lang in langs:
            sel = [s for s, it in zip(scores, items) if it.language == lang]
            out["per_language"][lang] = {
                "acc": sum(s["acc"] for s in sel) / len(sel),
                "acc_norm": sum(s["acc_norm"] for s in sel) / len(sel), "num_items": len(sel)}
    return out


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| task | items | acc | acc_norm |", "|---|---:|---:|---:|"]
    def cell(m, k):
        if not isinstance(m.get(k), (int, float)):
            return "-"
        err = m.get(k + "_stderr")
        return f"{m[k]:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) and err == err else "")

    for name, m in results.items():
        lines.append(f"| {name} | {m.get('num_items', '-')} | {cell(m, 'acc')} | "
                     f"{cell(m, 'acc_norm')} |")
    return "\n".join(lines)
