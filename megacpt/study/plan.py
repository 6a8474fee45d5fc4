"""Planning: every run of a study as a typed `Config`, its command line, and its dependencies.

Runs (N: the model's parameters as the trainer counts them; budgets in tokens per parameter):

    {src}_{size}_source                    source model, cosine, source_tokens_per_param
    {lang}_{size}_{strategy}               design cosine, one budget
    {lang}_{size}_{strategy}_d{b}          design cosine, several budgets: one run per budget
    {lang}_{size}_{strategy}_stable        design wsd: warm-up then constant LR up to the
                                           start of the largest budget's cooldown, saving a
                                           checkpoint where each budget's cooldown starts
    {lang}_{size}_{strategy}_d{b}          design wsd: a cooldown branch resumed from the
                                           stable run's checkpoint, decaying to min_lr at
                                           exactly b x N tokens (Megatron's WSD schedule)

with strategy scratch, cpt or cpt_replay{r}. Every run is a `megacpt.config.Config`; its
command line is `megacpt.flags.config_to_argv` of it (the one mapping between configs
and flags), so local, print and slurm launches train exactly the same thing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from megacpt.study.config import StudyConfig, StudyConfigError

TOKENIZER_TOOL, PREPROCESS_TOOL = "megacpt.data.tokenizer_train", "megacpt.data.preprocess"


@dataclass
class Run:
    """One training run of a study."""

    name: str
    lang: str
    size: str
    kind: str
    """source | scratch | cpt"""
    replay: float
    num_parameters: int
    train_iters: int
    argv: list
    """The trainer's flags for this run (`config_to_argv` of `config`)."""
    run_dir: str
    ckpt_dir: str
    init_from: str | None = None
    role: str = "full"
    """full (a whole schedule), stable (a WSD trunk, not an end point) or branch (a cooldown)."""
    budget: float | None = None
    """Tokens per parameter at the end of this run's schedule (None for a stable trunk)."""
    branch_of: str | None = None
    """branch: the stable run it resumes from, at iteration branch_iter."""
    branch_iter: int | None = None
    after: list = field(default_factory=list)
    """Names of the runs that must finish first (source models, stable trunks)."""
    config: dict = field(default_factory=dict, repr=False)
    """The resolved `Config.to_dict()` plus "run": RunOptions (what local launch trains)."""

    @property
    def strategy(self) -> str:
        """Group label of the analysis: scratch, cpt, cpt_replay0.3 (source for the source)."""
        if self.kind != "cpt":
            return self.kind
        return "cpt" if self.replay == 0 else f"cpt_replay{self.replay:g}"

    @property
    def end_of_schedule(self) -> bool:
        """Its last point is a fully decayed schedule (what the study fits by default)."""
        return self.role != "stable"

    def resolved(self):
        """(Config, RunOptions) of this run."""
        from megacpt.arguments import RunOptions
        from megacpt.config import Config

        d = dict(self.config)
        return Config.from_dict(d), RunOptions(**d.get("run", {}))


def data_files(cfg: StudyConfig) -> dict:
    """{"tokenizer_model": path, "train": {lang: prefix}, "valid": {lang: prefix}}."""
    d = cfg.data
    langs = [cfg.source_lang, *cfg.target_langs]
    if "corpus_dir" not in d:
        files = {k: d[k] for k in ("tokenizer_model", "train", "valid")}
    else:
        root = os.path.join(cfg.out_dir, "data")
        files = {"tokenizer_model": os.path.join(root, "tokenizer.model"),
                 "train": {x: os.path.join(root, f"{x}_train_text_document") for x in langs},
                 "valid": {x: os.path.join(root, f"{x}_valid_text_document") for x in langs}}
    if cfg.valid_tokens is not None:  # the held-out sample the study evaluates on
        files["valid_source"] = dict(files["valid"])
        files["valid"] = {x: os.path.join(cfg.out_dir, "data", f"{x}_heldout_sample")
                          for x in langs}
    return files


def data_commands(cfg: StudyConfig) -> list[list[str]]:
    """[module, args...] of the tools that prepare the data (none for prepared data)."""
    d = cfg.data
    if "corpus_dir" not in d:
        return []
    files, langs = data_files(cfg), [cfg.source_lang, *cfg.target_langs]
    corpus = lambda x, s: os.path.join(d["corpus_dir"], f"{x}_{s}.jsonl.gz")  # noqa: E731
    cmds = [[TOKENIZER_TOOL, "--input", *[corpus(x, "train") for x in langs],
             "--vocab-size", str(d["vocab_size"]), "--character-coverage",
             str(d["character_coverage"]), "--model-prefix", files["tokenizer_model"][:-6]]]
    for x in langs:
        for s in ("train", "valid"):
            cmds.append([PREPROCESS_TOOL, "--input", corpus(x, s), "--tokenizer-model",
                         files["tokenizer_model"], "--output-prefix",
                         os.path.join(cfg.out_dir, "data", f"{x}_{s}"), "--append-eod"])
    return cmds


def vocab_size(cfg: StudyConfig) -> int:
    if "corpus_dir" in cfg.data:
        return int(cfg.data["vocab_size"])
    from megacpt.arguments import tokenizer_vocab_size

    return tokenizer_vocab_size(cfg.data["tokenizer_model"])


def global_batch(cfg: StudyConfig, size: str, num_parameters: int) -> int:
    """Sequences per step: global_batch_size, or batch_tokens' row for this size (rounded to
    whole micro-batches). The rows compare the paper's own parameter count for the paper's
    sizes (its 992M model is a "1B" one; ours counts the untied embeddings too), else ours."""
    if cfg.batch_tokens is None:
        return cfg.global_batch_size
    from megacpt import sizes

    paper = sizes.get_size(size).paper_params_m
    n = paper * 1e6 if paper else num_parameters
    tokens = next(t for top, t in cfg.batch_tokens if n <= top)
    seqs = max(1, round(tokens / cfg.seq_length))
    return -(-seqs // cfg.micro_batch_size) * cfg.micro_batch_size


def eval_iters(cfg: StudyConfig) -> int:
    if cfg.eval_iters is not None:
        return cfg.eval_iters
    return max(1, math.ceil(cfg.valid_tokens / (cfg.micro_batch_size * cfg.seq_length)))


class _Planner:
    def __init__(self, cfg: StudyConfig, vocab: int):
        from megacpt.config import ModelConfig

        self.cfg, self.vocab, self.files, self.runs = cfg, vocab, data_files(cfg), []
        self.models = {s: ModelConfig.from_size(s, vocab_size=vocab, seq_length=cfg.seq_length)
                       for s in cfg.sizes}

    def iters(self, size: str, budget: float) -> int:
        m = self.models[size]
        gbs = global_batch(self.cfg, size, m.num_parameters())
        return max(1, math.ceil(budget * m.num_parameters() / (gbs * self.cfg.seq_length)))

    def config(self, name, lang, size, blend, iters, optim, init_from=None, load=True,
               save_iters=(), evals_from=0):
        from megacpt.config import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                    TrainingConfig)

        cfg, files, src = self.cfg, self.files, self.cfg.source_lang
        m = self.models[size]
        ckpt = os.path.join(cfg.out_dir, "checkpoints", name)
        valid = {lang: files["valid"][lang]}
        if lang != src:
            valid[src] = files["valid"][src]
        span = iters - evals_from
        c = Config(
            model=m,
            data=DataConfig(data_path=list(blend), split="1,0,0", valid_data_path=valid,
                            tokenizer_model=files["tokenizer_model"], num_workers=0,
                            data_cache_path=os.path.join(cfg.out_dir, "data", "index-cache"),
                            target=lang),
            optim=optim,
            training=TrainingConfig(
                micro_batch_size=cfg.micro_batch_size,
                global_batch_size=global_batch(cfg, size, m.num_parameters()),
                train_iters=iters,
                seed=cfg.seed, bf16=cfg.bf16, device=cfg.device,
                eval_interval=max(1, -(-span // cfg.evals_per_run)), eval_iters=eval_iters(cfg)),
            checkpoint=CheckpointConfig(save=ckpt, load=ckpt if load else None,
                                        init_from=init_from, save_iters=sorted(save_iters)),
            logging=LoggingConfig(log_dir=os.path.join(cfg.out_dir, "runs", name),
                                  log_interval=max(1, span // 20),
                                  run_kind="cpt" if init_from else "scratch"))
        if cfg.extra_args:
            from megacpt.config import ConfigError
            from megacpt.flags import apply_flags

            try:
                c = apply_flags(c, cfg.extra_args, "extra_args")
            except ConfigError as e:
                raise StudyConfigError(f"{cfg.path}: field 'extra_args': {e}") from None
        return c

    def optim(self, warmup_iters=None, style="cosine", wsd_iters=None):
        from megacpt.config import OptimizerConfig

        cfg = self.cfg
        min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
        kw = dict(lr=float(cfg.lr), min_lr=float(min_lr), lr_decay_style=style)
        if warmup_iters is None:
            kw["lr_warmup_fraction"] = float(cfg.lr_warmup_fraction)
        elif warmup_iters == 0:
            kw["lr_warmup_fraction"] = 0.0
        else:
            kw.update(lr_warmup_fraction=None, lr_warmup_iters=int(warmup_iters))
        if style == "WSD":
            kw.update(lr_wsd_decay_iters=int(wsd_iters), lr_wsd_decay_style=cfg.wsd_decay_style)
        return OptimizerConfig(**kw)

    def add(self, name, lang, size, kind, replay, c, opts=None, **extra) -> "Run":
        from megacpt.arguments import RunOptions
        from megacpt.flags import config_to_argv

        opts = opts or RunOptions()
        run = Run(name, lang, size, kind, float(replay), c.model.num_parameters(),
                  c.training.train_iters, config_to_argv(c, opts), c.logging.log_dir,
                  c.checkpoint.save, c.checkpoint.init_from,
                  config={**c.to_dict(), "run": dataclasses.asdict(opts)}, **extra)
        self.runs.append(run)
        return run

    def target_runs(self, lang, size, strategy, kind, replay, blend, init_from, after):
        """The runs of one (language, size, strategy) under the study's design."""
        cfg, base = self.cfg, f"{lang}_{size}_{strategy}"
        budgets = cfg.all_budgets
        if cfg.design == "cosine":
            for b in budgets:
                name = base if len(budgets) == 1 else f"{base}_d{b:g}"
                c = self.config(name, lang, size, blend, self.iters(size, b), self.optim(),
                                init_from)
                self.add(name, lang, size, kind, replay, c, budget=b, after=after)
            return
        from megacpt.arguments import RunOptions

        ends = {b: self.iters(size, b) for b in budgets}
        decay = {b: max(1, round(cfg.cooldown_fraction * t)) for b, t in ends.items()}
        starts = {b: ends[b] - decay[b] for b in budgets}
        warmup = int(round(cfg.lr_warmup_fraction * ends[budgets[0]]))
        if min(starts.values()) <= warmup:
            raise StudyConfigError(
                f"{cfg.path}: field 'budgets': for {size}, the cooldown of budget "
                f"{budgets[0]:g} would start at step {starts[budgets[0]]}, not after the "
                f"{warmup} warm-up steps; raise the smallest budget or lower cooldown_fraction")
        stable = f"{base}_stable"
        c = self.config(stable, lang, size, blend, max(starts.values()),
                        self.optim(warmup, "constant"), init_from, save_iters=starts.values())
        self.add(stable, lang, size, kind, replay, c, role="stable", after=after)
        for b in budgets:
            name = f"{base}_d{b:g}"
            c = self.config(name, lang, size, blend, ends[b], self.optim(warmup, "WSD", decay[b]),
                            init_from, evals_from=starts[b])
            self.add(name, lang, size, kind, replay, c, RunOptions(
                override_opt_param_scheduler=True), role="branch", budget=b, branch_of=stable,
                branch_iter=starts[b], after=[stable])


def plan_runs(cfg: StudyConfig, vocab: int) -> list[Run]:
    """Every run of the study, sources first (CPT runs start from them)."""
    p = _Planner(cfg, vocab)
    src, files = cfg.source_lang, p.files
    sources = {}
    for size in cfg.sizes if "cpt" in cfg.kinds else []:  # sources only for CPT
        name = f"{src}_{size}_source"
        c = p.config(name, src, size, ["1.0", f"{src}={files['train'][src]}"],
                     p.iters(size, cfg.source_tokens_per_param), p.optim())
        sources[size] = p.add(name, src, size, "source", 0.0, c,
                              budget=float(cfg.source_tokens_per_param))
    for lang in cfg.target_langs:
        tgt = f"{lang}={files['train'][lang]}"
        for size in cfg.sizes:
            if "scratch" in cfg.kinds:
                p.target_runs(lang, size, "scratch", "scratch", 0.0, ["1.0", tgt], None, [])
            for r in cfg.replay_ratios if "cpt" in cfg.kinds else []:
                blend = ["1.0", tgt] if r == 0 else \
                    [f"{1 - r:g}", tgt, f"{r:g}", f"{src}={files['train'][src]}"]
                strategy = "cpt" if r == 0 else f"cpt_replay{r:g}"
                p.target_runs(lang, size, strategy, "cpt", r, blend,
                              sources[size].ckpt_dir, [sources[size].name])
    return p.runs


def run_finished(run: Run) -> bool:
    """The checkpoint tracker and the metrics (a validation row) both reach the last step."""
    from megacpt.checkpoint.format import CheckpointError, read_tracker
    from megacpt.training.metrics import read_metrics

    try:
        if read_tracker(run.ckpt_dir) != run.train_iters:
            return False
        rows = read_metrics(run.run_dir, "valid")
    except (OSError, ValueError, CheckpointError):
        return False
    return any(r.get("iteration") == run.train_iters and r.get("name") == run.lang
               for r in rows)


def check_plan(cfg: StudyConfig, runs: list[Run]) -> None:
    """Refuse to mix results of a changed config: compare with the saved plan.json."""
    path = os.path.join(cfg.out_dir, "plan.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = {r["name"]: r for r in json.load(f)["runs"]}
        for run in runs:
            prev = old.get(run.name)
            if prev and prev["argv"] != run.argv and os.path.exists(run.run_dir):
                raise StudyConfigError(
                    f"{cfg.path}: run {run.name} in {cfg.out_dir} was planned with other flags "
                    f"(differing words: {sorted(set(run.argv) ^ set(prev['argv']))[:8]}); use "
                    f"a new out_dir or delete {run.run_dir} and {run.ckpt_dir}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"config": cfg.path, "runs": [dataclasses.asdict(r) for r in runs]}, f,
                  indent=1)
    os.replace(path + ".tmp", path)


def load_plan(out_dir: str) -> list[Run]:
    """The runs of plan.json (written by `check_plan`)."""
    with open(os.path.join(out_dir, "plan.json"), encoding="utf-8") as f:
        return [Run(**r) for r in json.load(f)["runs"]]
