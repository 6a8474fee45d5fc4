"""The study config: a YAML file read into a validated `StudyConfig` (schema in `megacpt.study`).

Every error names the file, the field and what was expected (`StudyConfigError`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from megacpt import sizes

KINDS = ("scratch", "cpt")
LAUNCH = ("local", "print", "slurm")
DESIGNS = ("cosine", "wsd")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
CHECKPOINTS = ("final", "all")
PAPER_BATCH_TOKENS = [[1.0e9, 1 << 20], [2.5e9, 2 << 20], [math.inf, 4 << 20]]
"""The paper's batch sizes in tokens: 1M up to 1B parameters, 2M up to 2.5B, 4M above."""


class StudyConfigError(ValueError):
    """The study config is wrong; the message names the file, the field and what to change."""


@dataclass
class StudyConfig:
    """A scaling study (see the package docstring for the YAML form of every field)."""

    path: str
    """The YAML file (absolute)."""
    out_dir: str
    """Everything is written here."""
    sizes: list
    """Registered size names (megacpt.sizes)."""
    target_langs: list
    """Target languages (one analysis each; several give a cross-language summary)."""
    name: str = "study"
    """Report title."""
    launch: str = "local"
    """local (train here), print (write commands.sh) or slurm (sbatch arrays)."""
    launcher: str = "python -m megacpt.train"
    """Command prefix of a training run in print and slurm mode (e.g. torchrun ... -m ...)."""
    source_lang: str = "en"
    """The source language (CPT starts from its models)."""
    kinds: list = field(default_factory=lambda: list(KINDS))
    """Any of scratch, cpt."""
    replay_ratios: list = field(default_factory=lambda: [0.0])
    """CPT runs: source-language share of the data, each in [0, 1)."""
    design: str = "cosine"
    """cosine: a full cosine run per size and budget; wsd: one stable-LR run per size with
    cooldown branches at each budget (warmup-stable-decay, Hagele et al. 2024)."""
    tokens_per_param: float | None = None
    """One training budget (tokens per parameter); shorthand for budgets: [x]."""
    budgets: list = field(default_factory=list)
    """Training budgets in tokens per parameter (end-of-schedule points at each)."""
    source_tokens_per_param: float | None = None
    """Budget of the source models (cosine); default: the largest budget."""
    cooldown_fraction: float = 0.2
    """wsd: share of each budget's steps spent in the decay (the branch)."""
    wsd_decay_style: str = "linear"
    """wsd: shape of the decay (Megatron's --lr-wsd-decay-style)."""
    seq_length: int = 2048
    """Sequence length."""
    micro_batch_size: int = 1
    """Sequences per forward pass."""
    global_batch_size: int = 1024
    """Sequences per step (unless batch_tokens gives it per size)."""
    batch_tokens: list | str | None = None
    """Per-size batch: [[max_params, tokens], ...] (first row with N <= max_params), or
    `paper` (1M tokens up to 1B parameters, 2M up to 2.5B, 4M above)."""
    lr: float = 2e-4
    """Peak learning rate."""
    min_lr: float | None = None
    """Floor of the decay (default lr / 10)."""
    lr_warmup_fraction: float = 0.05
    """Warm-up as a share of a run's steps (wsd: of the smallest budget's steps per size)."""
    evals_per_run: int = 10
    """Validations per run."""
    eval_iters: int | None = 10
    """Validation micro-batches per language (or give valid_tokens)."""
    valid_tokens: int | None = None
    """Held-out tokens per language (the paper: 10^6), sampled across the held-out set."""
    seed: int = 1234
    """Seed of every run."""
    device: str | None = None
    """cuda, cpu or null (cuda when available)."""
    bf16: bool = False
    """bf16 training."""
    threads: int = 0
    """local launch: torch CPU threads (0: torch's default)."""
    extra_args: list = field(default_factory=list)
    """Trainer flags applied to every run (plain fields only, e.g. --save-interval 500)."""
    data: dict = field(default_factory=dict)
    """corpus_dir (+ vocab_size, character_coverage) or tokenizer_model + train/valid prefixes."""
    fit: dict = field(default_factory=dict)
    """min_tokens_fraction, bootstrap, checkpoints (final | all), holdout_largest."""
    slurm: dict = field(default_factory=dict)
    """sbatch settings: partition, time, cpus_per_task, gpus_per_node, mem, max_parallel,
    sbatch_args (list), setup (shell lines run first), python (interpreter)."""
    downstream: dict = field(default_factory=dict)
    """Downstream evaluation of every end-of-schedule checkpoint (`megacpt.study.downstream`):
    tasks {name: FILE.jsonl} (or [NAME=FILE.jsonl, ...]), lm_eval_tasks [names], demo_items (per language, from the
    corpus' held-out text), languages, batch_size; empty: none."""

    @property
    def all_budgets(self) -> list[float]:
        return sorted(float(b) for b in self.budgets)


_TYPES = {"name": str, "out_dir": str, "launch": str, "launcher": str, "source_lang": str,
          "sizes": list, "target_langs": list, "kinds": list, "replay_ratios": list,
          "design": str, "tokens_per_param": (int, float), "budgets": list,
          "source_tokens_per_param": (int, float, type(None)), "cooldown_fraction": (int, float),
          "wsd_decay_style": str, "seq_length": int, "micro_batch_size": int,
          "global_batch_size": int, "batch_tokens": (list, str, type(None)), "lr": (int, float),
          "min_lr": (int, float, type(None)), "lr_warmup_fraction": (int, float),
          "evals_per_run": int, "eval_iters": (int, type(None)),
          "valid_tokens": (int, float, type(None)), "seed": int, "device": (str, type(None)),
          "bf16": bool, "threads": int, "extra_args": list, "data": dict, "fit": dict,
          "slurm": dict, "downstream": dict}
_DATA_KEYS = {"corpus_dir", "vocab_size", "character_coverage", "tokenizer_model", "train",
              "valid"}
FIT_DEFAULTS = {"min_tokens_fraction": 0.1, "bootstrap": 100, "checkpoints": "final",
                "holdout_largest": 0}
SLURM_DEFAULTS = {"partition": None, "time": "1-00:00:00", "cpus_per_task": 1,
                  "gpus_per_node": 0, "mem": None, "max_parallel": 0, "sbatch_args": [],
                  "setup": [], "python": "python"}


def load_config(path: str, out_dir: str | None = None, launch: str | None = None) -> StudyConfig:
    """Read and validate a study YAML file."""
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
    _budgets(cfg, bad)
    cfg.batch_tokens = _batch_tokens(cfg, bad)
    cfg.data = _data_section(cfg, base, bad)
    cfg.fit = _section(cfg.fit, FIT_DEFAULTS, "fit", bad)
    f = cfg.fit
    if not 0 <= f["min_tokens_fraction"] < 1 or f["bootstrap"] < 0 or \
            f["checkpoints"] not in CHECKPOINTS or f["holdout_largest"] < 0:
        raise bad("fit", f"min_tokens_fraction must be in [0, 1), bootstrap >= 0, checkpoints "
                         f"one of {CHECKPOINTS}, holdout_largest >= 0; got {f}")
    cfg.slurm = _section(cfg.slurm, SLURM_DEFAULTS, "slurm", bad)
    cfg.downstream = _downstream_section(cfg, base, bad)
    return cfg


def _section(given: dict, defaults: dict, key: str, bad) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise bad(key, f"unknown keys {unknown}; known: {sorted(defaults)}")
    for k, v in given.items():
        d = defaults[k]
        ok = isinstance(v, type(d)) if d is not None else isinstance(v, (str, int))
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise bad(f"{key}.{k}", f"expected {type(d).__name__ if d is not None else 'a value'}"
                                    f", got {v!r}")
    return {**defaults, **given}


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join({"NoneType": "null", "dict": "a mapping", "list": "a list"}.get(
        x.__name__, x.__name__) for x in ts)


def _validate(cfg: StudyConfig, bad) -> None:
    for key, allowed in (("launch", LAUNCH), ("design", DESIGNS),
                         ("wsd_decay_style", WSD_DECAY_STYLES)):
        if getattr(cfg, key) not in allowed:
            raise bad(key, f"expected one of {allowed}, got {getattr(cfg, key)!r}")
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
    for key in ("seq_length", "micro_batch_size", "global_batch_size", "lr", "evals_per_run"):
        if not getattr(cfg, key) > 0:
            raise bad(key, f"must be > 0, got {getattr(cfg, key)}")
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise bad("global_batch_size", f"{cfg.global_batch_size} is not a multiple of "
                                       f"micro_batch_size {cfg.micro_batch_size}")
    if not 0 < cfg.cooldown_fraction < 1:
        raise bad("cooldown_fraction", f"expected a share in (0, 1), got {cfg.cooldown_fraction}")
    if (cfg.eval_iters is None) == (cfg.valid_tokens is None):
        raise bad("valid_tokens", "give exactly one of eval_iters and valid_tokens (set the "
                                  "other to null)")
    if (cfg.eval_iters or 1) < 1 or (cfg.valid_tokens or 1) < 1:
        raise bad("eval_iters" if cfg.eval_iters is not None else "valid_tokens", "must be >= 1")
    if cfg.device not in (None, "cpu", "cuda"):
        raise bad("device", f"expected cpu, cuda or null, got {cfg.device!r}")
    if not all(isinstance(a, str) for a in cfg.extra_args):
        raise bad("extra_args", "expected a list of strings (flags and their values)")


def _budgets(cfg: StudyConfig, bad) -> None:
    if cfg.tokens_per_param is not None and cfg.budgets:
        raise bad("budgets", "give budgets or tokens_per_param, not both")
    if cfg.tokens_per_param is not None:
        cfg.budgets = [float(cfg.tokens_per_param)]
    if not cfg.budgets:
        cfg.budgets = [20.0]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0
               for b in cfg.budgets) or len(set(cfg.budgets)) != len(cfg.budgets):
        raise bad("budgets", f"expected distinct tokens-per-parameter numbers > 0, got "
                             f"{cfg.budgets}")
    cfg.budgets = sorted(float(b) for b in cfg.budgets)
    if cfg.design == "wsd" and len(cfg.budgets) < 2:
        raise bad("budgets", "the wsd design branches cooldowns at several budgets: give at "
                             "least 2 (e.g. [5, 10, 20, 40])")
    if cfg.source_tokens_per_param is None:
        cfg.source_tokens_per_param = cfg.budgets[-1]
    if not cfg.source_tokens_per_param > 0:
        raise bad("source_tokens_per_param", f"must be > 0, got {cfg.source_tokens_per_param}")


def _batch_tokens(cfg: StudyConfig, bad):
    bt = cfg.batch_tokens
    if bt is None:
        return None
    if bt == "paper":
        return [list(r) for r in PAPER_BATCH_TOKENS]
    if isinstance(bt, str) or not bt or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, (int, float)) for x in r)
            and r[1] > 0 for r in bt):
        raise bad("batch_tokens", f"expected 'paper' or rows [max_params, tokens] (the last "
                                  f"max_params .inf), got {bt!r}")
    if [r[0] for r in bt] != sorted(r[0] for r in bt) or bt[-1][0] != math.inf:
        raise bad("batch_tokens", "rows must be in increasing max_params, the last one .inf")
    return [[float(a), int(b)] for a, b in bt]


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


DOWNSTREAM_DEFAULTS = {"tasks": {}, "lm_eval_tasks": [], "demo_items": 0, "languages": None,
                       "batch_size": 16}


def _downstream_section(cfg: StudyConfig, base: str, bad) -> dict:
    """The `downstream` mapping checked, task files resolved against `base`; {} when absent."""
    if not cfg.downstream:
        return {}
    langs = [cfg.source_lang, *cfg.target_langs]
    given = dict(cfg.downstream)
    if isinstance(given.get("tasks"), list):  # the CLI's form: [NAME=FILE.jsonl, ...]
        pairs = [t.split("=", 1) if isinstance(t, str) else [] for t in given["tasks"]]
        if not all(len(p) == 2 and p[0] for p in pairs):
            raise bad("downstream.tasks", f"expected {{name: FILE.jsonl}} or a list of "
                                          f"NAME=FILE.jsonl, got {given['tasks']}")
        given["tasks"] = dict(pairs)
    d = _section(given, {**DOWNSTREAM_DEFAULTS, "languages": []}, "downstream", bad)
    tasks = {}
    for name, path in d["tasks"].items():
        if not isinstance(path, str) or not path.endswith(".jsonl"):
            raise bad(f"downstream.tasks.{name}", f"expected a task file NAME.jsonl, got {path!r}")
        tasks[name] = os.path.join(base, path)
        if not os.path.isfile(tasks[name]):
            raise bad(f"downstream.tasks.{name}", f"{tasks[name]} not found")
    d["tasks"] = tasks
    if not all(isinstance(t, str) and t for t in d["lm_eval_tasks"]):
        raise bad("downstream.lm_eval_tasks", f"expected lm-eval task names (e.g. xnli_zh), "
                                              f"got {d['lm_eval_tasks']}")
    if d["lm_eval_tasks"]:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise bad("downstream.lm_eval_tasks", "needs lm-evaluation-harness: pip install "
                                                  "'megacpt[eval]'")
    if isinstance(d["demo_items"], float) or d["demo_items"] < 0 or d["batch_size"] < 1 or \
            isinstance(d["batch_size"], float):
        raise bad("downstream", f"demo_items must be an integer >= 0 and batch_size >= 1, got "
                                f"{d['demo_items']} and {d['batch_size']}")
    d["languages"] = d["languages"] or langs
    if set(d["languages"]) - set(langs):
        raise bad("downstream.languages", f"expected a subset of {langs}, got {d['languages']}")
    if d["demo_items"] and "corpus_dir" not in cfg.data:
        raise bad("downstream.demo_items", "demo tasks are built from data.corpus_dir's held-out "
                                           "text ({lang}_valid.jsonl.gz); give corpus_dir or "
                                           "set demo_items: 0")
    if not (tasks or d["lm_eval_tasks"] or d["demo_items"]):
        raise bad("downstream", "no tasks: give tasks {name: FILE.jsonl}, lm_eval_tasks or "
                                "demo_items > 0")
    return d
