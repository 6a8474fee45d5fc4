"""Help text of the trainer's flags: every flag documented, a flag that sets a config field
documented by that field's docstring (one source), defaults and Megatron relations shown."""
import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from megacpt import flags
from megacpt.arguments import build_parser
from megacpt.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _help(parser, action) -> str:
    """The help line argparse prints for `action` (defaults filled in, on one line)."""
    text = flags.HelpFormatter(parser.prog)._get_help_string(action)
    return " ".join(text.split()) % {**vars(action), "prog": parser.prog}


def test_every_flag_has_help_and_fields_their_docstring():
    p = build_parser()
    fields = flags.flag_fields(p)  # strict: every flag maps to one field
    actions = [a for a in p._actions if a.dest != "help"]
    assert len(actions) > 80
    for a in actions:
        if a.dest in fields:  # strict: the field has a docstring
            flags.flag_help(a.dest, None, fields)
        text = _help(p, a)
        assert len(text) > 10, f"{a.option_strings[0]} has no help"
        assert "\n" not in a.help
        if a.dest in fields:
            sec, name, neg = fields[a.dest]
            doc = flags.field_docs(flags.SECTIONS[sec])[name]
            assert doc, f"{sec}.{name} has no docstring"
            # every word of the field's docstring is in the help, but the flag's own name
            # and "None" (said "not given" on the command line)
            flag = a.option_strings[0]
            words = {w.strip("`.,;:()").lower() for w in doc.split()} - {"", "none", "none/1"}
            said = {w.strip("`.,;:()").lower() for w in text.split()}
            missing = {w for w in words - said if flag not in w}
            assert not missing, f"{flag}: help lacks {missing} of {sec}.{name}'s docstring"
            if neg:
                assert text.startswith(f"Turns off {sec}.{name}:")
        if a.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {a.default})" in text, a.option_strings[0]
        else:
            assert "(default: None)" not in text and "(default: False)" not in text


def test_help_marks_megatron_relations():
    p = build_parser()
    by_flag = {a.option_strings[0]: _help(p, a) for a in p._actions}
    assert "[Megatron: --ddp-bucket-size, in elements]" in by_flag["--grad-bucket-size-mb"]
    assert "MiB" in by_flag["--grad-bucket-size-mb"]
    assert "(default: 25.0)" in by_flag["--grad-bucket-size-mb"]
    assert by_flag["--model-size"].endswith("[megacpt]")
    assert "[megacpt]" not in by_flag["--lr"] and "[Megatron" not in by_flag["--lr"]
    assert "5%" in by_flag["--lr-warmup-fraction"]        # % from a docstring survives argparse
    for dest in flags.OURS | set(flags.MEGATRON):
        assert any(a.dest == dest for a in p._actions), f"{dest} in flags.OURS/MEGATRON is no flag"


def test_field_docs_reads_attribute_docstrings():
    @dataclasses.dataclass
    class C:
        a: int = 1
        """First
        field."""
        b: int = 2
        c: int = 3
        """Third."""

    assert flags.field_docs(C) == {"a": "First field.", "c": "Third."}
    with pytest.raises(ConfigError, match=r"run.b \(flag --a\) has no docstring"):
        flags.flag_help("a", None, {"a": ("run", "b", False)})
    # building the CLI is lenient: an undocumented field or unmapped flag keeps its note
    assert flags.flag_help("a", "Note", {"a": ("run", "b", False)}, strict=False) == "Note."
    p = build_parser()
    p.add_argument("--no-such-field", help="A flag added without a field")
    assert "no_such_field" not in flags.flag_fields(p, strict=False)
    with pytest.raises(ConfigError, match="--no-such-field maps to no single config field"):
        flags.flag_fields(p)


def test_help_output_is_grouped():
    out = subprocess.run([sys.executable, "-m", "megacpt.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    groups = [line for line in out.stdout.splitlines() if line.endswith(":") and
              not line.startswith(" ")]
    assert groups == ["options:", "model:", "parallelism:", "data:",
                      "optimizer and learning rate:", "training:", "checkpoints:", "logging:"]
    assert "Registry size name" in out.stdout and "%%" not in out.stdout


def test_arguments_reexports_the_mapping():
    import megacpt.arguments as arguments

    assert arguments.config_to_argv is flags.config_to_argv
    assert arguments.apply_flags is flags.apply_flags
    with pytest.raises(AttributeError):
        arguments.no_such_name
