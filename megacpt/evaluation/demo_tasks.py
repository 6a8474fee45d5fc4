"""Offline demo tasks from held-out text: pick the true continuation among 4.

A SMOKE SIGNAL, not a benchmark: the paper's XNLI / XWinograd / XHellaSwag / XStoryCloze /
XCOPA / PIQA need their datasets (run them with `--lm-eval-tasks` where the data is local).
These items only check that a model has learned something about a language: each takes a
held-out document (e.g. `examples/data/{lang}_valid.jsonl.gz`), cuts it into a context of
about `context_chars` characters and the true continuation of about `choice_chars`, and adds
as distractors the continuations of 3 other documents cut the same way. Languages written
with spaces are cut at spaces (the choice is joined with the target delimiter " "); others
(zh, ja, ...) at any character (delimiter "", given per item as "target_delimiter").

    python -m megacpt.evaluation.demo_tasks --input examples/data/zh_valid.jsonl.gz \\
        --language zh --output demo_zh.jsonl
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys

NO_SPACE_LANGS = ("zh", "ja", "th", "lo", "km", "my")


def _read_texts(path: str, key: str = "text") -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def _cut(text: str, context_chars: int, choice_chars: int, spaced: bool):
    """(context, continuation) or None when the text is too short."""
    text = " ".join(text.split()) if spaced else "".join(text.split())
    if len(text) < context_chars + choice_chars:
        return None
    if not spaced:
        return text[:context_chars], text[context_chars: context_chars + choice_chars]
    words = text.split(" ")
    ctx, n = [], 0
    for i, w in enumerate(words):
        if n >= context_chars:
            break
        ctx.append(w)
        n += len(w) + 1
    rest, m = [], 0
    for w in words[len(ctx):]:
        if m >= choice_chars:
            break
        rest.append(w)
        m += len(w) + 1
    if not rest or m < choice_chars // 2:
        return None
    return " ".join(ctx), " ".join(rest)


def build_items(texts: list[str], language: str, num_items: int = 64, num_choices: int = 4,
                context_chars: int | None = None, choice_chars: int | None = None,
                seed: int = 0) -> list[dict]:
    """Task items (the `megacpt.evaluation.tasks` format) from documents."""
    spaced = language not in NO_SPACE_LANGS
    context_chars = context_chars or (120 if spaced else 40)
    choice_chars = choice_chars or (40 if spaced else 12)
    cuts = [c for c in (_cut(t, context_chars, choice_chars, spaced) for t in texts) if c]
    if len(cuts) < num_choices:
        raise ValueError(f"only {len(cuts)} documents are long enough for {language} demo "
                         f"items (need {num_choices})")
    rnd = random.Random(seed)
    n = min(num_items, len(cuts))
    golds = [k % num_choices for k in range(n)]  # every position equally often
    rnd.shuffle(golds)
    items = []
    for k in range(n):
        context, true = cuts[k]
        others = [i for i in range(len(cuts)) if i != k and cuts[i][1] != true]
        distract = [cuts[i][1] for i in rnd.sample(others, num_choices - 1)]
        gold = golds[k]
        choices = distract[:gold] + [true] + distract[gold:]
        items.append({"context": context, "choices": choices, "gold": gold,
                      "language": language, "target_delimiter": " " if spaced else ""})
    return items


def write_demo_task(input_path: str, language: str, output: str, **kw) -> str:
    items = build_items(_read_texts(input_path), language, **kw)
    with open(output, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    return output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build a demo multiple-choice task (smoke signal).")
    ap.add_argument("--input", required=True, help="held-out JSON-lines text (.gz ok)")
    ap.add_argument("--language", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--num-items", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        write_demo_task(a.input, a.language, a.output, num_items=a.num_items, seed=a.seed)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {a.input}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
