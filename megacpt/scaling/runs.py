"""Scaling-law data: the trainer's run directories and (N, D, loss) CSV files.

Runs (`load_runs`).  A run directory holds `metrics.jsonl` (the format is owned by the trainer,
megacpt.training; the fields read here):

    {"type": "header", "model_size": "1393M", "num_parameters": N, "run_kind": "scratch"|"cpt",
     "blend": {"zh": 0.7, "en": 0.3}, "target": "zh", ...}              first row
    {"type": "train", "iteration": i, "consumed_tokens": t,
     "consumed_tokens_per_dataset": {"zh": t_zh, ...}, ...}              training rows
    {"type": "valid", "split": "valid", "name": "zh", "iteration": i, "loss": l,
     "consumed_tokens": t, "flops": f}                                   validation rows

Each validation row with `name == valid_name` (default: the header's `target`) is one point
(N, D, loss) with N = num_parameters and D = the tokens of the *target* language consumed so
far: `consumed_tokens_per_dataset[target]` of the training row logged at the same iteration
(or, when no training row has that iteration, the latest earlier one's target share times the
validation row's consumed_tokens).  Only when the training rows carry no per-dataset count for
the target is D the total `consumed_tokens`; that overcounts replay runs, so the run dict says
which was used ("D_source").  Compute is C = 6 N D, i.e. target-language compute, the axis on
which the paper compares scratch and CPT (replay tokens are not counted); the logged total
"flops" is kept as its own array.  Rows at D = 0 (evaluation before training) carry no
information for D^-beta and are dropped.  A later header row (a resumed run) must agree on
num_parameters and target; a repeated iteration keeps its last row.  A final line without a
newline (a write cut off by a crash) is skipped with a warning.

CSV (`read_points_csv`): a header row with columns N, D, loss (any order), optional C
(FLOPs; default 6 N D) and run (a curve label; default: one curve per N); other columns are
ignored.  Every value must be a finite number > 0.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Points:
    """Scaling-law points; `group` labels the curve (run) each point belongs to."""

    N: np.ndarray  # [n] parameters
    D: np.ndarray  # [n] tokens
    loss: np.ndarray  # [n]
    C: np.ndarray  # [n] FLOPs
    group: np.ndarray  # [n] str labels
    source: str = "data"

    def __len__(self) -> int:
        return int(self.loss.size)

    def select(self, mask) -> "Points":
        return Points(self.N[mask], self.D[mask], self.loss[mask], self.C[mask],
                      self.group[mask], self.source)

    def curves(self):
        """Yield (label, Points of that curve sorted by D) in first-seen order."""
        labels = dict.fromkeys(self.group.tolist())
        for label in labels:
            sub = self.select(self.group == label)
            yield label, sub.select(np.argsort(sub.D, kind="stable"))


def _metrics_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such run directory or metrics.jsonl file")
    direct = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(direct):
        return [direct]
    found = sorted(os.path.join(path, d, "metrics.jsonl") for d in os.listdir(path)
                   if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))
    if not found:
        raise FileNotFoundError(f"{path}: no metrics.jsonl in it or in its subdirectories")
    return found


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: skipping a truncated last line", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "type" not in row:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'type' field")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: empty metrics file (expected a header row first)")
    return rows


def _field(path, lineno, row, key, kind=float, positive=False):
    if key not in row:
        raise ValueError(f"{path}:{lineno}: {row.get('type', 'a')} row lacks field '{key}'")
    if row[key] is None:
        why = " (the trainer writes non-finite values as null)" if kind is float else ""
        raise ValueError(f"{path}:{lineno}: field '{key}' is null{why}; expected "
                         f"{'a finite number' if kind is float else kind.__name__}")
    try:
        val = kind(row[key])
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{lineno}: field '{key}' = {row[key]!r} is not "
                         f"{'a number' if kind is float else kind.__name__}") from None
    if kind is float and not np.isfinite(val):
        raise ValueError(f"{path}:{lineno}: field '{key}' is {row[key]!r}; expected finite")
    if positive and not val > 0:
        raise ValueError(f"{path}:{lineno}: field '{key}' = {row[key]!r}; expected > 0")
    return val


def _check_header(path, rows):
    lineno, header = rows[0]
    if header["type"] != "header":
        raise ValueError(f"{path}:{lineno}: first row has type {header['type']!r}; "
                         "expected the 'header' row")
    _field(path, lineno, header, "num_parameters", float, positive=True)
    _field(path, lineno, header, "target", str)
    for ln, row in rows[1:]:
        if row["type"] == "header" and (row.get("num_parameters") != header["num_parameters"]
                                        or row.get("target") != header["target"]):
            raise ValueError(f"{path}:{ln}: header disagrees with line {lineno} on "
                             "num_parameters/target (two runs in one file?)")
    return header


def _target_tokens(path, train, target, it, total):
    """(D, source) for a validation row at iteration `it` with `total` consumed tokens."""
    its = train["iteration"]
    j = np.searchsorted(its, it, side="right") - 1
    if j < 0:
        return total, "consumed_tokens"
    lineno, row = train["rows"][j]
    per = row.get("consumed_tokens_per_dataset")
    if not isinstance(per, dict) or target not in per:
        return total, "consumed_tokens"
    d = _field(path, lineno, per, target)
    if its[j] == it:
        return d, f"consumed_tokens_per_dataset[{target}]"
    tot = _field(path, lineno, row, "consumed_tokens")
    return (total * d / tot if tot > 0 else 0.0), f"consumed_tokens_per_dataset[{target}]"


def load_run(path: str, valid_name: str | None = None) -> dict:
    """One run from a metrics.jsonl file; see the module docstring for the fields."""
    rows = _read_jsonl(path)
    header = _check_header(path, rows)
    target = header["target"]
    name = valid_name or target
    train_by_it, valid_by_it = {}, {}
    for lineno, row in rows:
        if row["type"] == "train":
            train_by_it[int(_field(path, lineno, row, "iteration"))] = (lineno, row)
        elif row["type"] == "valid" and row.get("name") == name \
                and row.get("split", "valid") == "valid":
            valid_by_it[int(_field(path, lineno, row, "iteration"))] = (lineno, row)
    if not valid_by_it:
        names = sorted({r.get("name") for _, r in rows if r["type"] == "valid"} - {None})
        log.warning("%s: no validation rows named %r (names present: %s)", path, name, names)
    train_its = sorted(train_by_it)
    train = {"iteration": np.array(train_its, dtype=np.int64),
             "rows": [train_by_it[i] for i in train_its]}
    N = float(header["num_parameters"])
    cols = {k: [] for k in ("iteration", "loss", "D", "tokens", "flops", "bpb")}
    sources, dropped = set(), 0
    for it in sorted(valid_by_it):
        lineno, row = valid_by_it[it]
        loss = _field(path, lineno, row, "loss", positive=True)
        total = _field(path, lineno, row, "consumed_tokens")
        D, src = _target_tokens(path, train, target, it, total)
        if D <= 0:
            dropped += 1
            continue
        sources.add(src)
        flops = _field(path, lineno, row, "flops") if row.get("flops") is not None else np.nan
        bpb = float(row["bpb"]) if row.get("bpb") is not None else np.nan  # bits per byte
        for key, val in zip(cols, (it, loss, D, total, flops, bpb)):
            cols[key].append(val)
    arrays = {k: np.array(v, dtype=np.int64 if k == "iteration" else np.float64)
              for k, v in cols.items()}
    if "consumed_tokens" in sources and len(header.get("blend") or {}) > 1:
        log.warning("%s: no per-dataset token counts for %r; D is the total consumed_tokens "
                    "of a %d-dataset blend", path, target, len(header["blend"]))
    run_dir = os.path.dirname(os.path.abspath(path))
    return {"name": os.path.basename(run_dir), "path": path, "header": header,
            "model_size": header.get("model_size"), "N": N,
            "run_kind": header.get("run_kind"), "target": target, "valid_name": name,
            "blend": header.get("blend"), "init_from": header.get("init_from"),
            **arrays, "C": 6.0 * N * arrays["D"],
            "D_source": " + ".join(sorted(sources)) or None, "dropped_zero_tokens": dropped}


def load_runs(dirs, valid_name: str | None = None) -> list[dict]:
    """Runs from run directories (or metrics.jsonl files, or folders of run directories).

    Returns one dict per run: name, path, header, model_size, N, run_kind, target,
    valid_name, blend, init_from, and arrays over its validation points (sorted by
    iteration): iteration, loss, D (target tokens), tokens (total), flops (logged total,
    NaN if absent), bpb (bits per byte, NaN if absent), C (= 6 N D); plus D_source and
    dropped_zero_tokens.
    """
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    runs = [load_run(f, valid_name) for d in dirs for f in _metrics_files(os.fspath(d))]
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            r["name"] = os.path.dirname(os.path.abspath(r["path"]))
    return runs


def points_from_runs(runs: list[dict], source: str = "runs") -> Points:
    """All validation points of the runs, one curve per run."""
    if not runs:
        raise ValueError(f"{source}: no runs given")
    cat = {k: np.concatenate([np.asarray(r[k], dtype=np.float64) for r in runs])
           for k in ("D", "loss", "C")}
    N = np.concatenate([np.full(len(r["loss"]), r["N"]) for r in runs])
    group = np.concatenate([np.full(len(r["loss"]), r["name"], dtype=object) for r in runs])
    return Points(N, cat["D"], cat["loss"], cat["C"], group, source)


def read_points_csv(path: str) -> Points:
    """Points from a CSV file with columns N, D, loss [, C] [, run]."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in ("N", "D", "loss") if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected a header row "
                             f"N,D,loss[,C][,run], got {fields}")
        cols = {c: [] for c in ("N", "D", "loss", "C", "run")}
        for lineno, raw in enumerate(reader, 2):
            row = {(k or "").strip(): v for k, v in raw.items()}
            for c in ("N", "D", "loss") + (("C",) if "C" in fields else ()):
                cols[c].append(_csv_number(path, lineno, c, row.get(c)))
            cols["run"].append(row.get("run") or None)
    n = len(cols["loss"])
    N, D, loss = (np.array(cols[c], dtype=np.float64) for c in ("N", "D", "loss"))
    C = np.array(cols["C"], dtype=np.float64) if "C" in fields else 6.0 * N * D
    if "run" in fields and all(cols["run"]):
        group = np.array(cols["run"], dtype=object)
    else:
        group = np.array([f"N={x:.4g}" for x in N], dtype=object)
    if n == 0:
        raise ValueError(f"{path}: no data rows after the header")
    return Points(N, D, loss, C, group, path)


def _csv_number(path, lineno, column, text):
    try:
        val = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{lineno}: column '{column}' = {text!r} is not a number") \
            from None
    if not (np.isfinite(val) and val > 0):
        raise ValueError(f"{path}:{lineno}: column '{column}' = {text!r}; expected a finite "
                         "number > 0")
    return val


def load_points(inputs=None, runs=None, valid_name: str | None = None) -> Points:
    """Points from CSV files (`inputs`) and/or run directories (`runs`), concatenated."""
    parts = []
    for path in ([inputs] if isinstance(inputs, str) else inputs or []):
        parts.append(read_points_csv(path))
    if runs:
        parts.append(points_from_runs(load_runs(runs, valid_name), source=", ".join(
            [runs] if isinstance(runs, str) else list(runs))))
    if not parts:
        raise ValueError("no data: give --input FILE.csv or --runs DIR...")
    if len(parts) == 1:
        return parts[0]
    return Points(*(np.concatenate([getattr(p, k) for p in parts])
                    for k in ("N", "D", "loss", "C", "group")),
                  source=" + ".join(p.source for p in parts))
