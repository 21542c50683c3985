"""How long `ftsam demo --offline` takes on this machine, and what it prints (issues 18 and 27).

    .venv/bin/python benchmarks/demo_time.py --runs 2 --note "nothing else running"   # measure, then the report
    .venv/bin/python benchmarks/demo_time.py --runs 1 -- --defense_epochs 40 --rho 2   # another setting
    .venv/bin/python benchmarks/demo_time.py --report_only                              # the report from the data

Each run is `python -m ftsam_plugin demo --offline [flags after --]` in a fresh process, from this checkout, with an
empty cache for the first run of an invocation (XDG_CACHE_HOME in a temporary folder kept across its runs, so the
first run also writes the digits image folder) and its record in a temporary folder. Measured per run: wall seconds
(perf_counter around the process), user and system CPU seconds of the process and its children
(`resource.getrusage(RUSAGE_CHILDREN)`, before and after), the stage times and the table the demo prints (parsed from
its output), and the 1-minute load average before and after. One invocation is one session of
`benchmarks/results/demo_time.json` (its commit, machine: CPU model, torch version and thread count, and `--note`:
what else ran); `benchmarks/results/demo_time.md` is generated from that file alone. Sessions measured before this
script existed were recovered from the hand-written report they appeared in, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

DATA = os.path.join(REPO, "benchmarks", "results", "demo_time.json")
REPORT = os.path.join(REPO, "benchmarks", "results", "demo_time.md")
DONE = re.compile(r"^\s+(?:(FT|FT-SAM) )?done in (\d+) s")
STAGES = (("[1/", "attack"), ("[+]", "retuning (P-ASR)"))  # an unlabelled 'done in' line belongs to the last header


def parse_output(text: str) -> dict:
    """The stage seconds ({attack, FT, FT-SAM, retuning (P-ASR)}) and the printed table ({row: [cells]}) of one run."""
    stages: Dict[str, int] = {}
    table: Dict[str, List[str]] = {}
    header, lines = None, text.splitlines()
    for k, line in enumerate(lines):
        header = next((name for prefix, name in STAGES if line.startswith(prefix)), header)
        m = DONE.match(line)
        if m:
            stages[m.group(1) or header or "?"] = int(m.group(2))
        if line.split()[:3] == ["defense", "ACC", "ASR"]:
            for row in lines[k + 1:k + 4]:
                table[row[:12].strip()] = row[12:].split()
    return {"stages": stages, "table": table}


def run_once(flags: Sequence[str], cache: str, out: str) -> dict:
    """One demo process: its times, load, stages and table."""
    cmd = [sys.executable, "-m", "ftsam_plugin", "demo", "--offline", "--out", out, "--progress", "False", *flags]
    env = dict(os.environ, XDG_CACHE_HOME=cache, PYTHONPATH=REPO)
    before, load0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"error: the demo exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}; "
                 f"run the command by hand to see why")
    return {"wall_s": round(wall, 1), "user_s": round(after.ru_utime - before.ru_utime, 1),
            "system_s": round(after.ru_stime - before.ru_stime, 1), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2), **parse_output(proc.stdout)}


def measure(args: argparse.Namespace) -> dict:
    flags = list(args.flags[1:] if args.flags[:1] == ["--"] else args.flags)
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo_time_") as tmp:
        for k in range(args.runs):
            runs.append(dict(run_once(flags, os.path.join(tmp, "cache"), os.path.join(tmp, "record")),
                             label=f"{k + 1}" + (" (empty cache)" if k == 0 else "")))
            print(f"run {k + 1}: {runs[-1]['wall_s']:.1f} s wall", flush=True)
    threads = int(flags[flags.index("--threads") + 1]) if "--threads" in flags else 1
    return {"source": "measured by benchmarks/demo_time.py", "command": " ".join(["ftsam demo --offline", *flags]),
            "when": datetime.now().isoformat(timespec="minutes"), "commit": git_commit(REPO),
            "machine": machine(threads), "machine_text": machine_short(threads) + " per process",
            "note": args.note, "runs": runs}


# ------------------------------------------------------------------------------------------------ report


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def session_lines(s: dict) -> List[str]:
    stages = ["attack", "FT", "FT-SAM", "retuning (P-ASR)"]
    has_sys = any(r.get("system_s") is not None for r in s["runs"])
    has_load = any(r.get("load_before") is not None for r in s["runs"])
    lines = [f"## `{s['command']}`", "",
             f"- When: {s['when']}; commit {s['commit']}; machine: {s['machine_text']}.",
             f"- Source: {s['source']}.", f"- Conditions: {s['note']}", "",
             "| run | wall | user CPU | " + ("system CPU | " if has_sys else "") + " | ".join(stages)
             + (" | load avg before / after" if has_load else "") + " |",
             "|---" * (3 + has_sys + len(stages) + has_load) + "|"]
    for r in s["runs"]:
        cells = [r["label"], minutes(r["wall_s"]), f"{r['user_s']:.1f} s"]
        cells += [f"{r['system_s']:.1f} s"] if has_sys else []
        cells += [f"{r['stages'][k]} s" if k in r["stages"] else "–" for k in stages]
        cells += [f"{r['load_before']:.2f} / {r['load_after']:.2f}"] if has_load else []
        lines.append("| " + " | ".join(cells) + " |")
    tables = [r["table"] for r in s["runs"]]
    same = all(t == tables[0] for t in tables)
    lines += ["", "What it printed" + ("" if len(tables) == 1 else " (every run the same)" if same else
                                       " (runs differ: each shown)") + ", percent:", ""]
    for t in (tables[:1] if same else tables):
        columns = s.get("columns", ["ACC", "ASR", "RA", "DER", "P-ASR", "time"])
        lines += ["| defense | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
        lines += [f"| {row} | " + " | ".join(cells) + " |" for row, cells in t.items()] + [""]
    return lines + ([s["reading"], ""] if s.get("reading") else [])


def write_report(data: dict, out: str) -> None:
    lines = ["# `ftsam demo`: how long it takes (issues 18, 27)", "",
             f"Generated by `benchmarks/demo_time.py --report_only` from [`demo_time.json`](demo_time.json). "
             "Numbers the demo prints differ between CPU types (and thread counts): each session names its "
             "machine. Wall time is the whole process; FT and FT-SAM run side by side on a 2-core machine, so the "
             "defense stage lasts as long as FT-SAM's.", ""]
    for s in data["sessions"]:
        lines += session_lines(s)
    lines += data.get("notes", [])
    with open(out + ".tmp", "w") as handle:
        handle.write("\n".join(lines).rstrip() + "\n")
    os.replace(out + ".tmp", out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (for the report)")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", default=REPORT)
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from the data file")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then `ftsam demo` flags")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    data = {"sessions": []}
    if os.path.isfile(args.data):
        with open(args.data) as handle:
            data = json.load(handle)
    if not args.report_only:
        data["sessions"].append(measure(args))
        with open(args.data + ".tmp", "w") as handle:
            json.dump(data, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
        os.replace(args.data + ".tmp", args.data)
    write_report(data, args.out)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
