"""Running a study: data preparation, cooldown branches, local training, print mode.

Finished runs are always skipped and unfinished ones resume from their own checkpoint, so
running a study again continues it. A WSD cooldown branch starts from the stable run's
checkpoint at its branch iteration: `prepare_run` links that checkpoint into the branch's
checkpoint directory (and points its tracker at it), so the branch's ordinary `--load` resumes
there exactly (weights, optimizer, data position) and `--override-opt-param-scheduler`
switches the schedule to the branch's decay.
"""
from __future__ import annotations

import logging
import os
import shlex
import time

from megacpt.study.config import StudyConfig
from megacpt.study.downstream import evaluate_run, evaluated
from megacpt.study.plan import (TOKENIZER_TOOL, Run, data_commands, data_files,
                                eval_iters, run_finished)

log = logging.getLogger("megacpt.study")


def pending_data_commands(cfg: StudyConfig) -> list[list[str]]:
    """The data-preparation commands whose outputs do not exist yet."""
    out = []
    for argv in data_commands(cfg):
        if argv[0] == TOKENIZER_TOOL:
            done = os.path.isfile(data_files(cfg)["tokenizer_model"])
        else:
            done = os.path.isfile(argv[argv.index("--output-prefix") + 1] +
                                  "_text_document.idx")
        if not done:
            out.append(argv)
    return out


def prepare_data(cfg: StudyConfig) -> None:
    """Tokenizer and binaries in out_dir/data, then the held-out samples (existing kept)."""
    from megacpt.data import preprocess, tokenizer_train

    for argv in pending_data_commands(cfg):
        log.info("data: python -m %s", " ".join(shlex.quote(a) for a in argv))
        main = tokenizer_train.main if argv[0] == TOKENIZER_TOOL else preprocess.main
        main(argv[1:])
    sample_heldout(cfg)


def sample_heldout(cfg: StudyConfig) -> dict[str, int]:
    """valid_tokens: per language, whole documents drawn at random across the held-out set
    (not its first documents) until they hold the tokens evaluated; {lang: tokens written}."""
    import numpy as np

    from megacpt.data.indexed import IndexedDataset, IndexedDatasetBuilder, bin_path, idx_path

    files, out = data_files(cfg), {}
    if cfg.valid_tokens is None:
        return out
    need = eval_iters(cfg) * cfg.micro_batch_size * cfg.seq_length + 1
    for lang, prefix in files["valid"].items():
        if os.path.isfile(idx_path(prefix)):
            out[lang] = IndexedDataset(prefix).num_tokens
            continue
        src = IndexedDataset(files["valid_source"][lang])
        docs = np.asarray(src.document_indices)
        lengths = np.asarray(src.sequence_lengths, dtype=np.int64)
        doc_tokens = np.add.reduceat(lengths, docs[:-1]) if len(lengths) else np.zeros(0)
        order = np.random.default_rng(cfg.seed).permutation(len(doc_tokens))
        take = np.searchsorted(np.cumsum(doc_tokens[order]), need) + 1
        chosen = np.sort(order[:take])
        if doc_tokens.sum() < need:
            log.warning("held-out set %s has %d tokens, fewer than the %d asked for: using all",
                        files["valid_source"][lang], int(doc_tokens.sum()), need)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        b = IndexedDatasetBuilder(bin_path(prefix) + ".tmp", src.dtype)
        for d in chosen:
            for i in range(docs[d], docs[d + 1]):
                b.add_item(src[i])
            b.end_document()
        b.finalize(idx_path(prefix) + ".part")
        os.replace(bin_path(prefix) + ".tmp", bin_path(prefix))
        os.replace(idx_path(prefix) + ".part", idx_path(prefix))
        out[lang] = b.num_tokens
        log.info("held-out sample %s: %d of %d documents, %d tokens (evaluated: %d)", lang,
                 len(chosen), len(doc_tokens), b.num_tokens, need - 1)
    return out


def prepare_run(run: Run) -> None:
    """A cooldown branch without a checkpoint of its own starts at the stable run's."""
    from megacpt.checkpoint.format import iter_dirname, read_tracker, write_tracker

    if run.role != "branch" or read_tracker(run.ckpt_dir) is not None:
        return
    trunk_ckpt = os.path.join(os.path.dirname(run.ckpt_dir), run.branch_of)
    src = os.path.join(trunk_ckpt, iter_dirname(run.branch_iter))
    if not os.path.isdir(src):
        raise RuntimeError(f"run {run.name}: the stable run {run.branch_of} has no checkpoint "
                           f"of iteration {run.branch_iter} ({src}); train it first")
    os.makedirs(run.ckpt_dir, exist_ok=True)
    link = os.path.join(run.ckpt_dir, iter_dirname(run.branch_iter))
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(src), link)
    write_tracker(run.ckpt_dir, run.branch_iter)


def run_one(run: Run) -> int:
    """Prepare and train one run in this process; the trainer's exit code."""
    from megacpt import train

    prepare_run(run)
    log.info("python -m megacpt.train %s", " ".join(shlex.quote(a) for a in run.argv))
    cfg, opts = run.resolved()
    return train.run(cfg, opts)


def run_local(cfg: StudyConfig, runs: list[Run]) -> None:
    """Train every unfinished run in this process, one after another (FLOP-weighted ETA)."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _train_all(cfg, runs)
    finally:
        torch.set_num_threads(threads)


def _train_all(cfg: StudyConfig, runs: list[Run]) -> None:
    cost = {r.name: (r.train_iters - (r.branch_iter or 0)) * r.num_parameters for r in runs}
    todo = [r for r in runs if not run_finished(r)]
    for r in runs:
        if r not in todo:
            log.info("skipping %s: finished (%d iterations)", r.name, r.train_iters)
    total, done, t0 = sum(cost[r.name] for r in todo), 0, time.time()
    for k, run in enumerate(todo, 1):
        elapsed = time.time() - t0
        eta = f", ETA {elapsed * (total - done) / done:.0f}s" if done else ""
        log.info("=== run %d/%d: %s (%s, %d iterations; study elapsed %.0fs%s) ===", k,
                 len(todo), run.name, run.size, run.train_iters, elapsed, eta)
        code = run_one(run)
        if code != 0 or not run_finished(run):
            raise RuntimeError(f"run {run.name} failed (exit code {code}); its command is in "
                               f"{os.path.join(cfg.out_dir, 'plan.json')}; fix the cause and "
                               f"run the study again (finished runs are skipped)")
        evaluate_run(cfg, run, force=True)  # the config's downstream tasks (when it names any)
        done += cost[run.name]


def stages(cfg: StudyConfig, runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Unfinished runs by stage: source models, then full/stable runs, then branches."""
    left = [r for r in runs if not run_finished(r)]
    return [(title, [r for r in left if pick(r)]) for title, pick in (
        ("source", lambda r: r.kind == "source"),
        ("target", lambda r: r.kind != "source" and r.role != "branch"),
        ("branch", lambda r: r.role == "branch"))]


def run_command(cfg: StudyConfig, run: Run, tool: str, python: str = "python") -> str:
    """The shell line(s) of one run under the study's launcher (branches prepared first, the
    downstream evaluation of its final checkpoint after, when the config names tasks)."""
    line = f"{cfg.launcher} " + " ".join(shlex.quote(a) for a in run.argv)
    study = (f"{shlex.quote(python)} {shlex.quote(tool)} --config {shlex.quote(cfg.path)} --out "
             f"{shlex.quote(cfg.out_dir)}")
    if run.role == "branch":
        line = f"{study} --prepare-run {shlex.quote(run.name)} && {line}"
    if cfg.downstream and evaluated(run):
        line = f"{line} && {study} --evaluate-run {shlex.quote(run.name)}"
    return line


def write_commands(cfg: StudyConfig, runs: list[Run], tool: str) -> str:
    """commands.sh: data preparation, then each stage's unfinished runs."""
    lines = ["#!/bin/bash", f"# study {cfg.name}: generated by tools/run_study.py from "
             f"{cfg.path}", "# run each stage after the previous one has finished;",
             "# then run tools/run_study.py again to fit the laws and write the report", "set -e"]
    data = ["python -m " + " ".join(shlex.quote(a) for a in c)
            for c in pending_data_commands(cfg)]
    if cfg.valid_tokens is not None:
        data.append(f"python {shlex.quote(tool)} --config {shlex.quote(cfg.path)} --out "
                    f"{shlex.quote(cfg.out_dir)} --prepare-data")
    titled = [("data preparation", data)] + [
        ({"source": "source models", "target": "target-language runs (need the source models)",
          "branch": "cooldown branches (need the stable runs)"}[s],
         [run_command(cfg, r, tool) for r in rs]) for s, rs in stages(cfg, runs)]
    for title, cmds in titled:
        if cmds:
            lines += ["", f"# --- {title} ---", *cmds]
    path = os.path.join(cfg.out_dir, "commands.sh")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path
