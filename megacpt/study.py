"""Scaling studies of cross-lingual CPT: plan, run (or print) and analyse a grid of runs.

`tools/run_study.py --config study.yaml` reads a YAML file, plans the runs

    for each size:     {source}_{size}_source              source-language model from scratch
    for each target language and size:
                       {lang}_{size}_scratch               target language from scratch
                       {lang}_{size}_cpt[_replay{r}]       CPT from the source model, with a
                                                           share r of source-language replay

each trained for `tokens_per_param` x N tokens (N: the model's parameters, as the trainer
counts them), and runs them one after another in this process (`launch: local`) or writes
them as shell commands for a cluster scheduler (`launch: print`). A run is finished when its
checkpoint tracker and its metrics both reach its last iteration; finished runs are skipped,
unfinished ones resume from their own checkpoint. Then `analyze` fits the laws with
`megacpt.scaling` (Chinchilla on scratch runs, the CPT law with the scratch fit as base on
each replay ratio's CPT runs, loss-compute frontiers, compute-optimal allocation, transfer
metrics at equal loss) and measures forgetting (source-language loss of CPT runs).

Config file (YAML; relative paths are relative to the config file's directory)::

    name: tiny-study                 # report title
    out_dir: ../runs/study_tiny      # everything is written here (--out overrides)
    launch: local                    # local | print
    launcher: python -m megacpt.train   # command prefix in print mode (e.g. torchrun ... -m
                                        # megacpt.train, or an srun/sbatch wrapper)
    source_lang: en
    target_langs: [zh]
    sizes: [tiny, debug-xs]          # names in megacpt.sizes (49M ... 5534M, debug sizes)
    kinds: [scratch, cpt]            # any of scratch, cpt
    replay_ratios: [0.0, 0.3]        # CPT runs: source-language share of the data, in [0, 1)
    tokens_per_param: 20
    seq_length: 2048
    micro_batch_size: 1
    global_batch_size: 1024
    lr: 2.0e-4                       # cosine, decayed to min_lr (default lr / 10)
    min_lr: null
    lr_warmup_fraction: 0.05
    evals_per_run: 10                # validations per run (the points of the fits)
    eval_iters: 10                   # validation micro-batches per language
    seed: 1234
    device: null                     # cuda | cpu | null (cuda when available)
    bf16: false
    threads: 0                       # local launch: torch CPU threads (0: torch's default)
    extra_args: []                   # appended to every training command
    data:                            # either a raw corpus to prepare ...
      corpus_dir: ../examples/data   #   {lang}_train.jsonl.gz and {lang}_valid.jsonl.gz
      vocab_size: 36152              #   bilingual (multilingual) SentencePiece BPE
      character_coverage: 0.9995
      # ... or prepared data (then corpus_dir is left out):
      # tokenizer_model: tok.model
      # train: {en: data/en_text_document, zh: ...}    indexed-dataset prefixes
      # valid: {en: data/en_valid_text_document, zh: ...}
    fit:
      min_tokens_fraction: 0.1       # drop a run's points before this share of its tokens
      bootstrap: 100                 # resamples for 95% intervals (0: none)
    downstream:                      # optional: score each run's final checkpoint
      tasks: {xcopa_zh: lm_eval:xcopa_zh, mine: tasks/mine.jsonl}  # files or lm-eval tasks
      demo_items: 64                 # + demo tasks per language from data.corpus_dir
      languages: [en, zh]            # default: source and targets

Outputs in `out_dir`: `data/` (tokenizer and binaries), `runs/NAME/` (metrics.jsonl, the
trainer's `--log-dir`), `checkpoints/NAME/`, `plan.json` (every run's argv); and, written by
tools/run_study.py, `commands.sh` (print mode), `fits/*.json`, `plots/*.png`, `results.json`
(`analyze`) and `report.md`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field

from megacpt import sizes

log = logging.getLogger("megacpt.study")

KINDS = ("scratch", "cpt")
LAUNCH = ("local", "print")
TOKENIZER_TOOL, PREPROCESS_TOOL = "megacpt.data.tokenizer_train", "megacpt.data.preprocess"


class StudyConfigError(ValueError):
    """The study config is wrong; the message names the file, the field and what to change."""


@dataclass
class StudyConfig:
    path: str
    out_dir: str
    sizes: list
    target_langs: list
    name: str = "study"
    launch: str = "local"
    launcher: str = "python -m megacpt.train"
    source_lang: str = "en"
    kinds: list = field(default_factory=lambda: list(KINDS))
    replay_ratios: list = field(default_factory=lambda: [0.0])
    tokens_per_param: float = 20.0
    seq_length: int = 2048
    micro_batch_size: int = 1
    global_batch_size: int = 1024
    lr: float = 2e-4
    min_lr: float | None = None
    lr_warmup_fraction: float = 0.05
    evals_per_run: int = 10
    eval_iters: int = 10
    seed: int = 1234
    device: str | None = None
    bf16: bool = False
    threads: int = 0
    extra_args: list = field(default_factory=list)
    data: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    downstream: dict = field(default_factory=dict)  # megacpt.evaluation.report


_TYPES = {"name": str, "out_dir": str, "launch": str, "launcher": str, "source_lang": str,
          "sizes": list, "target_langs": list, "kinds": list, "replay_ratios": list,
          "tokens_per_param": (int, float), "seq_length": int, "micro_batch_size": int,
          "global_batch_size": int, "lr": (int, float), "min_lr": (int, float, type(None)),
          "lr_warmup_fraction": (int, float), "evals_per_run": int, "eval_iters": int,
          "seed": int, "device": (str, type(None)), "bf16": bool, "threads": int,
          "extra_args": list, "data": dict, "fit": dict, "downstream": dict}
_DATA_KEYS = {"corpus_dir", "vocab_size", "character_coverage", "tokenizer_model", "train",
              "valid"}
_FIT_DEFAULTS = {"min_tokens_fraction": 0.1, "bootstrap": 100}


def load_config(path: str, out_dir: str | None = None, launch: str | None = None) -> StudyConfig:
    """Read and validate a study YAML file (see the module docstring)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise StudyConfigError(f"{path}: cannot read the study config ({e})") from None
    except yaml.YAMLError as e:
        raise StudyConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path}: expected a mapping of fields at the top level")

    def bad(key, msg):
        return StudyConfigError(f"{path}: field '{key}': {msg}")

    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise StudyConfigError(f"{path}: unknown fields {unknown}; known: {sorted(_TYPES)}")
    for key, value in raw.items():
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and key != "bf16"):
            raise bad(key, f"expected {_type_name(_TYPES[key])}, got {value!r}")
    if out_dir is not None:
        raw["out_dir"] = os.path.abspath(out_dir)
    if launch is not None:
        raw["launch"] = launch
    for key in ("out_dir", "sizes", "target_langs"):
        if key not in raw:
            raise bad(key, "required")
    base = os.path.dirname(os.path.abspath(path))
    raw["out_dir"] = os.path.join(base, raw["out_dir"])
    cfg = StudyConfig(path=os.path.abspath(path), **raw)
    _validate(cfg, bad)
    cfg.data = _data_section(cfg, base, bad)
    cfg.fit = {**_FIT_DEFAULTS, **cfg.fit}
    if set(cfg.fit) - set(_FIT_DEFAULTS):
        raise bad("fit", f"unknown keys {sorted(set(cfg.fit) - set(_FIT_DEFAULTS))}")
    if not 0 <= cfg.fit["min_tokens_fraction"] < 1 or cfg.fit["bootstrap"] < 0:
        raise bad("fit", "min_tokens_fraction must be in [0, 1) and bootstrap >= 0")
    from megacpt.evaluation.report import check_study_downstream
    cfg.downstream = check_study_downstream(cfg.downstream, base, bad)
    return cfg


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join({"NoneType": "null", "dict": "a mapping", "list": "a list"}.get(
        x.__name__, x.__name__) for x in ts)


def _validate(cfg: StudyConfig, bad) -> None:
    if cfg.launch not in LAUNCH:
        raise bad("launch", f"expected one of {LAUNCH}, got {cfg.launch!r}")
    unknown = [s for s in cfg.sizes if s not in sizes.SIZES]
    if not cfg.sizes or unknown:
        raise bad("sizes", f"unknown sizes {unknown} (registered: {', '.join(sizes.SIZES)})"
                  if unknown else "expected a non-empty list of registered sizes")
    if len(set(cfg.sizes)) != len(cfg.sizes):
        raise bad("sizes", f"sizes repeat: {cfg.sizes}")
    if not cfg.kinds or set(cfg.kinds) - set(KINDS):
        raise bad("kinds", f"expected a non-empty subset of {list(KINDS)}, got {cfg.kinds}")
    if not cfg.target_langs or cfg.source_lang in cfg.target_langs or \
            not all(isinstance(x, str) and x for x in cfg.target_langs):
        raise bad("target_langs", f"expected language names other than source_lang "
                                  f"{cfg.source_lang!r}, got {cfg.target_langs}")
    if not cfg.replay_ratios or not all(isinstance(r, (int, float)) and 0 <= r < 1
                                        for r in cfg.replay_ratios):
        raise bad("replay_ratios", f"expected numbers in [0, 1), got {cfg.replay_ratios}")
    if len(set(cfg.replay_ratios)) != len(cfg.replay_ratios):
        raise bad("replay_ratios", f"ratios repeat: {cfg.replay_ratios}")
    for key in ("tokens_per_param", "seq_length", "micro_batch_size", "global_batch_size",
                "lr", "evals_per_run", "eval_iters"):
        if not getattr(cfg, key) > 0:
            raise bad(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise bad("global_batch_size", f"{cfg.global_batch_size} is not a multiple of "
                                       f"micro_batch_size {cfg.micro_batch_size}")
    if cfg.device not in (None, "cpu", "cuda"):
        raise bad("device", f"expected cpu, cuda or null, got {cfg.device!r}")
    if not all(isinstance(a, str) for a in cfg.extra_args):
        raise bad("extra_args", "expected a list of strings (flags and their values)")


def _data_section(cfg: StudyConfig, base: str, bad) -> dict:
    d = dict(cfg.data)
    if set(d) - _DATA_KEYS:
        raise bad("data", f"unknown keys {sorted(set(d) - _DATA_KEYS)}; known: "
                          f"{sorted(_DATA_KEYS)}")
    langs = [cfg.source_lang, *cfg.target_langs]
    if "corpus_dir" in d:
        d["corpus_dir"] = os.path.join(base, d["corpus_dir"])
        d.setdefault("vocab_size", sizes.PAPER_VOCAB_SIZE)
        d.setdefault("character_coverage", 0.9995)
        for lang in langs:
            for split in ("train", "valid"):
                p = os.path.join(d["corpus_dir"], f"{lang}_{split}.jsonl.gz")
                if not os.path.isfile(p):
                    raise bad("data.corpus_dir", f"{p} not found (expected "
                                                 f"{{lang}}_{{train,valid}}.jsonl.gz for {langs})")
        return d
    if "tokenizer_model" not in d:
        raise bad("data", "give corpus_dir (raw JSON lines to prepare) or tokenizer_model with "
                          "train and valid prefixes per language")
    d["tokenizer_model"] = os.path.join(base, d["tokenizer_model"])
    for split in ("train", "valid"):
        prefixes = d.get(split)
        if not isinstance(prefixes, dict) or set(langs) - set(prefixes):
            raise bad(f"data.{split}", f"expected a prefix for each of {langs}, got {prefixes}")
        d[split] = {k: os.path.join(base, v) for k, v in prefixes.items()}
    return d


# ----- planning -----

@dataclass
class Run:
    name: str
    lang: str
    size: str
    kind: str  # source | scratch | cpt
    replay: float
    num_parameters: int
    train_iters: int
    argv: list
    run_dir: str
    ckpt_dir: str
    init_from: str | None = None

    @property
    def strategy(self) -> str:
        """Group label of the analysis: scratch, cpt, cpt_replay0.3 (source for the source)."""
        if self.kind != "cpt":
            return self.kind
        return "cpt" if self.replay == 0 else f"cpt_replay{self.replay:g}"


def data_files(cfg: StudyConfig) -> dict:
    """{"tokenizer_model": path, "train": {lang: prefix}, "valid": {lang: prefix}}."""
    d = cfg.data
    if "corpus_dir" not in d:
        return {k: d[k] for k in ("tokenizer_model", "train", "valid")}
    root = os.path.join(cfg.out_dir, "data")
    langs = [cfg.source_lang, *cfg.target_langs]
    return {"tokenizer_model": os.path.join(root, "tokenizer.model"),
            "train": {x: os.path.join(root, f"{x}_train_text_document") for x in langs},
            "valid": {x: os.path.join(root, f"{x}_valid_text_document") for x in langs}}


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


def plan_runs(cfg: StudyConfig, vocab: int) -> list[Run]:
    """Every run of the study, sources first (CPT runs start from them)."""
    from megacpt.arguments import resolve_train_iters
    from megacpt.config import Config, ModelConfig, TrainingConfig

    files, runs = data_files(cfg), []
    src = cfg.source_lang

    def make(name, lang, size, kind, replay, blend, init_from=None):
        model = ModelConfig.from_size(size, vocab_size=vocab, seq_length=cfg.seq_length)
        train = TrainingConfig(micro_batch_size=cfg.micro_batch_size,
                               global_batch_size=cfg.global_batch_size,
                               tokens_per_param=float(cfg.tokens_per_param))
        iters = resolve_train_iters(Config(model=model, training=train))
        run_dir = os.path.join(cfg.out_dir, "runs", name)
        ckpt = os.path.join(cfg.out_dir, "checkpoints", name)
        valid = [f"{lang}={files['valid'][lang]}"] + \
            ([f"{src}={files['valid'][src]}"] if lang != src else [])
        argv = ["--model-size", size, "--tokenizer-model", files["tokenizer_model"],
                "--seq-length", str(cfg.seq_length),
                "--micro-batch-size", str(cfg.micro_batch_size),
                "--global-batch-size", str(cfg.global_batch_size),
                "--tokens-per-param", f"{cfg.tokens_per_param:g}", "--lr", f"{cfg.lr:g}",
                "--lr-warmup-fraction", f"{cfg.lr_warmup_fraction:g}",
                "--data-path", *blend, "--split", "1,0,0", "--valid-data-path", *valid,
                "--target", lang, "--eval-interval", str(-(-iters // cfg.evals_per_run)),
                "--eval-iters", str(cfg.eval_iters), "--log-interval",
                str(max(1, iters // 20)), "--seed", str(cfg.seed), "--num-workers", "0",
                "--data-cache-path", os.path.join(cfg.out_dir, "data", "index-cache"),
                "--log-dir", run_dir, "--save", ckpt, "--load", ckpt,
                "--run-kind", "cpt" if init_from else "scratch"]
        if cfg.min_lr is not None:
            argv += ["--min-lr", f"{cfg.min_lr:g}"]
        if init_from:
            argv += ["--init-from", init_from]
        if cfg.device:
            argv += ["--device", cfg.device]
        if cfg.bf16:
            argv.append("--bf16")
        runs.append(Run(name, lang, size, kind, replay, model.num_parameters(), iters,
                        argv + list(cfg.extra_args), run_dir, ckpt, init_from))

    for size in cfg.sizes if "cpt" in cfg.kinds else []:  # sources only for CPT
        make(f"{src}_{size}_source", src, size, "source", 0.0,
             ["1.0", f"{src}={files['train'][src]}"])
    for lang in cfg.target_langs:
        tgt = f"{lang}={files['train'][lang]}"
        for size in cfg.sizes:
            if "scratch" in cfg.kinds:
                make(f"{lang}_{size}_scratch", lang, size, "scratch", 0.0, ["1.0", tgt])
            for r in cfg.replay_ratios if "cpt" in cfg.kinds else []:
                blend = ["1.0", tgt] if r == 0 else \
                    [f"{1 - r:g}", tgt, f"{r:g}", f"{src}={files['train'][src]}"]
                make(f"{lang}_{size}_cpt" + (f"_replay{r:g}" if r else ""), lang, size, "cpt",
                     float(r), blend, init_from=os.path.join(cfg.out_dir, "checkpoints",
                                                             f"{src}_{size}_source"))
    return runs


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


# ----- running -----

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
    """Tokenizer and binaries in out_dir/data (what already exists is kept)."""
    from megacpt.data import preprocess, tokenizer_train

    for argv in pending_data_commands(cfg):
        log.info("data: python -m %s", " ".join(shlex.quote(a) for a in argv))
        main = tokenizer_train.main if argv[0] == TOKENIZER_TOOL else preprocess.main
        main(argv[1:])


def run_local(cfg: StudyConfig, runs: list[Run]) -> None:
    """Train every unfinished run in this process, one after another (FLOP-weighted ETA)."""
    import torch

    from megacpt import train

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _train_all(cfg, runs, train)
    finally:
        torch.set_num_threads(threads)


def _train_all(cfg: StudyConfig, runs: list[Run], train) -> None:
    cost = {r.name: r.train_iters * r.num_parameters for r in runs}
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
        log.info("python -m megacpt.train %s", " ".join(shlex.quote(a) for a in run.argv))
        code = train.main(run.argv)
        if code != 0 or not run_finished(run):
            raise RuntimeError(f"run {run.name} failed (exit code {code}); its command is in "
                               f"{os.path.join(cfg.out_dir, 'plan.json')}; fix the cause and "
                               f"run the study again (finished runs are skipped)")
        done += cost[run.name]


# ----- analysis -----

def _points(runs: list[Run], valid_name: str, min_fraction: float):
    """Scaling points of the runs on validation set `valid_name`, early points dropped."""
    import numpy as np

    from megacpt.scaling import load_runs, points_from_runs

    loaded = load_runs([r.run_dir for r in runs], valid_name)
    for r in loaded:
        keep = r["D"] >= min_fraction * r["D"].max() if len(r["D"]) else []
        for k in ("iteration", "loss", "D", "tokens", "flops", "C"):
            r[k] = np.asarray(r[k])[keep]
    loaded = [r for r in loaded if len(r["loss"])]
    return points_from_runs(loaded) if loaded else None


def fit_quality(fit: dict, points, n_params: int) -> list[str]:
    """Plain-language reasons a fit is poorly determined (empty when none is found)."""
    import numpy as np

    notes = []
    n_sizes = np.unique(points.N).size
    if fit["law"] == "chinchilla" and n_sizes < 3:
        notes.append(f"only {n_sizes} model sizes: E, A and alpha are not separately "
                     f"identifiable (use at least 3, better 5+)")
    if len(points) < 3 * n_params:
        notes.append(f"{len(points)} points for {n_params} free parameters")
    ci = (fit.get("bootstrap") or {}).get("ci95", {})
    for k in ("alpha", "beta", "gamma"):
        if k in ci and k not in fit.get("inherited", []):
            lo, hi = ci[k]
            if not (math.isfinite(lo) and math.isfinite(hi)) or \
                    hi - lo > max(0.5 * abs(fit[k]), 0.05):
                notes.append(f"{k} = {fit[k]:.3g} has a wide 95% interval [{lo:.3g}, {hi:.3g}]")
    if fit.get("allocation") is None:
        gamma = fit.get("gamma", 0.0)
        notes.append(f"no finite compute-optimal allocation (needs alpha > 0 and beta - gamma "
                     f"> 0; alpha = {fit['alpha']:.3g}, beta - gamma = "
                     f"{fit['beta'] - gamma:.3g})")
    return notes


def _fit(law, points, cfg: StudyConfig, label: str) -> dict:
    from megacpt.scaling import bootstrap, fit_law

    try:
        fit = fit_law(law, points.loss, N=points.N, D=points.D, source=label)
        if cfg.fit["bootstrap"] >= 2:
            with warnings.catch_warnings():  # resamples of degenerate data give NaN columns
                warnings.simplefilter("ignore", RuntimeWarning)
                fit["bootstrap"] = bootstrap(law, fit, points.loss, N=points.N, D=points.D,
                                             K=int(cfg.fit["bootstrap"]), seed=cfg.seed)
    except (ValueError, RuntimeError) as e:
        return {"law": law.name, "error": str(e)}
    fit["quality_notes"] = fit_quality(fit, points, law.n_params)
    return fit


def analyze_language(cfg: StudyConfig, runs: list[Run], lang: str) -> dict:
    """Fits, frontiers, transfer and forgetting for one target language."""
    from megacpt.scaling import chinchilla, cpt, fit_frontier, transfer_metrics

    mine = [r for r in runs if r.lang == lang and r.kind != "source"]
    groups = {s: [r for r in mine if r.strategy == s] for s in dict.fromkeys(
        r.strategy for r in mine)}
    frac = cfg.fit["min_tokens_fraction"]
    points = {s: _points(rs, lang, frac) for s, rs in groups.items()}
    out = {"fits": {s: {"law": "chinchilla" if s == "scratch" else "cpt",
                        "error": f"no {lang} validation points past {frac:g} of the tokens"}
                    for s, p in points.items() if p is None},
           "frontiers": {}, "transfer": {}, "forgetting": []}
    points = {s: p for s, p in points.items() if p is not None}
    if "scratch" in points:
        out["fits"]["scratch"] = _fit(chinchilla(), points["scratch"], cfg, f"{lang} scratch")
    base = out["fits"].get("scratch", {})
    for s in (s for s in groups if s != "scratch" and s in points):
        if "error" in base or not base:
            why = base.get("error", "no scratch runs (kinds lacks scratch)")
            out["fits"][s] = {"law": "cpt", "error": f"needs the from-scratch fit as base: {why}"}
        else:
            out["fits"][s] = _fit(cpt(base), points[s], cfg, f"{lang} {s}")
    for s, p in points.items():
        try:
            out["frontiers"][s] = fit_frontier(p, n_levels=min(30, max(4, len(p))))
        except (ValueError, RuntimeError) as e:
            out["frontiers"][s] = {"law": "frontier", "error": str(e)}
        if s != "scratch" and "scratch" in points:
            try:
                out["transfer"][s] = transfer_metrics(points["scratch"], p)
            except ValueError as e:
                out["transfer"][s] = {"error": str(e)}
    out["forgetting"] = forgetting(cfg, runs, lang)
    out["points"] = {s: {"N": p.N.tolist(), "D": p.D.tolist(), "loss": p.loss.tolist(),
                         "C": p.C.tolist(), "run": p.group.tolist()} for s, p in points.items()}
    return out


def forgetting(cfg: StudyConfig, runs: list[Run], lang: str) -> list[dict]:
    """Final source-language loss of each CPT run next to its source model's."""
    from megacpt.scaling import load_runs

    src = cfg.source_lang
    sources = {r.size: r for r in runs if r.kind == "source"}
    rows = []
    for r in (r for r in runs if r.lang == lang and r.kind == "cpt"):
        mine = load_runs(r.run_dir, src)[0]
        before = load_runs(sources[r.size].run_dir, src)[0]
        rows.append({"run": r.name, "size": r.size, "replay": r.replay,
                     "source_model_loss": float(before["loss"][-1]),
                     "final_source_loss": float(mine["loss"][-1]),
                     "curve": {"D": mine["D"].tolist(), "loss": mine["loss"].tolist()}})
    return rows


def run_summary(runs: list[Run], cfg: StudyConfig) -> list[dict]:
    """One row per run: its final validation losses (None while unfinished)."""
    from megacpt.training.metrics import read_metrics

    rows = []
    for r in runs:
        final = {}
        if run_finished(r):
            for row in read_metrics(r.run_dir, "valid"):
                if row["iteration"] == r.train_iters:
                    final[row["name"]] = row["loss"]
        rows.append({"name": r.name, "lang": r.lang, "size": r.size, "kind": r.kind,
                     "replay": r.replay, "num_parameters": r.num_parameters,
                     "train_iters": r.train_iters,
                     "train_tokens": r.train_iters * cfg.global_batch_size * cfg.seq_length,
                     "finished": bool(final), "final_valid_loss": final})
    return rows


def analyze(cfg: StudyConfig, runs: list[Run]) -> dict:
    """The results of the study (results.json); every run must be finished."""
    unfinished = [r.name for r in runs if not run_finished(r)]
    if unfinished:
        raise RuntimeError(f"cannot analyse: runs not finished: {unfinished}")
    return {"name": cfg.name, "config": cfg.path, "source_lang": cfg.source_lang,
            "runs": run_summary(runs, cfg),
            "languages": {lang: analyze_language(cfg, runs, lang) for lang in cfg.target_langs},
            "downstream": _downstream(cfg, runs)}


def _downstream(cfg: StudyConfig, runs: list[Run]):
    from megacpt.evaluation.report import study_downstream  # downstream.json + bar plot
    return study_downstream(cfg, runs)
