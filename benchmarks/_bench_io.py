"""Shared by the benchmark scripts: writing their JSON results, and the shape of one GPU target."""
from __future__ import annotations

import json
import os
import platform
import socket


def write_json(path: str, out: dict, announce: bool = True, indent: int = 2) -> None:
    """Write ``out`` to ``path`` atomically (a killed run leaves the previous complete file),
    creating its folder; prints ``wrote PATH`` unless ``announce`` is False."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=indent, default=str)
    os.replace(tmp, path)
    if announce:
        print(f"wrote {path}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text(avg) -> str:
    """A recorded load average (1 / 5 / 15 min) as text; ``?`` when none was recorded."""
    return "?" if not avg else " / ".join(f"{v:.2f}" for v in avg)


def load_lines(data: dict, start_key: str, end_key: str) -> list:
    """The summary lines of the load averages a result recorded at its start and its end."""
    return [f"    load average at the {what} {load_text(data[k])}"
            for k, what in ((start_key, "start"), (end_key, "end")) if data.get(k)]


def target(value, goal, ok, **kw) -> dict:
    """One target of a GPU run (benchmarks/gpu_check.py): the measured ``value``, the ``goal`` as
    text, ``ok`` True (met), False (missed) or None (reported, or not measured); notes in ``kw``."""
    return dict(value=value, target=goal, ok=ok, **kw)


def rows_verdict(data: dict, is_bad, keys, complete_default: bool = True, present_only: bool = False):
    """``(ok, rows not ok)`` of a result with ``rows``: ok when it has rows, none of them ``is_bad``
    and it finished (``complete``, ``complete_default`` when absent); each bad row by ``keys``
    (only those it has, with ``present_only``)."""
    rows = data.get("rows", [])
    bad = [r for r in rows if is_bad(r)]
    not_ok = [{k: r.get(k) for k in keys if not present_only or k in r} for r in bad]
    return bool(rows) and not bad and bool(data.get("complete", complete_default)), not_ok
