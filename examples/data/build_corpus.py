"""Rebuild the bundled multilingual sample corpus from DFSG-free Debian packages.

    python examples/data/build_corpus.py [--workdir /tmp/megacpt_corpus] [--out examples/data]

Steps: `apt-get download` the packages listed in SOURCES (skipped for .deb files already in
the work directory), `dpkg-deb -x` them, turn every man page (roff) and every fortune into
plain text, and write per language

    {lang}_train.jsonl.gz, {lang}_valid.jsonl.gz      one JSON object per line:
        {"text": str, "source": "<package>:<file>[#<n>]"}

Documents are man pages (roff markup stripped: requests dropped or reduced to their text,
escapes resolved, filled lines joined into paragraphs) and single fortunes (ANSI colour
codes stripped). Per language and source the documents are shuffled with a fixed seed and
taken until the source's byte budget (UTF-8 bytes of text) is reached; the first
documents of each language (in that shuffled order) holding VALID_FRACTION of its bytes
go to the validation file. The output is deterministic for a
given set of package versions (gzip mtime 0). See SOURCES.md for versions and licenses.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys

# language -> [(package, glob of files inside the extracted package, kind, byte budget)]
SOURCES = {
    "en": [("manpages", "usr/share/man/man*/*.gz", "man", 1_300_000),
           ("manpages-dev", "usr/share/man/man*/*.gz", "man", 700_000),
           ("fortunes", "usr/share/games/fortunes/*", "fortune", 1_000_000)],
    "zh": [("manpages-zh", "usr/share/man/zh_CN/man*/*.gz", "man", 2_000_000),
           ("fortunes-zh", "usr/share/games/fortunes/*", "fortune", 1_000_000)],
    "fr": [("manpages-fr", "usr/share/man/fr/man*/*.gz", "man", 1_500_000)],
    "ru": [("manpages-ru", "usr/share/man/ru/man*/*.gz", "man", 1_000_000),
           ("fortunes-ru", "usr/share/games/fortunes/ru/*", "fortune", 500_000)],
}
VALID_FRACTION = 0.05
MIN_CHARS = 20
SEED = 20240901

_NAMED = {"em": "—", "en": "–", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "aq": "'",
          "dq": '"', "co": "©", "rg": "®", "bu": "•", "ga": "`", "ti": "~", "ha": "^",
          "rs": "\\", "mi": "-", "hy": "-", "pl": "+", "mu": "×", "di": "÷", "+-": "±",
          "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "de": "°", "tm": "™",
          "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "sq": "□", "lh": "☜", "rh": "☞",
          "at": "@", "sh": "#", "Po": "£", "Eu": "€", "eu": "€", "Do": "$", "ba": "|",
          "br": "|", "ul": "_", "ct": "¢", "ps": "¶", "sc": "§", "Ye": "¥", "mc": "µ"}
_ESCAPE = re.compile(
    r"\\(?:"
    r"\((?P<two>..)"                      # \(xx named glyph
    r"|\[(?P<long>[^\]]*)\]"              # \[name] named glyph
    r"|[fF](?:\(..|\[[^\]]*\]|.)"         # font change
    r"|s[-+]?(?:\(..|\[[^\]]*\]|'[^']*'|\d{1,2})"  # size change
    r"|\*(?:\(..|\[[^\]]*\]|.)"           # string interpolation
    r"|[nk](?:\(..|\[[^\]]*\]|.)"         # number register / mark
    r"|[hvwlLxXDbNoSRZ]'[^']*'"           # motions, widths, drawing
    r"|(?P<char>.))")                      # single-character escape
_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t",
           "'": "'", "`": "`", ".": ".", '"': "", "&": "", "|": "", "^": "", "c": "",
           "%": "", ":": "", "/": "", ",": "", "d": "", "u": "", "p": "", "r": "", "}": "",
           "{": "", "a": "", "!": "", "z": ""}
_PARA = {"PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "br", "Pp", "Lp", "It", "Bl", "El",
         "RS", "RE", "SS", "SH", "Sh", "Ss", "INDENT", "UNINDENT", "nf", "fi", "EX", "EE",
         "Bd", "Ed", "TS", "TE", "Vb", "Ve", "PD"}
_TEXT = {"B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB", "SH", "SS", "Sh", "Ss",
         "Nm", "Nd", "Ar", "Fl", "Op", "Xr", "Pa", "Dq", "Pq", "Ql", "Sq", "Em", "Sy", "Cm",
         "Ic", "Va", "Fn", "Fa", "Ft", "Dv", "Er", "Ev", "Li", "Tn", "Bq", "Ns", "UR", "MT",
         "OP", "Nx", "Fx", "Bx", "Ox", "At", "Ux", "q"}
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_MDOC_WORDS = {"Ar", "Fl", "Op", "Xr", "Pa", "Dq", "Pq", "Ql", "Sq", "Em", "Sy", "Cm", "Ic",
               "Va", "Fn", "Fa", "Ft", "Dv", "Er", "Ev", "Li", "Ns", "Nm", "No", "Oo", "Oc",
               "Bq", "Tn", "Xo", "Xc", "Ek", "Ta", "Aq"}
_CJK = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def resolve_escapes(line: str) -> str:
    """Replace roff escapes in one line by the characters they print (or nothing)."""
    def sub(m: re.Match) -> str:
        if m.group("two") is not None:
            return _NAMED.get(m.group("two"), "")
        if m.group("long") is not None:
            name = m.group("long")
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _NAMED.get(name, "")
        if m.group("char") is not None:
            return _SINGLE.get(m.group("char"), m.group("char"))
        return ""
    return _ESCAPE.sub(sub, _strip_comment(line))


def _strip_comment(line: str) -> str:
    """Drop a trailing roff comment (backslash-quote or backslash-hash, not escaped)."""
    i = 0
    while True:
        j = line.find("\\", i)
        if j < 0 or j + 1 >= len(line):
            return line
        if line[j + 1] in "\"#":
            return line[:j]
        i = j + 2


def _macro_args(rest: str) -> list[str]:
    """Split macro arguments roff-style (double quotes group words)."""
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"?|\S+', rest)]


def _join(prev: str, nxt: str) -> str:
    if not prev:
        return nxt
    if _CJK.match(prev[-1:]) or _CJK.match(nxt[:1]):
        return prev + nxt
    return prev + " " + nxt


def roff_to_text(src: str) -> str:
    """Plain text of a man page: paragraphs separated by newlines."""
    out: list[str] = []
    para = ""
    fill = True
    skip_until = None
    table_format = False
    tag_next = False  # after .TP the next line is the item's tag, printed on its own line

    def flush():
        nonlocal para
        if para.strip():
            out.append(para.strip())
        para = ""

    for raw in src.splitlines():
        if skip_until is not None:
            if raw.strip().startswith(skip_until):
                skip_until = None
            continue
        if table_format:  # tbl: options and format lines up to the one ending in '.'
            table_format = not raw.rstrip().endswith(".")
            continue
        if raw.startswith((".\\\"", "'\\\"", '.\\"')) or raw.strip() in (".", "'"):
            continue
        if raw[:1] in (".", "'"):
            m = re.match(r"[.']\s*(\S+)\s*(.*)", raw)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
                continue
            if name == "TS":
                table_format = True
            if name in ("nf", "EX", "Vb", "Bd"):
                flush()
                fill = False
            elif name in ("fi", "EE", "Ve", "Ed"):
                flush()
                fill = True
            if name in _PARA:
                flush()
            if name in ("TP", "TQ"):
                tag_next = True
            elif name == "IP" and rest.strip():
                para = (_macro_args(resolve_escapes(rest)) or [""])[0]
            if name in _TEXT:
                args = [a for a in _macro_args(resolve_escapes(rest)) if a not in _MDOC_WORDS]
                glue = "" if name in _ALTERNATING else " "
                text = glue.join(args).strip()
                if text:
                    if name in ("SH", "SS", "Sh", "Ss") or tag_next:
                        out.append(text)
                        tag_next = False
                    elif fill:
                        para = _join(para, text)
                    else:
                        out.append(text)
            continue
        text = resolve_escapes(raw)
        if tag_next and text.strip():
            out.append(text.strip())
            tag_next = False
        elif not fill:
            out.append(text.rstrip())
        elif not text.strip():
            flush()
        else:
            para = _join(para, text.strip().replace("\t", " "))
    flush()
    lines = [re.sub(r"[ \t]+", " ", ln).strip() if not ln.startswith(" ") else ln.rstrip()
             for ln in out]
    return "\n".join(ln for ln in lines if ln)


def fortunes_to_texts(src: str) -> list[str]:
    """Split a fortune file on '%' lines; strip ANSI colour codes."""
    src = _ANSI.sub("", src.replace("\r\n", "\n"))
    parts = re.split(r"(?m)^%\s*$", src)
    return [p.strip("\n") for p in parts if p.strip()]


def fetch_packages(workdir: str, packages: list[str]) -> dict[str, str]:
    """apt-get download + dpkg-deb -x; returns package -> extraction root."""
    os.makedirs(workdir, exist_ok=True)
    roots = {}
    for pkg in packages:
        debs = glob.glob(os.path.join(workdir, f"{pkg}_*.deb"))
        if not debs:
            print(f"downloading {pkg}", file=sys.stderr)
            subprocess.run(["apt-get", "download", pkg], cwd=workdir, check=True)
            debs = glob.glob(os.path.join(workdir, f"{pkg}_*.deb"))
        root = os.path.join(workdir, "root", pkg)
        if not os.path.isdir(root):
            os.makedirs(root)
            subprocess.run(["dpkg-deb", "-x", debs[0], root], check=True)
        roots[pkg] = root
        print(f"{pkg}: {os.path.basename(debs[0])}", file=sys.stderr)
    return roots


def documents(pkg: str, root: str, pattern: str, kind: str) -> list[tuple[str, str]]:
    """All (source, text) documents of one package, in sorted file order."""
    docs = []
    for path in sorted(glob.glob(os.path.join(root, pattern))):
        if os.path.islink(path) or not os.path.isfile(path) or path.endswith(".dat"):
            continue
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        try:
            src = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        name = f"{pkg}:{os.path.relpath(path, root)}"
        if kind == "man":
            if re.match(r"\s*\.so\s", src):  # a redirect to another page
                continue
            docs.append((name, roff_to_text(src)))
        else:
            docs.extend((f"{name}#{i}", t) for i, t in enumerate(fortunes_to_texts(src)))
    return [(n, t) for n, t in docs if len(t) >= MIN_CHARS]


def select(docs: list[tuple[str, str]], budget: int, seed: int) -> list[tuple[str, str]]:
    """Deduplicate, shuffle with a fixed seed, take documents until `budget` bytes."""
    seen, unique = set(), []
    for name, text in docs:
        h = hashlib.sha1(text.encode()).digest()
        if h not in seen:
            seen.add(h)
            unique.append((name, text))
    random.Random(seed).shuffle(unique)
    chosen, used = [], 0
    for name, text in unique:
        n = len(text.encode())
        if used + n > budget and chosen:
            continue
        chosen.append((name, text))
        used += n
        if used >= budget * 0.995:
            break
    return chosen


def write_jsonl_gz(path: str, docs: list[tuple[str, str]]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                 compresslevel=9, filename="") as f:
        for name, text in docs:
            f.write((json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
                    .encode("utf-8"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/megacpt_corpus")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args(argv)
    roots = fetch_packages(args.workdir, [p for srcs in SOURCES.values() for p, *_ in srcs])
    for lang, srcs in SOURCES.items():
        chosen = []
        for k, (pkg, pattern, kind, budget) in enumerate(srcs):
            docs = documents(pkg, roots[pkg], pattern, kind)
            picked = select(docs, budget, SEED + k)
            print(f"{lang} {pkg}: {len(picked)}/{len(docs)} docs, "
                  f"{sum(len(t.encode()) for _, t in picked) / 1e6:.2f} MB", file=sys.stderr)
            chosen.extend(picked)
        random.Random(SEED).shuffle(chosen)
        sizes = [len(t.encode()) for _, t in chosen]
        cum = list(itertools.accumulate(sizes, initial=0))  # cum[k] = bytes of first k docs
        n_valid = next(k for k in range(1, len(chosen))
                       if cum[k] >= VALID_FRACTION * cum[-1])
        for split, part in (("valid", chosen[:n_valid]), ("train", chosen[n_valid:])):
            path = os.path.join(args.out, f"{lang}_{split}.jsonl.gz")
            write_jsonl_gz(path, part)
            print(f"wrote {path}: {len(part)} docs, "
                  f"{sum(len(t.encode()) for _, t in part) / 1e6:.2f} MB text, "
                  f"{os.path.getsize(path) / 1e6:.2f} MB gz", file=sys.stderr)


if __name__ == "__main__":
    main()
