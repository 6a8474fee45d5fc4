"""Quickstart: continual pre-training (CPT) beats training from scratch, in miniature.

    python examples/quickstart.py [--out runs/quickstart] [--device cpu|cuda]
                                  [--model-size debug-xs] [--target-iters 200] ...

Runs on a fresh install with no network and no GPU (2 CPU cores: a few minutes), using the
bundled sample corpus in `examples/data` (`{lang}_train.jsonl.gz`, `{lang}_valid.jsonl.gz`):

1. trains a bilingual SentencePiece tokenizer on the source (English) and target (Chinese)
   training text, and preprocesses both languages' training and held-out validation text
   into indexed binaries (`tools/train_tokenizer.py`, `tools/preprocess_data.py`);
2. pretrains a tiny English *source* model;
3. trains the Chinese model three ways for the same number of steps: from scratch, CPT
   from the source model (`--init-from`), and CPT with 30% English replay;
4. scores every final model on demo multiple-choice tasks built from each language's
   held-out text (pick the true continuation among 4: a smoke signal, not the paper's
   benchmarks; `megacpt.evaluation.demo_tasks`) with `megacpt.evaluate`'s scorer;
5. prints a table, writes `OUT/summary.json` and plots both languages' validation loss vs
   tokens and vs compute, and the downstream accuracy as bars.

Every training stage is `megacpt.train.main(argv)` with Megatron's flags (printed before it
runs, so each stage can be re-run by hand); the tokenizer and preprocessing stages call the
tools' mains. Progress lines (with rate and ETA) come from the tools and the trainer.

Output directory layout::

    OUT/tokenizer.model, tokenizer.vocab    bilingual SentencePiece BPE
    OUT/data/{lang}_{train,valid}_text_document.{bin,idx}
    OUT/runs/{source,scratch,cpt,cpt_replay}/    metrics.jsonl + config.json (--log-dir)
    OUT/checkpoints/{source,scratch,cpt,cpt_replay}/  our checkpoint layout (--save)
    OUT/tasks/demo_{lang}.jsonl                  demo multiple-choice tasks (held-out text)
    OUT/summary.json, OUT/loss_vs_tokens.png, OUT/loss_vs_compute.png, OUT/downstream.png

`summary.json` (all losses are mean per-token validation cross-entropy in nats, on the same
held-out tokens for every model)::

    {"source_lang": "en", "target_lang": "zh", "replay_fraction": 0.3,
     "target_valid_loss": {"scratch": L, "cpt": L, "cpt_replay": L},   # final, target set
     "source_valid_loss": {"source_model": L, "cpt": L, "cpt_replay": L},  # final, source set
     "tokens_saved_fraction": f,     # 1 - D_cpt / D_scratch: share of target tokens CPT
                                     # saves to reach scratch's final target loss (D_cpt by
                                     # linear interpolation of CPT's validation curve);
                                     # null when CPT never reaches that loss
     "target_tokens": {"scratch": D, "cpt": D, "cpt_replay": D},  # target tokens trained
     "flops": {"source": C, "scratch": C, "cpt": C, "cpt_replay": C},  # training FLOPs
     "findings": {"cpt_beats_scratch": bool, "replay_limits_forgetting": bool},
     "downstream": {"metric": "acc_norm", "tasks": {"demo_zh": file, "demo_en": file},
                    "runs": {"source_model" | "scratch" | "cpt" | "cpt_replay":
                             {lang: {"acc": a, "acc_norm": a, "num_items": n}}}},
                    # absent with --eval-items 0
     "curves": {run: {"iteration": [...], "target_tokens": [...], "tokens": [...],
                      "flops": [...], "valid_loss": {lang: [...]}}},
     "model": {...shape and parameter count...}, "train_iters": {...}, "seconds": {...},
     "commands": {stage: [argv...]}}

`findings.replay_limits_forgetting` is true when replay's source-language loss is lower
than CPT's by at least half of the rise CPT's source loss shows over the source model's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megacpt import sizes  # noqa: E402

TARGET_RUNS = ("scratch", "cpt", "cpt_replay")
SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups")


def get_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Tokenizer -> preprocess -> source model -> scratch vs CPT vs CPT+replay.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="output directory")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "examples", "data"),
                    help="holds {lang}_train.jsonl.gz and {lang}_valid.jsonl.gz")
    ap.add_argument("--source-lang", default="en")
    ap.add_argument("--target-lang", default="zh", help="zh, fr or ru with the bundled corpus")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--bf16", action="store_true", help="bf16 training (GPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default); tiny models train fastest "
                         "on one thread, especially on a busy machine")
    g = ap.add_argument_group("sizes")
    g.add_argument("--model-size", default="debug-xs",
                   help=f"registered size (debug: {', '.join(sizes.DEBUG_SIZES)}; or a paper "
                        f"size like 49M); the shape flags below override it")
    for flag in SHAPE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int)
    g.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary")
    g.add_argument("--character-coverage", type=float, default=0.99,
                   help="tokenizer: share of characters that get their own piece, the rest "
                        "fall back to bytes (SentencePiece BPE allows 0.98 to 1)")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--micro-batch-size", type=int, default=16)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--source-iters", type=int, default=300, help="source pretraining steps")
    g.add_argument("--target-iters", type=int, default=200,
                   help="steps of each target run (scratch, cpt, cpt_replay)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak LR (cosine, 5%% warm-up)")
    g.add_argument("--replay", type=float, default=0.3, help="source-language share of CPT "
                   "with replay")
    g.add_argument("--evals", type=int, default=10, help="validations per run")
    g.add_argument("--eval-iters", type=int, default=4,
                   help="validation micro-batches per language")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-items", type=int, default=48,
                   help="demo multiple-choice items per language for the downstream "
                        "accuracy (0: skip)")
    args = ap.parse_args(argv)
    for name in ("vocab_size", "seq_length", "micro_batch_size", "global_batch_size",
                 "source_iters", "target_iters", "evals", "eval_iters", "threads",
                 "eval_items"):
        least = 0 if name in ("threads", "eval_items") else 1
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.model_size not in sizes.SIZES:
        ap.error(f"--model-size {args.model_size!r} is not registered; one of: "
                 f"{', '.join(sizes.SIZES)}")
    if not 0.98 <= args.character_coverage <= 1:
        ap.error(f"--character-coverage must be in [0.98, 1] (SentencePiece BPE), got "
                 f"{args.character_coverage}")
    if not 0 < args.replay < 1:
        ap.error(f"--replay must be in (0, 1), got {args.replay}")
    if args.source_lang == args.target_lang:
        ap.error("--source-lang and --target-lang must differ")
    for lang in (args.source_lang, args.target_lang):
        for split in ("train", "valid"):
            path = corpus_file(args, lang, split)
            if not os.path.isfile(path):
                ap.error(f"--data-dir {args.data_dir}: {os.path.basename(path)} not found "
                         f"(expected {{lang}}_{{train,valid}}.jsonl.gz per language)")
    return args


def corpus_file(args, lang: str, split: str) -> str:
    return os.path.join(args.data_dir, f"{lang}_{split}.jsonl.gz")


class Stages:
    """Numbered stage banners with elapsed time and a rough ETA for the whole quickstart."""

    def __init__(self, weights: dict[str, float]):
        self.weights, self.done, self.t0 = weights, 0.0, time.time()
        self.total = sum(weights.values())
        self.seconds: dict[str, float] = {}
        self._current, self._start = None, None

    def begin(self, name: str, what: str) -> None:
        self._current, self._start = name, time.time()
        k = list(self.weights).index(name) + 1
        elapsed = time.time() - self.t0
        eta = "" if self.done == 0 else \
            f", ETA {elapsed * (self.total - self.done) / self.done:.0f}s"
        print(f"\n=== [{k}/{len(self.weights)}] {what} (elapsed {elapsed:.0f}s{eta}) ===",
              flush=True)

    def end(self) -> None:
        self.seconds[self._current] = round(time.time() - self._start, 2)
        self.done += self.weights[self._current]


# ----- stage 1: tokenizer and data -----

def prepare_data(args, out: str) -> tuple[str, dict[str, str]]:
    """Train the tokenizer and preprocess 4 files; returns (tokenizer, {lang_split: prefix})."""
    from megacpt.data import preprocess, tokenizer_train

    model_prefix = os.path.join(out, "tokenizer")
    tokenizer_train.main(["--input", corpus_file(args, args.source_lang, "train"),
                          corpus_file(args, args.target_lang, "train"),
                          "--vocab-size", str(args.vocab_size),
                          "--character-coverage", str(args.character_coverage),
                          "--model-prefix", model_prefix, "--num-threads", "2"])
    prefixes = {}
    for lang in (args.source_lang, args.target_lang):
        for split in ("train", "valid"):
            prefix = os.path.join(out, "data", f"{lang}_{split}")
            preprocess.main(["--input", corpus_file(args, lang, split), "--tokenizer-model",
                             model_prefix + ".model", "--output-prefix", prefix,
                             "--append-eod", "--workers", "1"])
            prefixes[f"{lang}_{split}"] = prefix + "_text_document"
    return model_prefix + ".model", prefixes


# ----- stages 2-5: training -----

def model_config(args, vocab_size: int):
    """The model: the registered size, with any shape flags given overriding it."""
    from megacpt.config import ModelConfig

    given = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None}
    model = ModelConfig.from_size(args.model_size, vocab_size=vocab_size,
                                  seq_length=args.seq_length)
    if not given:
        return model
    shape = {f: getattr(model, f) for f in SHAPE_FLAGS}
    shape.update(given)
    if shape["num_attention_heads"] % shape["num_query_groups"]:
        shape["num_query_groups"] = shape["num_attention_heads"]
    return ModelConfig(**shape, vocab_size=vocab_size, seq_length=args.seq_length)


def train_config(args, out: str, tokenizer: str, prefixes: dict[str, str], name: str,
                 data_path: list[str], iters: int, init_from: str | None):
    """The resolved `Config` of one training stage (its command: `config_to_argv`)."""
    from megacpt.arguments import tokenizer_vocab_size
    from megacpt.config import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                OptimizerConfig, TrainingConfig)

    src, tgt = args.source_lang, args.target_lang
    return Config(
        model=model_config(args, tokenizer_vocab_size(tokenizer)),
        data=DataConfig(data_path=list(data_path), split="1,0,0",
                        valid_data_path={tgt: prefixes[tgt + "_valid"],
                                         src: prefixes[src + "_valid"]},
                        tokenizer_model=tokenizer, num_workers=0,
                        data_cache_path=os.path.join(out, "data", "index-cache"),
                        target=tgt if name != "source" else src),
        optim=OptimizerConfig(lr=args.lr, min_lr=args.lr / 10, lr_warmup_fraction=0.05),
        training=TrainingConfig(micro_batch_size=args.micro_batch_size,
                                global_batch_size=args.global_batch_size, train_iters=iters,
                                seed=args.seed, bf16=args.bf16, device=args.device,
                                eval_interval=-(-iters // args.evals),
                                eval_iters=args.eval_iters),
        checkpoint=CheckpointConfig(save=os.path.join(out, "checkpoints", name),
                                    init_from=init_from),
        logging=LoggingConfig(log_dir=os.path.join(out, "runs", name),
                              log_interval=max(1, iters // 10), tensorboard=False,
                              run_kind="scratch" if init_from is None else "cpt"))


def run_training(cfg, name: str) -> list[str]:
    """Train one stage in this process; returns its command-line flags."""
    from megacpt import train
    from megacpt.flags import config_to_argv

    argv = config_to_argv(cfg)
    print("python -m megacpt.train " + " ".join(argv), flush=True)
    code = train.run(cfg)
    if code != 0:
        raise SystemExit(f"error: the {name} training run failed (exit code {code}); the "
                         f"command is printed above")
    return argv


# ----- analysis -----

def read_curve(run_dir: str, target: str) -> dict:
    """Validation curves of one run: tokens/flops at each evaluation and loss per set."""
    from megacpt.training.metrics import read_metrics

    rows = read_metrics(run_dir)
    header = next((r for r in rows if r.get("type") == "header"), None)
    if header is None:
        raise ValueError(f"{run_dir}/metrics.jsonl: no header row")
    target_tokens = {0: 0}
    for r in rows:
        if r.get("type") == "train":
            target_tokens[r["iteration"]] = r["consumed_tokens_per_dataset"].get(target, 0)
    by_iter: dict[int, dict] = {}
    for r in rows:
        if r.get("type") != "valid":
            continue
        point = by_iter.setdefault(r["iteration"], {"tokens": r["consumed_tokens"],
                                                    "flops": r["flops"], "loss": {}})
        point["loss"][r["name"]] = r["loss"]
    its = sorted(by_iter)
    if not its:
        raise ValueError(f"{run_dir}/metrics.jsonl: no validation rows")
    names = sorted({n for it in its for n in by_iter[it]["loss"]})
    return {"iteration": its, "target_tokens": [target_tokens.get(i, 0) for i in its],
            "tokens": [by_iter[i]["tokens"] for i in its],
            "flops": [by_iter[i]["flops"] for i in its],
            "valid_loss": {n: [by_iter[i]["loss"].get(n) for i in its] for n in names},
            "flops_per_token": header["flops_per_token"],
            "num_parameters": header["num_parameters"]}


def tokens_to_reach(tokens: list[float], losses: list[float], level: float) -> float | None:
    """First x at which the piecewise-linear curve (tokens, losses) falls to `level`."""
    for i, (x, y) in enumerate(zip(tokens, losses)):
        if y is None or not math.isfinite(y):
            continue
        if y <= level:
            if i == 0:
                return float(x)
            x0, y0 = tokens[i - 1], losses[i - 1]
            if y0 is None or not math.isfinite(y0) or y0 == y:
                return float(x)
            return float(x0 + (x - x0) * (y0 - level) / (y0 - y))
    return None


def summarize(args, curves: dict[str, dict]) -> dict:
    src, tgt = args.source_lang, args.target_lang
    final = {k: {n: v[-1] for n, v in c["valid_loss"].items()} for k, c in curves.items()}
    scratch_final = final["scratch"][tgt]
    d_scratch = curves["scratch"]["target_tokens"][-1]
    d_cpt = tokens_to_reach(curves["cpt"]["target_tokens"], curves["cpt"]["valid_loss"][tgt],
                            scratch_final)
    saved = None if d_cpt is None or d_scratch <= 0 else 1.0 - d_cpt / d_scratch
    src_loss = {"source_model": final["source"][src], "cpt": final["cpt"][src],
                "cpt_replay": final["cpt_replay"][src]}
    rise = src_loss["cpt"] - src_loss["source_model"]
    return {
        "source_lang": src, "target_lang": tgt, "replay_fraction": args.replay,
        "target_valid_loss": {k: final[k][tgt] for k in TARGET_RUNS},
        "source_valid_loss": src_loss,
        "tokens_saved_fraction": saved,
        "target_tokens": {k: curves[k]["target_tokens"][-1] for k in TARGET_RUNS},
        "flops": {k: c["flops"][-1] for k, c in curves.items()},
        "findings": {
            "cpt_beats_scratch": final["cpt"][tgt] < scratch_final,
            "replay_limits_forgetting": rise > 0 and
            src_loss["cpt"] - src_loss["cpt_replay"] >= 0.5 * rise},
        "curves": {k: {f: c[f] for f in ("iteration", "target_tokens", "tokens", "flops",
                                         "valid_loss")} for k, c in curves.items()},
    }


def print_table(summary: dict) -> None:
    src, tgt = summary["source_lang"], summary["target_lang"]
    rows = [("source model", None, summary["source_valid_loss"]["source_model"], None)]
    for k in TARGET_RUNS:
        rows.append((k.replace("_", " + ") if k != "cpt_replay" else
                     f"cpt + {100 * summary['replay_fraction']:.0f}% replay",
                     summary["target_valid_loss"][k],
                     summary["source_valid_loss"].get(k), summary["target_tokens"][k]))
    print(f"\n{'run':<22}{tgt + ' valid loss':>16}{src + ' valid loss':>16}"
          f"{tgt + ' tokens':>14}")
    for name, t, s, d in rows:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{name:<22}{fmt(t):>16}{fmt(s):>16}{'-' if d is None else f'{d:,}':>14}")
    saved = summary["tokens_saved_fraction"]
    print(f"\nCPT reaches scratch's final {tgt} loss with "
          + ("(never reached)" if saved is None else f"{100 * saved:.1f}% fewer {tgt} tokens"))
    down = summary.get("downstream")
    if down:
        langs = list(next(iter(down["runs"].values())))
        print(f"\ndownstream {down['metric']} (demo tasks: true continuation among 4, a smoke "
              f"signal; chance 0.25)")
        print(f"{'run':<22}" + "".join(f"{lang:>10}" for lang in langs))
        for run, res in down["runs"].items():
            print(f"{run:<22}" + "".join(f"{res[lang][down['metric']]:>10.3f}" for lang in langs))
    f = summary["findings"]
    print(f"CPT beats scratch at equal tokens: {'yes' if f['cpt_beats_scratch'] else 'NO'}; "
          f"replay keeps {src} loss well below CPT without replay: "
          f"{'yes' if f['replay_limits_forgetting'] else 'NO'}")


def plot(summary: dict, out: str) -> list[str]:
    """loss_vs_tokens.png and loss_vs_compute.png: one panel per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, tgt = summary["source_lang"], summary["target_lang"]
    curves, paths = summary["curves"], []
    styles = {"scratch": ("tab:gray", "scratch"), "cpt": ("tab:blue", "CPT"),
              "cpt_replay": ("tab:orange", f"CPT + {100 * summary['replay_fraction']:.0f}% "
                                            f"{src} replay")}
    for xkey, xlabel, fname in (
            ("target_tokens", f"{tgt} tokens trained", "loss_vs_tokens.png"),
            ("flops", "training compute of the run (FLOPs)", "loss_vs_compute.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, lang in zip(axes, (tgt, src)):
            for k in TARGET_RUNS:
                color, label = styles[k]
                ax.plot(curves[k][xkey], curves[k]["valid_loss"][lang], "o-", ms=3,
                        color=color, label=label)
            ax.axhline(summary["source_valid_loss"]["source_model"] if lang == src else
                       summary["target_valid_loss"]["scratch"], color="k", ls=":", lw=1,
                       label="source model" if lang == src else "scratch final")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{lang} validation loss")
            ax.set_title(f"{lang} ({'target' if lang == tgt else 'source'} language)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run_downstream(args, out: str) -> dict:
    """Demo tasks per language from the held-out text; every final model scored on them."""
    from megacpt.evaluation.report import demo_task_files, evaluate_checkpoints

    langs = (args.target_lang, args.source_lang)
    tasks = demo_task_files(args.data_dir, list(langs), os.path.join(out, "tasks"),
                            args.eval_items, args.seed)
    ckpts = {"source_model" if k == "source" else k: os.path.join(out, "checkpoints", k)
             for k in ("source", *TARGET_RUNS)}
    res = evaluate_checkpoints(ckpts, tasks, batch_size=32, device=args.device)
    return {"metric": "acc_norm", "tasks": tasks,
            "runs": {run: {lang: {k: r[f"demo_{lang}"][k] for k in ("acc", "acc_norm",
                                                                    "num_items")}
                           for lang in langs} for run, r in res.items()}}


# ----- main -----

def main(argv=None) -> dict:
    import torch

    args = get_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_quickstart(args)
    finally:
        torch.set_num_threads(threads)


def run_quickstart(args) -> dict:
    """All stages (see the module docstring); returns the summary."""
    out = os.path.abspath(args.out)
    for sub in ("runs", "checkpoints", "data"):  # a fresh start: no stale resumes
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    stages = Stages({"data": 0.5 * args.source_iters / 10, "source": args.source_iters,
                     **{k: args.target_iters for k in TARGET_RUNS},
                     "downstream": 0.05 * args.eval_items, "report": 1})
    stages.begin("data", f"tokenizer ({args.vocab_size} pieces) and preprocessing")
    tokenizer, prefixes = prepare_data(args, out)
    stages.end()
    src, tgt = args.source_lang, args.target_lang
    src_train, tgt_train = prefixes[src + "_train"], prefixes[tgt + "_train"]
    ckpt = os.path.join(out, "checkpoints", "source")
    plan = {
        "source": (f"pretrain the {src} source model", ["1.0", f"{src}={src_train}"],
                   args.source_iters, None),
        "scratch": (f"{tgt} from scratch", ["1.0", f"{tgt}={tgt_train}"], args.target_iters,
                    None),
        "cpt": (f"{tgt} CPT from the {src} model", ["1.0", f"{tgt}={tgt_train}"],
                args.target_iters, ckpt),
        "cpt_replay": (f"{tgt} CPT with {100 * args.replay:.0f}% {src} replay",
                       [f"{1 - args.replay:g}", f"{tgt}={tgt_train}", f"{args.replay:g}",
                        f"{src}={src_train}"], args.target_iters, ckpt),
    }
    commands, curves = {}, {}
    for name, (what, data_path, iters, init_from) in plan.items():
        stages.begin(name, what)
        cfg = train_config(args, out, tokenizer, prefixes, name, data_path, iters, init_from)
        commands[name] = run_training(cfg, name)
        curves[name] = read_curve(os.path.join(out, "runs", name), tgt if name != "source"
                                  else src)
        stages.end()
    downstream = None
    stages.begin("downstream", f"downstream accuracy on {args.eval_items} demo items per "
                               f"language")
    if args.eval_items:
        downstream = run_downstream(args, out)
    stages.end()
    stages.begin("report", "summary, table and plots")
    summary = summarize(args, curves)
    if downstream:
        summary["downstream"] = downstream
    head = curves["source"]
    summary.update({
        "model": {"size": args.model_size, "shape": {f: getattr(cfg.model, f)
                                                      for f in SHAPE_FLAGS},
                  "num_parameters": head["num_parameters"],
                  "flops_per_token": head["flops_per_token"], "vocab_size": args.vocab_size,
                  "seq_length": args.seq_length, "global_batch_size": args.global_batch_size},
        "train_iters": {"source": args.source_iters, "target": args.target_iters},
        "commands": commands})
    print_table(summary)
    plots = plot(summary, out)
    if downstream:
        from megacpt.evaluation.report import plot_downstream

        plots.append(plot_downstream(
            {run: {lang: m for lang, m in res.items()} for run, res in downstream["runs"].items()},
            os.path.join(out, "downstream.png"), chance={lang: 0.25 for lang in
                                                         (args.target_lang, args.source_lang)},
            title="demo tasks (smoke signal): acc_norm per language"))
    stages.end()
    summary["seconds"] = {**stages.seconds, "total": round(time.time() - stages.t0, 2)}
    path = os.path.join(out, "summary.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(f"\nwrote {path} and {', '.join(plots)} in {summary['seconds']['total']:.0f}s")
    return summary


if __name__ == "__main__":
    main()
