"""The bundled sample corpus (examples/data) and its roff stripper."""
import gzip
import json
import os
import re

import pytest

from _data_helpers import CORPUS
from _harness import load_script

SCRIPTS = {"en": r"[A-Za-z]", "zh": r"[\u4e00-\u9fff]", "fr": r"[A-Za-zéèàçù]",
           "ru": r"[\u0400-\u04ff]"}
MIN_SHARE = {"en": 0.9, "zh": 0.4, "fr": 0.9, "ru": 0.5}  # of word characters; man pages
# keep command names and options in Latin letters


def load(lang, split):
    path = os.path.join(CORPUS, f"{lang}_{split}.jsonl.gz")
    return [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]


@pytest.mark.parametrize("lang", sorted(SCRIPTS))
def test_language_files(lang):
    train, valid = load(lang, "train"), load(lang, "valid")
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in train + valid)
    text = "".join(d["text"] for d in train)
    assert len(text.encode()) > (2_000_000 if lang in ("en", "zh") else 1_000_000)
    letters = re.findall(r"\w", text[:200_000])
    share = sum(bool(re.match(SCRIPTS[lang], ch)) for ch in letters) / len(letters)
    assert share > MIN_SHARE[lang], share
    assert not {d["text"] for d in valid} & {d["text"] for d in train}
    assert 0.03 < len("".join(d["text"] for d in valid)) / len(text) < 0.15
    # roff stripped (man(7) itself quotes a few requests, and one page has a broken escape)
    assert len(re.findall(r"^\.(TH|SH|PP|TP|B|I|BR|IR) ", text, re.M)) <= 3
    assert len(re.findall(r"\\f[BIRP]", text)) <= 3


def test_total_size_is_small():
    total = sum(os.path.getsize(os.path.join(CORPUS, f)) for f in os.listdir(CORPUS)
                if f.endswith(".jsonl.gz"))
    assert total < 5_000_000
    assert os.path.isfile(os.path.join(CORPUS, "SOURCES.md"))


def test_roff_to_text():
    bc = load_script(os.path.join(CORPUS, "build_corpus.py"))
    src = "\n".join([
        '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list \\fBdirectory\\fP contents",
        ".SH OPTIONS", ".TP", ".BR \\-a \", \" \\-\\-all", "do not ignore entries starting with",
        "\\(lq.\\(rq", ".de XX", "junk", "..", ".nf", "  keep   spacing", ".fi",
        "中文第一行", "第二行"])
    assert bc.roff_to_text(src) == "\n".join([
        "NAME", "ls - list directory contents", "OPTIONS", "-a, --all",
        "do not ignore entries starting with “.”", "  keep   spacing", "中文第一行第二行"])
    fortunes = "\x1b[32mone\x1b[m\n%\ntwo\nlines\n%\n"
    assert bc.fortunes_to_texts(fortunes) == ["one", "two\nlines"]
