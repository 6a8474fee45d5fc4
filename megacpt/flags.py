"""The one mapping between `Config` and the flags of `python -m megacpt.train`, and the help
text derived from it.

Every flag of `megacpt.arguments.build_parser()` is a field of `Config` or `RunOptions`: by
default the field of the same name in the one section that has it; `_FLAG_FIELDS` names the
exceptions ("!" = the flag is the field's negation). `config_to_argv` writes the flags that
give back exactly a config (parse_args(config_to_argv(cfg, opts)) == (cfg, opts)), so programs
(studies, the quickstart) build typed configs and print or submit the command only when a
person or a scheduler needs it; `apply_flags` applies plain flags to a config.

Help text: a flag that sets a field is documented by that field's docstring (one source per
fact; `document` fills it in), followed by what only the command line adds (the `help=` given
in `build_parser`), the default, and how it relates to Megatron-LM's flag of the same name.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap

from megacpt.arguments import _SHAPE_FLAGS, RunOptions, build_parser
from megacpt.config import (CheckpointConfig, Config, ConfigError, DataConfig, LoggingConfig,
                            ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig)

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
            "optim": OptimizerConfig, "training": TrainingConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "run": RunOptions}
"""Config section name -> its dataclass ("run": the invocation's `RunOptions`)."""

_FLAG_FIELDS = {"norm_epsilon": "model.norm_eps", "model_size": "model.name",
                "no_tensorboard": "!logging.tensorboard",
                "no_gradient_accumulation_fusion": "!parallel.gradient_accumulation_fusion",
                "no_verify_checksums": "!checkpoint.verify_checksums"}
_NOT_FIELDS = {"help", "group_query_attention", "fp16", "lr_wsd_decay_samples",
               "use_rope_scaling", "rope_scaling_factor"}
"""Flags that are no field: help, accepted-for-compatibility, refused with a message, or
another unit of a field (samples -> lr_wsd_decay_iters)."""
_SPECIAL = {"train_iters", "train_tokens", "tokens_per_param", "lr_warmup_fraction",
            "lr_warmup_iters", "valid_data_path", "max_position_embeddings", "model_size",
            *_SHAPE_FLAGS}
"""Flags `config_to_argv` writes by rule (the length of training, the warm-up, the shape)."""


@functools.lru_cache(maxsize=None)
def _parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser, built once for the mapping (suppress: given flags only)."""
    p = build_parser()
    if suppress:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


@functools.lru_cache(maxsize=None)
def _flag_fields() -> dict[str, tuple[str, str, bool]]:
    return flag_fields(build_parser())


def flag_fields(parser: argparse.ArgumentParser | None = None,
                strict: bool = True) -> dict[str, tuple[str, str, bool]]:
    """{argparse dest: (section, field, negated)} of every flag (section "run": RunOptions).
    A flag that maps to no single field is an error (`strict`) or left out."""
    sections = {f.name for f in dataclasses.fields(Config)}
    assert set(SECTIONS) - {"run"} == sections, "a Config section is missing in SECTIONS"
    owners: dict[str, list[str]] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(sec)
    out = {}
    for action in (parser or build_parser())._actions:
        dest = action.dest
        if dest in _NOT_FIELDS:
            continue
        if dest in _FLAG_FIELDS:
            path = _FLAG_FIELDS[dest]
            neg = path.startswith("!")
            sec, _, name = path.lstrip("!").partition(".")
            out[dest] = (sec, name, neg)
        elif len(owners.get(dest, [])) == 1:
            out[dest] = (owners[dest][0], dest, False)
        elif strict:
            raise ConfigError(f"flag --{dest.replace('_', '-')} maps to no single config field "
                              f"(sections {owners.get(dest, [])}); add it to _FLAG_FIELDS")
    return out


def _word(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def config_to_argv(cfg: Config, opts: RunOptions | None = None) -> list[str]:
    """Megatron flags that `parse_args` turns back into exactly (cfg, opts).

    Writes the model shape (`--model-size NAME` when the shape is a registered one), the
    length of training as it was given (tokens per parameter, tokens or iterations), the
    vocabulary size, `--min-lr`, and every other field that differs from the flag's default.
    """
    opts = opts or RunOptions()
    parser, fields = _parser(), _flag_fields()
    m, t, o = cfg.model, cfg.training, cfg.optim
    if m.name:
        shape = ModelConfig.from_size(m.name, vocab_size=m.vocab_size)
        if any(getattr(shape, f) != getattr(m, f) for f in _SHAPE_FLAGS):
            raise ConfigError(f"model.name {m.name!r} does not match the shape; clear the name "
                              f"to write the shape flags")
        argv = ["--model-size", m.name]
    else:
        argv = []
        for f in _SHAPE_FLAGS:
            v = getattr(m, f)
            if v is not None and not (f == "num_query_groups" and v == m.num_attention_heads):
                argv += ["--" + f.replace("_", "-"), str(v)]
    if m.max_position_embeddings != m.seq_length:
        argv += ["--max-position-embeddings", str(m.max_position_embeddings)]
    if m.rope_scaling is not None:
        flags = {"rope_type": "llama3", "factor": m.rope_scaling.get("factor"),
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
        if m.rope_scaling != flags:
            raise ConfigError(f"model.rope_scaling {m.rope_scaling} cannot be written as flags "
                              f"(--use-rope-scaling is llama3 with factors 1/4 and 8192)")
        argv += ["--use-rope-scaling", "--rope-scaling-factor", _word(float(flags["factor"]))]
    if t.tokens_per_param is not None:
        argv += ["--tokens-per-param", _word(float(t.tokens_per_param))]
    elif t.train_tokens is not None:
        argv += ["--train-tokens", str(t.train_tokens)]
    else:
        argv += ["--train-iters", str(t.train_iters)]
    if o.lr_warmup_fraction is None:
        if not o.lr_warmup_iters:
            raise ConfigError("optim: no warm-up fraction and 0 warm-up steps cannot be written "
                              "as flags; set lr_warmup_fraction to 0.0")
        argv += ["--lr-warmup-iters", str(o.lr_warmup_iters)]
    elif o.lr_warmup_fraction != parser.get_default("lr_warmup_fraction"):
        argv += ["--lr-warmup-fraction", _word(float(o.lr_warmup_fraction))]
    if cfg.data.valid_data_path:
        argv += ["--valid-data-path", *(f"{k}={v}" for k, v in cfg.data.valid_data_path.items())]
    for action in parser._actions:
        dest = action.dest
        if dest not in fields or dest in _SPECIAL or not action.option_strings:
            continue
        sec, name, neg = fields[dest]
        value = getattr(opts if sec == "run" else getattr(cfg, sec), name)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if bool(value) != neg:
                argv.append(flag)
        elif isinstance(action, argparse.BooleanOptionalAction):
            if value is not None:
                argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == "+":
            if value:
                argv += [flag, *map(str, value)]
        elif value is not None and (value != action.default or dest in ("min_lr", "vocab_size")):
            argv += [flag, _word(value)]
    return argv


def apply_flags(cfg: Config, argv: list[str], where: str = "flags") -> Config:
    """A copy of `cfg` with the fields that plain flags set (e.g. a study's extra_args).

    Only flags that map to one field are allowed here (not the shape, length of training,
    warm-up or validation sets, which studies set themselves); the result is validated again.
    """
    parser, fields = _parser(suppress=True), _flag_fields()
    try:
        given = vars(parser.parse_args(argv))
    except SystemExit:
        raise ConfigError(f"{where}: cannot parse {argv}") from None
    d = cfg.to_dict()
    for dest, value in given.items():
        if dest in _SPECIAL or dest not in fields or fields[dest][0] == "run":
            raise ConfigError(f"{where}: --{dest.replace('_', '-')} cannot be set here")
        sec, name, neg = fields[dest]
        d[sec][name] = (not value) if neg else value
    return Config.from_dict(d)


# ----- help text: field docstrings, Megatron equivalence -----

OURS = {"model_size", "use_kernels", "cross_entropy_chunk_tokens", "compile",
        "pipeline_schedule", "target", "data_check_tokens", "tokens_per_param", "device",
        "max_nonfinite_steps", "no_verify_checksums", "save_iters", "keep_last_checkpoints",
        "no_tensorboard", "run_kind"}
"""Flags of megacpt's own (no Megatron-LM flag of that name); marked [megacpt] in the help."""
MEGATRON = {
    "tie_word_embeddings": "Megatron ties by default, --untie-embeddings-and-output-weights "
                           "unties; here untied (LLaMA2) is the default",
    "grad_bucket_size_mb": "Megatron: --ddp-bucket-size, in elements",
    "train_tokens": "Megatron counts samples (--train-samples) instead",
    "init_from": "Megatron: --pretrained-checkpoint with --finetune",
    "log_dir": "Megatron: --tensorboard-dir",
    "valid_data_path": "Megatron's flag is one blend of prefixes; here named sets",
    "attention_backend": "Megatron's flag of this name has other values",
}
"""Flags whose Megatron-LM counterpart differs in name, unit or meaning."""


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring on one line} of a dataclass (the string literal under a field;
    none when the source is not installed, e.g. bytecode only: the help is then shorter)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _cli_words(doc: str, flag: str) -> str:
    """A field docstring as help of `flag`: without the references to the flag itself,
    "None" said as "not given", no backticks, % escaped for argparse."""
    f = re.escape(flag)
    head = re.match(rf"^`{f}( \w+)?`[.:] ", doc)          # "`--flag N`: does ..."
    doc = doc[head.end():] if head else doc
    doc = re.sub(rf" \(`{f}`\)", "", doc)              # "... (`--flag`)."
    doc = re.sub(rf"\(`{f}`[;,] ", "(", doc)            # "(`--flag`; more)"
    doc = re.sub(rf"\(`{f}`([^`]*)`\)", r"(\1)", doc)  # "(`--flag zh=PREFIX`)"
    doc = re.sub(r"\bNone(/1)?( means|:)", lambda m: "not given" + (" or 1" if m[1] else "")
                 + m[2], doc)
    doc = doc.replace("`", "").replace("%", "%%")
    return doc[:1].upper() + doc[1:] if head else doc


def flag_help(dest: str, note: str | None, fields: dict[str, tuple[str, str, bool]],
              strict: bool = True) -> str:
    """One flag's help: its field's docstring (% escaped for argparse), the command line's
    own `note` (the `help=` of `build_parser`), and its relation to Megatron-LM's flags.
    A field without docstring is an error (`strict`) or leaves the note alone."""
    parts = []
    doc = field_docs(SECTIONS[fields[dest][0]]).get(fields[dest][1]) if dest in fields else None
    if dest in fields and not doc and strict:
        sec, name, _ = fields[dest]
        raise ConfigError(f"config field {sec}.{name} (flag --{dest.replace('_', '-')}) "
                          f"has no docstring; document the field")
    if doc:
        sec, name, neg = fields[dest]
        doc = _cli_words(doc, "--" + dest.replace("_", "-"))
        parts.append(f"Turns off {sec}.{name}: {doc}" if neg else doc)
    if note:
        parts.append(note + ("" if note.endswith(".") else "."))
    if dest in MEGATRON:
        parts.append(f"[{MEGATRON[dest]}]")
    elif dest in OURS:
        parts.append("[megacpt]")
    return " ".join(parts)


def document(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Fill in every flag's help (`flag_help`); returns the parser. Lenient, so that a flag
    not (yet) mapped or documented never breaks the command line; tests/test_flags.py and
    tests/test_arguments.py hold every flag to the strict rules."""
    fields = flag_fields(parser, strict=False)
    for action in parser._actions:
        if action.dest != "help":
            action.help = flag_help(action.dest, action.help, fields, strict=False)
    return parser


class HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" where there is a default to show (not None, False or [])."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and action.option_strings
                and default not in (None, False, [], argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text
