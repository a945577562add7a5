#!/usr/bin/env python
"""Every measured number in the prose of the docs comes from a committed JSON file.

``python scripts/claims.py`` checks README.md, docs/*.md and every benchmarks/**/README.md
(exit 1 and one line per problem); ``--list`` prints every number it checked, with the JSON
file that holds it. ``check(root)`` returns the problems as a list of strings.

What is read
------------
The page's text outside: the generated blocks of scripts/docs_numbers.py
(``<!-- numbers: NAME (FILES) -->`` ... ``<!-- /numbers -->``: that script checks them), fenced
and indented (4 spaces after a blank line) code blocks, inline code spans, HTML comments, link targets ``](...)`` and bare URLs.
Hand-written markdown tables outside the generated blocks are read like prose.

Markers (HTML comments, so invisible on the rendered page)
----------------------------------------------------------
``<!-- claims: FILE.json, DIR, GLOB*.json -->``
    The sources of the numbers from this marker to the next claims marker (or the end of the
    page). A directory stands for every ``*.json`` under it, a glob for the files it matches;
    ``FILE#key/key`` takes only the numbers under that key path (for large files, so that a
    number changed by hand does not find a match by chance elsewhere in them); every entry must
    name at least one existing file (and key path).
``<!-- not-measured-region: REASON -->`` ... ``<!-- /not-measured-region -->``
    Nothing between the two is checked: for a table or list made only of settings or of
    numbers quoted from a paper (the reference scripts' options, the paper's reported
    accuracies). REASON must say which; ``--list`` prints how many numbers each region holds.
``<!-- not-measured: PHRASE; PHRASE; ... -->``
    Anywhere on the page, for the whole page: each PHRASE is a piece of the page's text holding
    a number that is not a measurement (an option value, a setting, a target, a count with a
    unit, a number of the paper), e.g. ``γ = 0.01; 200 epochs; ≥ 3×``. A number is exempt only
    where it occurs inside one of these phrases (whitespace may differ), not elsewhere on the
    page. A phrase that exempts nothing is reported (stale).

Which numbers are checked (the rule)
------------------------------------
A number token is ``[+-−]?digits[,ddd...][.digits][e±digits]``. Skipped automatically, as
names and not measurements:

* a token glued to a name: a letter, ``_``, ``/``, ``#``, ``§`` or ``$`` right before it, a
  ``-`` right before it that follows a letter or a skipped token (PGD-20, WRN-34-10, CIFAR-10,
  ResNet-18, L2, fp32, H100, §4), or a letter right after it that is not a unit (3D, 2nd);
* dates ``YYYY-MM-DD`` and versions: a token with two dots (2.13.0) or right after one of
  VERSION_WORDS (``torch 2.13``, ``Python ≥ 3.9``);
* references: a token right after one of REFERENCE_WORDS (Figure 1, seed 0, rung ...);
* dimensions: ``A×B`` with a number on both sides (8×8, 128×3×32×32) and fractions ``A/B``
  (8/255).

Every other token is **measured** (checked) when it is one of:

* a decimal (a fractional part or an exponent): 57.0, 0.54, 2.5e-6;
* a number with a unit right after it: ``%``, ``×``/``x`` (a ratio, a speed-up), ``s``, ``ms``,
  ``img/s``, ``µs``/``us``, ``min``, ``h`` (and the words minute(s), second(s), hour(s)), ``GB/s``, ``GB``, ``MB``, ``B``, ``M``, ``K``; the first number of
  a range or pair joined by ``–``, ``-``, ``to``, ``→``, ``against``, ``and``, ``or`` takes the
  unit of the second (5 to 13 min, 10–18 ×);
* an integer written with thousands separators (19,600; 1,320,320);
* a number right after ``±`` or ``t =``;
* any number in a cell of a hand-written markdown table.

Plain integers in prose (200 epochs, 2 processes, batch 128, 10 seeds) are counts and settings
and are not checked. Every measured token must be exempted by a not-measured phrase or lie under
a claims marker and **equal a number of its JSON files when rounded as printed**: with d digits
after the point, some JSON number x (times an allowed unit factor) lies within half a unit of
the last digit (|x·f − v| ≤ 0.5·10^-d, for a printed exponent relative to it). A token without
a sign also matches −x. The JSON's numbers are its numeric values and the numbers written
inside its strings (command lines, settings). Unit factors f: ``%``: 1 or 100 (a fraction
printed as a percentage); ``s``/``ms``/``µs``/``min``/``h``: 1, 10^±3, 10^±6, and 60 or 1/60
(minutes ↔ seconds, hours ↔ minutes) — so a time in ms may come from seconds in the JSON and the
other way round; ``GB/s``/``GB``/``MB``: 1 or 10^-9 / 10^-6 (bytes); ``M``: 1 or 10^-6;
``K``: 1 or 10^-3; anything else: 1.

Load
----
A ratio (a ``×``/``x`` token) whose every matching JSON file records a load average (a key
containing ``load``: ``[1-min, 5-min, 15-min]`` or lists of them) whose 1-minute value exceeds
LOAD_LIMIT anywhere in the file is reported: a timing measured on a machine that loaded is not
quoted as a speed-up.
"""
from __future__ import annotations

import argparse
import bisect
import glob
import json
import os
import re
import sys
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD_LIMIT = 4.0

VERSION_WORDS = ("torch", "triton", "python", "cuda", "cu", "numpy", "version", "versions", "v", "gcc",
                 "pip", "setuptools", "lightning", "transformers", "autoattack", "torchattacks", "nccl",
                 "cudnn", "sm", "compute capability")
REFERENCE_WORDS = ("issue", "issues", "figure", "fig.", "table", "eq.", "equation", "algorithm", "section",
                   "seed", "seeds", "rung", "rungs", "round", "rounds", "step", "steps", "epoch", "epochs",
                   "task", "tasks", "pr", "page", "line", "lines", "run", "runs", "sitting", "commit", "arm")

NUMBERS_START = re.compile(r"^<!-- numbers: (?P<name>[\w.-]+) \((?P<files>[^)]*)\) -->\s*$")
NUMBERS_END = "<!-- /numbers -->"
CLAIMS = re.compile(r"<!--\s*claims:\s*(?P<files>.*?)\s*-->", re.S)
NOT_MEASURED = re.compile(r"<!--\s*not-measured:\s*(?P<phrases>.*?)\s*-->", re.S)
REGION_START = re.compile(r"^<!--\s*not-measured-region:\s*(?P<why>\S.*?)\s*-->\s*$")
REGION_END = "<!-- /not-measured-region -->"

TOKEN = re.compile(r"(?<![\d.,])[+\-−]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+\-−]?\d+)?")
DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")
UNIT = re.compile(r"(?P<sp>[ \u00a0\u2009\u202f]?)(?P<u>%|×|x(?![\w])|GB/s|GB\b|MB\b|ms\b|µs\b|us\b|min\b|s\b|h\b|"
                  r"img/s|images/s|B\b|M\b|K\b|minutes?\b|seconds?\b|hours?\b)")
ATTACHED_UNITS = ("x",)  # units that count only when glued to the number (1.30x, not "4 x 4")
JOIN = re.compile(r"\s*(?:–|-|—|to|→|against|and|or)\s*(?:~|about\s+)?$")
JOIN_AFTER = re.compile(r"^\s*(?:–|-|—|to|→|against|and|or)\s*(?:~|about\s+)?")
FACTORS = {
    "%": (1.0, 100.0),
    "s": (1.0, 1e3, 1e-3, 1e6, 1e-6, 60.0, 1 / 60.0), "ms": (1.0, 1e3, 1e-3, 1e6, 1e-6, 60.0, 1 / 60.0),
    "µs": (1.0, 1e3, 1e-3, 1e6, 1e-6), "us": (1.0, 1e3, 1e-3, 1e6, 1e-6),
    "min": (1.0, 1 / 60.0, 60.0, 1e-3), "h": (1.0, 1 / 60.0, 1 / 3600.0),
    "minute": (1.0, 1 / 60.0, 60.0, 1e-3), "minutes": (1.0, 1 / 60.0, 60.0, 1e-3),
    "second": (1.0, 1e3, 1e-3, 60.0, 1 / 60.0), "seconds": (1.0, 1e3, 1e-3, 60.0, 1 / 60.0),
    "hour": (1.0, 1 / 60.0, 1 / 3600.0), "hours": (1.0, 1 / 60.0, 1 / 3600.0),
    "GB/s": (1.0, 1e-9), "GB": (1.0, 1e-9), "MB": (1.0, 1e-6), "M": (1.0, 1e-6), "K": (1.0, 1e-3),
}


# ----------------------------------------------------------------------------- pages
def pages(root: str = ROOT) -> List[str]:
    out = ["README.md"]
    out += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    out += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "benchmarks", "**", "README.md"),
                                                              recursive=True))
    return [p.replace(os.sep, "/") for p in out if os.path.exists(os.path.join(root, p))]


def _blank(s: str) -> str:
    return re.sub(r"[^\n]", " ", s)


def region_text(text: str) -> Tuple[str, List[bool]]:
    """Only the lines inside not-measured regions (for counting what they leave unchecked)."""
    lines = text.split("\n")
    keep, inside = [], False
    for line in lines:
        s = line.strip()
        if REGION_START.match(s):
            inside = True
            keep.append(False)
        elif s == REGION_END:
            inside = False
            keep.append(False)
        else:
            keep.append(inside)
    return "\n".join(l if k else _blank(l) for l, k in zip(lines, keep)), [l.lstrip().startswith("|") for l in lines]


def prose(text: str) -> Tuple[str, List[bool]]:
    """The page with everything that is not prose replaced by spaces (newlines kept, so offsets
    and line numbers stay), and for each line whether it is a table row."""
    lines = text.split("\n")
    keep = []
    fence = None
    in_block = in_region = indented_code = False
    for i, line in enumerate(lines):
        s = line.strip()
        if fence is not None:
            keep.append(False)
            if s.startswith(fence):
                fence = None
            continue
        if in_block:
            keep.append(False)
            if s == NUMBERS_END:
                in_block = False
            continue
        if in_region:
            keep.append(False)
            if s == REGION_END:
                in_region = False
            continue
        if REGION_START.match(s):
            in_region = True
            keep.append(False)
            continue
        if (line.startswith("    ") or line.startswith("\t")) and line.strip() and \
                (not keep or (i > 0 and (not lines[i - 1].strip() or not keep[-1]))) and \
                (i == 0 or not lines[i - 1].strip() or indented_code):
            indented_code = True  # an indented code block (after a blank line)
            keep.append(False)
            continue
        if line.strip():
            indented_code = False
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            fence = m.group(1)
            keep.append(False)
            continue
        if NUMBERS_START.match(s):
            in_block = True
            keep.append(False)
            continue
        keep.append(True)
    if in_region or in_block:
        raise ValueError("a not-measured region or a numbers block is never closed")
    out = "\n".join(l if k else _blank(l) for l, k in zip(lines, keep))
    out = re.sub(r"<!--.*?-->", lambda m: _blank(m.group(0)), out, flags=re.S)
    out = re.sub(r"(`+)(?:(?!\1)(?!\n[ \t]*\n).)+?\1", lambda m: _blank(m.group(0)), out, flags=re.S)
    out = re.sub(r"\]\([^)\s]*\)", lambda m: "]" + _blank(m.group(0)[1:]), out)
    out = re.sub(r"<?https?://[^\s)>]+>?", lambda m: _blank(m.group(0)), out)
    out = DATE.sub(lambda m: _blank(m.group(0)), out)
    table = [k and l.lstrip().startswith("|") for l, k in zip(lines, keep)]
    return out, table


# ----------------------------------------------------------------------------- tokens
class Token:
    __slots__ = ("text", "start", "end", "value", "digits", "exp", "unit", "line", "why", "signed")

    def __init__(self, text, start, end, line):
        self.text, self.start, self.end, self.line = text, start, end, line
        t = text.replace("−", "-").replace(",", "")
        self.signed = t[0] in "+-"
        self.value = float(t)
        mant = re.split(r"[eE]", t)[0]
        self.digits = len(mant.split(".")[1]) if "." in mant else 0
        self.exp = int(re.split(r"[eE]", t)[1].replace("+", "")) if re.search(r"[eE]", t) else 0
        self.unit: Optional[str] = None
        self.why: Optional[str] = None  # why it is measured; None: not checked

    def __repr__(self):
        return f"{self.text}{self.unit or ''}"


def _word_before(s: str, i: int) -> str:
    m = re.search(r"([A-Za-z][\w.]*)\s*(?:==|>=|≥|<=|≤|=|<|>|\+)?\s*$", s[max(0, i - 40):i])
    return m.group(1).lower() if m else ""


def tokens(text: str, table: Sequence[bool]) -> List[Token]:
    """Every number token of the prose, with ``why`` set for the measured ones."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    out: List[Token] = []
    skipped_end = -10
    for m in TOKEN.finditer(text):
        s, e = m.start(), m.end()
        tok = m.group(0)
        # a leading '-' glued to something before it is a hyphen, not a sign
        if tok[0] in "+-−" and s > 0 and not text[s - 1].isspace() and text[s - 1] not in "(|[~≈":
            s += 1
            tok = tok[1:]
        line = bisect.bisect_right(line_starts, s)
        t = Token(tok, s, e, line)
        before = text[s - 1] if s > 0 else " "
        after = text[e] if e < len(text) else " "
        name = False
        if before.isalpha() or before in "_/#§$\\" or after in "_":
            name = True
        elif before == "-" and s >= 2 and (text[s - 2].isalpha() or (skipped_end == s - 1)):
            name = True
        elif before == "." and s >= 2 and text[s - 2].isdigit():  # 2.13.0's third part
            name = True
        elif after == "." and e + 1 < len(text) and text[e + 1].isdigit():
            name = True  # a version with two dots
        elif after.isalpha() or after in "µ":
            u = UNIT.match(text, e)
            if not (u and not u.group("sp")):
                name = True
        if not name:
            w = _word_before(text, s)
            if w in VERSION_WORDS or w in REFERENCE_WORDS:
                name = True
        if not name and (before in "×/" and s >= 2 and text[s - 2].isdigit()
                         or after in "×/" and e + 1 < len(text) and text[e + 1].isdigit()
                         or re.match(r"\s*×\s*\d", text[e:e + 4]) or re.search(r"\d\s*×\s*$", text[max(0, s - 4):s])):
            name = True  # a dimension (8×8) or a fraction (8/255)
        if name:
            skipped_end = e
            continue
        u = UNIT.match(text, e)
        if u and not (u.group("sp") and u.group("u") in ATTACHED_UNITS):
            t.unit = u.group("u")
        out.append(t)
    # ranges and pairs: the first number takes the unit of the second
    for a, b in zip(out, out[1:]):
        if a.unit is None and b.unit is not None and JOIN.match(text[a.end:b.start]) and \
                JOIN_AFTER.match(text[a.end:b.start]) and b.start - a.end < 14:
            a.unit = b.unit
    for t in out:
        if t.unit is not None:
            t.why = "unit"
        elif t.digits or t.exp:
            t.why = "decimal"
        elif "," in t.text:
            t.why = "grouped"
        elif re.search(r"(±|\bt\s*=)\s*$", text[max(0, t.start - 6):t.start]):
            t.why = "spread"
        elif table[t.line - 1]:
            t.why = "table"
    return out


# ----------------------------------------------------------------------------- the JSON side
def _numbers_of(obj, out: List[float]):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str):
        for m in TOKEN.finditer(obj):
            try:
                out.append(float(m.group(0).replace("−", "-").replace(",", "")))
            except ValueError:
                pass
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_of(k, out)
            _numbers_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers_of(v, out)


def _loads_of(obj, out: List[float], key_has_load=False):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _loads_of(v, out, "load" in str(k).lower() and "loader" not in str(k).lower())
    elif isinstance(obj, list):
        if key_has_load and len(obj) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in obj):
            out.append(float(obj[0]))
        else:
            for v in obj:
                _loads_of(v, out, key_has_load)
    elif key_has_load and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append(float(obj))


@lru_cache(maxsize=None)
def json_file(path: str) -> Tuple[Tuple[float, ...], Optional[float]]:
    """``(sorted numbers, max 1-minute load or None)`` of one JSON file, or of the part of it
    under ``FILE#key/key`` (the load: the whole file's)."""
    path, _, keys = path.partition("#")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    loads: List[float] = []
    _loads_of(d, loads)
    for k in (keys.split("/") if keys else []):
        d = d[int(k)] if isinstance(d, list) else d[k]
    nums: List[float] = []
    _numbers_of(d, nums)
    return tuple(sorted(set(nums))), (max(loads) if loads else None)


def expand(root: str, entries: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(files, entries that name no file)``."""
    files, bad = [], []
    for e in entries:
        e, _, keys = e.partition("#")
        full = os.path.join(root, e)
        if os.path.isdir(full):
            got = sorted(glob.glob(os.path.join(full, "**", "*.json"), recursive=True))
        elif any(c in e for c in "*?["):
            got = sorted(glob.glob(full, recursive=True))
        else:
            got = [full] if os.path.isfile(full) else []
        if keys:
            for g in list(got):
                try:
                    json_file(g + "#" + keys)
                except (KeyError, IndexError, ValueError, TypeError):
                    got.remove(g)
        if not got:
            bad.append(e + ("#" + keys if keys else ""))
        files += [os.path.relpath(g, root).replace(os.sep, "/") + ("#" + keys if keys else "") for g in got]
    return list(dict.fromkeys(files)), bad


def _found(nums: Sequence[float], lo: float, hi: float) -> bool:
    i = bisect.bisect_left(nums, lo)
    return i < len(nums) and nums[i] <= hi


def matches(tok: Token, root: str, files: Sequence[str]) -> List[str]:
    """The files that hold ``tok`` rounded as printed."""
    half = 0.5 * 10.0 ** (tok.exp - tok.digits) * (1 + 1e-9) + 1e-12 * abs(tok.value)
    out = []
    for f in files:
        nums, _ = json_file(os.path.join(root, f))
        for fac in FACTORS.get(tok.unit or "", (1.0,)):
            hit = False
            for v in ([tok.value] if tok.signed else [tok.value, -tok.value]):
                # x * fac within [v - half, v + half]
                lo, hi = sorted(((v - half) / fac, (v + half) / fac))
                if _found(nums, lo, hi):
                    hit = True
                    break
            if hit:
                out.append(f)
                break
    return out


# ----------------------------------------------------------------------------- a page
def check_page(root: str, page: str, listing: Optional[list] = None) -> List[str]:
    with open(os.path.join(root, page), encoding="utf-8") as f:
        text = f.read()
    problems = []
    try:
        body, table = prose(text)
    except ValueError as e:
        return [f"{page}: {e}"]
    toks = tokens(body, table)
    # the claims scopes: (offset, files)
    scopes = []
    for m in CLAIMS.finditer(text):
        entries = [e.strip() for e in m.group("files").split(",") if e.strip()]
        files, bad = expand(root, entries)
        line = text.count("\n", 0, m.start()) + 1
        for b in bad:
            problems.append(f"{page}:{line}: claims marker names {b!r}, which is no JSON file here")
        scopes.append((m.start(), files, ", ".join(entries)))
    # the not-measured phrases: exempt spans
    spans = []
    for m in NOT_MEASURED.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for ph in (p.strip() for p in m.group("phrases").split(";")):
            if not ph:
                continue
            pat = re.compile(r"\s+".join(re.escape(w) for w in ph.split()))
            hits = [(h.start(), h.end()) for h in pat.finditer(body)]
            if not hits:
                problems.append(f"{page}:{line}: not-measured phrase {ph!r} occurs nowhere in the page's prose")
            spans.append((ph, line, hits, [0]))
    for t in toks:
        if t.why is None:
            continue
        exempt = False
        for ph, _, hits, used in spans:
            if any(a <= t.start and t.end <= b for a, b in hits):
                exempt = True
                used[0] += 1
        if exempt:
            if listing is not None:
                listing.append((page, t.line, repr(t), t.why, "not measured"))
            continue
        i = bisect.bisect_right([s[0] for s in scopes], t.start) - 1
        if i < 0:
            problems.append(f"{page}:{t.line}: {t!r} ({t.why}) has no claims marker above it")
            continue
        files = scopes[i][1]
        hit = matches(t, root, files)
        if not hit:
            problems.append(f"{page}:{t.line}: {t!r} ({t.why}) is in none of [{scopes[i][2]}]")
            continue
        if listing is not None:
            listing.append((page, t.line, repr(t), t.why, hit[0] + (f" (+{len(hit) - 1})" if len(hit) > 1 else "")))
        if t.unit in ("×", "x"):
            loads = [json_file(os.path.join(root, f))[1] for f in hit]
            if all(ld is not None and ld > LOAD_LIMIT for ld in loads):
                problems.append(f"{page}:{t.line}: the ratio {t!r} comes from {hit}, measured at a load average "
                                f"above {LOAD_LIMIT:g} (max {max(loads):.1f}): not a speed-up to quote")
    if listing is not None:
        rt, rtable = region_text(text)
        n = sum(1 for t in tokens(rt, rtable) if t.why is not None)
        if n:
            listing.append((page, 0, f"{n} numbers", "region", "not-measured regions"))
    for ph, line, hits, used in spans:
        if hits and not used[0]:
            problems.append(f"{page}:{line}: not-measured phrase {ph!r} exempts no measured number (stale)")
    return problems


# Pages not traced yet: their numbers are listed by ``--all`` but do not fail ``check``. Each
# entry says what is missing; an entry is removed when its page passes.
PENDING: Dict[str, str] = {}


def check(root: str = ROOT, only: Optional[Sequence[str]] = None, listing: Optional[list] = None,
          include_pending: bool = False) -> List[str]:
    """The problems of every page (README.md, docs/*.md, benchmarks/**/README.md) under ``root``
    (the PENDING pages only with ``include_pending`` or when named in ``only``)."""
    problems = []
    for page in (only or pages(root)):
        if page in PENDING and not include_pending and not only:
            continue
        problems += check_page(root, page, listing)
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print every checked number and its source")
    ap.add_argument("--all", action="store_true", help="also the PENDING pages")
    ap.add_argument("--root", default=ROOT)
    ap.add_argument("pages", nargs="*", help="only these pages (default: all)")
    a = ap.parse_args(argv)
    listing: Optional[list] = [] if a.list else None
    problems = check(a.root, a.pages or None, listing, include_pending=a.all)
    if listing is not None:
        counts: Dict[str, List[int]] = {}
        for page, line, tok, why, src in listing:
            print(f"{page}:{line}: {tok} [{why}] <- {src}")
            c = counts.setdefault(page, [0, 0, 0])
            if why == "region":
                c[2] += int(tok.split()[0])
            else:
                c[0 if src != "not measured" else 1] += 1
        for page in (a.pages or pages(a.root)):
            c = counts.get(page, [0, 0, 0])
            print(f"{page}: {c[0]} numbers matched in JSON, {c[1]} exempt as not measured (phrases), "
                  f"{c[2]} in not-measured regions")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
