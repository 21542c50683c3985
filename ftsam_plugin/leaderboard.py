"""`ftsam leaderboard`: one table per dataset x model of every attack record and defense result under record roots.

Discovery. Every folder holding `attack_result.pt` under the given roots is an attack record (BackdoorBench's and
`ftsam attack`'s, same format); every `<record>/defense/<name>/defense_result.pt` is a defense result (any name:
ours, `ft-baseline`/`ftsam`, and BackdoorBench's own, `ft`, `ft-sam`, `anp`, ...).

Metrics (fractions; tables show percent). For each model, in this order:
1. a summary file, unless `--source eval`: the `last` row (or `--summary_row valid_max`) of
   - the attack: `<record>/attack_df_summary.csv`;
   - a defense: `<defense dir>/<name>_df_summary.csv`, else any `*_df_summary.csv` in the folder or its `log/`
     (BackdoorBench's ft-sam writes `log/d-sam_df_summary.csv`);
   columns `test_acc`, `test_asr`, `test_ra` (BackdoorBench's). `last` is BackdoorBench's last non-missing value
   per column, i.e. the final evaluation. A summary lacking one of the three, or older than its result file by more
   than SUMMARY_MAX_AGE_S (the result was replaced after the run), is ignored; so are the summaries of a folder
   whose completion marker (`ftsam_run.json`, `ftsam_plugin.data.completion`) does not say that the result file
   and its summary are one finished run (a run killed while writing them, or a rerun still going).
2. the evaluation cache `<folder>/ftsam_eval.json`, if its key matches: the result file's size, mtime_ns and
   sha256, the attack record's size and mtime_ns and the `--dataset_path` override (`--no_cache` skips it);
3. an evaluation (ACC on clean_test; ASR and RA on bd_test; `ftsam_plugin.metrics.evaluate_backdoor`), written to
   the cache atomically. A record's datasets are loaded once and reused for all its models.

Retuning (`--retune`). Each cell also gets P-ASR, the ASR after the retuning attack of Min et al. (NeurIPS 2024;
`ftsam retune`, settings from `--retune_args`), and the ASR after its `poison_num` 0 control: read from the run's
`<result folder>/retune/<tag>/summary.json` when its key (result file, record, `--dataset_path`, settings) matches,
else the attack is run there (as `ftsam retune` would, evaluated after the last epoch only, the attack also
before it) and cached that way.

Time to purify. For each defense result with a per-epoch CSV beside its summary (`<name>_df.csv`, else any
`*_df.csv` in the folder or its `log/`, not older than the result as above): the first evaluated epoch from which
ASR stays <= 5% to the end of the run, and its cumulative training seconds where the CSV has them (ours do), next to
the run's total and final ACC; "never" otherwise (`ftsam_plugin.purify`). A table per dataset x model follows the
metrics table; leaderboard.csv has the same values in its `purify_*` and `total_*` columns. Provenance: where the
folder's completion marker lists the CSV, only that CSV, and only while the marker says the run finished and its
fingerprints of the result and the CSV match (`purify_checked` true); where it says otherwise, none (a warning names
the CSV). A CSV no marker covers (BackdoorBench's runs, ours from before the marker listed it) is marked † in the
tables and `purify_checked` false. A CSV with a repeated epoch or an ACC/ASR/RA outside [0, 1] is named and not used;
so is an evaluation cache or retune summary holding such values (the result is evaluated, the attack run, again).

Protocols. Under each table a line names how each column's runs ran: `ours, <protocol>` (`fixed` or
`backdoorbench`, from the run's summary) or `BackdoorBench's defense/<name>.py` (a folder without our completion
marker: BackdoorBench's own script wrote it). `ftsam` under `fixed` is not the reference `ft-sam`'s recipe;
`--protocol backdoorbench` runs that. leaderboard.csv has it in its `protocol` column.

Tables. Rows are attack records (name, plus the attack type from `info.pickle` when readable), then an average row
(mean of each column over the attacks, DER averaged per attack); columns are `no defense`, then the defenses.
DER = BackdoorBench's [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2 against the record's own
undefended model. Best values are marked (bold in Markdown/HTML, the `best` column in CSV): by default per row
among the defenses (the best defense for each attack and on average; `no defense` is not a candidate), with
`--best_axis column` per column among the attacks. Best = highest ACC, RA, DER and lowest ASR, P-ASR, control ASR.

Outputs in `--out`: leaderboard.md, leaderboard.csv (long format: one line per table cell, fractions at full
precision), leaderboard.html (self-contained: inline CSS, heatmaps embedded as data URIs) and per table
heatmap_<dataset>_<model>_{asr,der}.png (and _pasr.png with --retune).
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import html
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ftsam_plugin import metrics
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.data.completion import is_complete, read_marker
from ftsam_plugin.data.records import check_record_meta, find_defenses, load_defense_model
from ftsam_plugin.io import (atomic_write_bytes, atomic_write_text, file_fingerprint, make_output_folder,
                             remove_stale_temp_files, safe_load, write_csv)
from ftsam_plugin.lock import FolderLock
from ftsam_plugin.purify import TimeToPurify, history_problem, read_history, time_to_purify
from ftsam_plugin.settings import FRACTION, Number, Text, check_flags

__all__ = [
    "add_arguments",
    "run",
    "find_records",
    "find_defenses",
    "read_summary",
    "load_defense_model",
    "build_leaderboard",
    "Entry",
    "Table",
]

NO_DEFENSE = "no defense"
METRICS = ("acc", "asr", "ra", "der")
RETUNE_METRICS = ("pasr", "casr")  # with --retune: P-ASR after the retuning attack, ASR after its clean control
HIGHER_IS_BETTER = {"acc": True, "asr": False, "ra": True, "der": True, "pasr": False, "casr": False}
LABELS = {"pasr": "P-ASR", "casr": "control ASR"}
SUMMARY_COLUMNS = {"acc": "test_acc", "asr": "test_asr", "ra": "test_ra"}
CSV_COLUMNS = {"acc": "test_acc", "asr": "test_asr", "ra": "test_ra", "der": "der"}
RETUNE_CSV_COLUMNS = {"pasr": "p_asr", "casr": "control_asr"}
COLUMN_NAMES = {**CSV_COLUMNS, **RETUNE_CSV_COLUMNS}
CACHE_NAME = "ftsam_eval.json"
CACHE_VERSION = 1
SUMMARY_MAX_AGE_S = 3600  # a summary this much older than its result file belongs to an earlier run
STARTED = time.time()  # temp files older than this process are left over from killed runs
SKIP_DIRS = {"bd_train_dataset", "bd_test_dataset", "checkpoint", "log", "__pycache__"}


# ---------------------------------------------------------------------------------------------- discovery


def find_records(roots: Iterable[str]) -> List[str]:
    """Absolute paths of every folder holding `attack_result.pt` under `roots` (a root may be a record itself).
    Symlinked folders are followed (each real folder visited once, so a link cycle ends)."""
    found: Dict[str, str] = {}
    visited = set()
    for root in roots:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FtsamError(f"record root {root} is not a folder; pass record/ folders (e.g. ./record)")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            if "attack_result.pt" in filenames:
                found.setdefault(real, os.path.abspath(dirpath))
                dirnames[:] = []  # records are not nested; skips the bd_*_dataset image folders
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    return sorted(found.values())


def _attack_type(record_dir: str) -> Optional[str]:
    # info.pickle is BackdoorBench's torch.save(args.__dict__) (and ours): read it safely, never unpickle code
    path = os.path.join(record_dir, "info.pickle")
    if not os.path.isfile(path):
        return None
    try:
        info = safe_load(path, what="record info")
    except FtsamError:
        return None
    value = info.get("attack") if isinstance(info, dict) else None
    return str(value) if value else None


def read_summary(path: str, row: str = "last") -> Optional[Dict[str, float]]:
    """{acc, asr, ra} from row `row` of a BackdoorBench `*_df_summary.csv`; None if a value is missing."""
    try:
        with open(path, newline="") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):  # csv.Error: e.g. a field over csv's size limit
        return None
    if not lines:
        return None
    header = lines[0]
    for line in lines[1:]:
        if line and line[0] == row:
            values = dict(zip(header, line))
            out = {}
            for metric, column in SUMMARY_COLUMNS.items():
                try:
                    value = float(values.get(column, ""))
                except ValueError:
                    return None
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    return None
                out[metric] = value
            return out
    return None


def _summary_candidates(folder: str, name: str, only_named: bool = False,
                        suffix: str = "_df_summary.csv") -> List[str]:
    preferred = [os.path.join(folder, f"{name}{suffix}")]
    if only_named:
        return [p for p in preferred if os.path.isfile(p)]
    others = []
    for sub in (folder, os.path.join(folder, "log")):
        if os.path.isdir(sub):
            others += sorted(os.path.join(sub, f) for f in os.listdir(sub) if f.endswith(suffix))
    others.sort(key=lambda p: -os.path.getmtime(p))  # newest first
    return [p for p in preferred if os.path.isfile(p)] + [p for p in others if p not in preferred]


def _file_stem(folder: str, name: str) -> str:
    """The stem of a defense result's file names: its folder's name (BackdoorBench's layout), or, for a folder named
    otherwise (an `ftsam grid` cell: `ftsam_rho4_s0/` holds `ftsam_df_summary.csv`), the one its completion marker
    lists."""
    if os.path.isfile(os.path.join(folder, f"{name}_df_summary.csv")):
        return name
    files = (read_marker(folder) or {}).get("files")
    stems = [f[:-len("_df_summary.csv")] for f in files if f.endswith("_df_summary.csv")] if isinstance(files, dict) \
        else []
    return stems[0] if len(stems) == 1 else name


def _find_summary(folder: str, name: str, result_path: str, row: str, only_named: bool = False):
    result_mtime = os.path.getmtime(result_path)
    for path in _summary_candidates(folder, name, only_named):
        if os.path.getmtime(path) < result_mtime - SUMMARY_MAX_AGE_S:
            continue
        values = read_summary(path, row)
        if values is not None:
            return path, values
    return None, None


def _find_history(folder: str, name: str, result_path: str) -> Tuple[Optional[str], Optional[TimeToPurify], bool]:
    """(path, time to purify, checked) from the per-epoch CSV of the run that wrote `result_path`, else (None, None,
    False). Where the folder's completion marker lists `<name>_df.csv` (runs of this version), only that file, and
    only while the marker says the run finished and its fingerprints (result and CSV) still match: checked. A marker
    that does not say finished: none (the CSV is a rerun's, or half-written). Otherwise (no marker: BackdoorBench's
    defenses; a marker from before it listed the CSV) the freshest readable CSV as before, not checked. A CSV whose
    values are impossible (`purify.history_problem`) is named and not used."""
    marker = read_marker(folder)
    named = f"{name}_df.csv"
    listed = marker is not None and isinstance(marker.get("files"), dict) and named in marker["files"]
    if listed or (marker is not None and marker.get("state") != "complete"):
        path = os.path.join(folder, named)
        if not is_complete(folder, [os.path.basename(result_path), named]):
            print(f"warning: {path} is not the per-epoch CSV of the finished run that wrote "
                  f"{os.path.basename(result_path)} (the run did not finish, or a file changed since); time to purify "
                  f"not shown", file=sys.stderr)
            return None, None, False
        candidates = [path]
    else:
        result_mtime = os.path.getmtime(result_path)
        candidates = [p for p in _summary_candidates(folder, name, suffix="_df.csv")
                      if os.path.getmtime(p) >= result_mtime - SUMMARY_MAX_AGE_S]
    for path in candidates:
        try:
            rows = read_history(path)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        problem = history_problem(rows)
        if problem is not None:
            print(f"warning: {path}: {problem}; time to purify not shown", file=sys.stderr)
            continue
        purify = time_to_purify(rows)
        if purify.evaluated:
            return path, purify, listed
    return None, None, False


# ---------------------------------------------------------------------------------------------- cache


def _cache_key(result_path: str, record_dir: str, dataset_path: Optional[str]) -> dict:
    return {
        "version": CACHE_VERSION,
        "result": file_fingerprint(result_path),
        "attack_result": file_fingerprint(os.path.join(record_dir, "attack_result.pt"), with_hash=False),
        "dataset_path": os.path.abspath(dataset_path) if dataset_path else None,
    }


def _read_cache(folder: str, key: dict) -> Optional[Dict[str, float]]:
    """The cached {acc, asr, ra} when the key matches, else None; a matching cache holding anything but three
    fractions in [0, 1] is named in a warning and not used (the result is evaluated again)."""
    path = os.path.join(folder, CACHE_NAME)
    try:
        with open(path) as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    values = stored.get("metrics")
    bad = next((m for m in SUMMARY_COLUMNS if FRACTION.parse((values if isinstance(values, dict) else {}).get(m))
                is None), None)
    if bad is not None:
        got = values.get(bad) if isinstance(values, dict) else values
        print(f"warning: {path} is damaged ({bad} {got!r} is not a fraction in [0, 1]); not used, the result is "
              f"evaluated again", file=sys.stderr)
        return None
    return {m: float(values[m]) for m in SUMMARY_COLUMNS}


def _write_cache(folder: str, key: dict, values: Dict[str, float]) -> None:
    """Write the cache under the folder's lock (one writer per result folder: not while a defense or attack run,
    or another leaderboard, writes there); when that is not possible, say so and go on."""
    try:
        with FolderLock(folder, what="result folder"):
            remove_stale_temp_files(folder, before=STARTED)
            atomic_write_text(os.path.join(folder, CACHE_NAME), json.dumps({"key": key, "metrics": values}, indent=1))
    except FtsamError as exc:  # a read-only record or a folder in use still gets its table
        print(f"warning: cache not written: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class RecordInfo:
    path: str
    name: str
    dataset: str
    model: str
    attack: Optional[str]
    defenses: Dict[str, str]
    label: str = ""
    _loaded: Optional[dict] = field(default=None, repr=False)
    _error: Optional[str] = field(default=None, repr=False)


@dataclass
class Entry:
    """One table cell: a model (the attacked one, defense NO_DEFENSE, or a defense result) and its metrics."""

    record: RecordInfo
    defense: str
    result_path: str
    acc: Optional[float] = None
    asr: Optional[float] = None
    ra: Optional[float] = None
    der: Optional[float] = None
    pasr: Optional[float] = None
    casr: Optional[float] = None
    source: str = ""
    retune_source: str = ""
    purify: Optional[TimeToPurify] = None  # from the run's per-epoch CSV, when there is one
    purify_source: str = ""
    protocol: str = ""  # how the run ran (`run_protocol`); "" for `no defense`
    purify_checked: bool = False  # the CSV is the scored result's run's, by the completion marker's fingerprints

    def get(self, metric: str) -> Optional[float]:
        return getattr(self, metric)


def _record_info(path: str) -> RecordInfo:
    pt = os.path.join(path, "attack_result.pt")
    meta = check_record_meta(safe_load(pt, what="attack result"), pt)
    return RecordInfo(
        path=path,
        name=os.path.basename(path.rstrip(os.sep)),
        dataset=meta["clean_data"],
        model=meta["model_name"],
        attack=_attack_type(path),
        defenses=find_defenses(path),
    )


def _load_record(info: RecordInfo, opts) -> dict:
    if info._error is not None:
        raise FtsamError(info._error)
    if info._loaded is None:
        from ftsam_plugin.data.image_check import check_record_images
        from ftsam_plugin.data.records import load_attack_result

        try:
            info._loaded = load_attack_result(info.path, dataset_path=opts.dataset_path, device=opts.device)
            check_record_images(info._loaded)  # every image the evaluation reads, before it starts
        except FtsamError as exc:
            info._error = str(exc)
            raise
    return info._loaded


def _evaluate(entry: Entry, opts) -> Dict[str, float]:
    record = _load_record(entry.record, opts)
    if entry.defense == NO_DEFENSE:
        model = record["model"]
    else:
        model = load_defense_model(entry.result_path, record, opts.device)
    values = metrics.evaluate_backdoor(model, record["clean_test"], record["bd_test"], device=opts.device,
                                       batch_size=opts.batch_size, num_workers=opts.num_workers)
    return {m: float(values[m]) for m in SUMMARY_COLUMNS}


def _fill_metrics(entry: Entry, opts) -> None:
    folder = os.path.dirname(entry.result_path)
    values = None
    attack = entry.defense == NO_DEFENSE  # the record folder: only attack_df_summary.csv
    name = "attack" if attack else _file_stem(folder, entry.defense)
    finished = is_complete(folder, [os.path.basename(entry.result_path), f"{name}_df_summary.csv"])
    if finished is False:  # a run killed while writing its result, or files changed since: evaluate the file there
        print(f"warning: {entry.record.label}/{entry.defense}: the run in {folder} did not finish (or its files "
              f"changed since); its summary is not used, {os.path.basename(entry.result_path)} is evaluated",
              file=sys.stderr)
    if opts.source != "eval" and finished is not False:
        path, values = _find_summary(folder, name, entry.result_path, opts.summary_row, only_named=attack)
        if values is not None:
            entry.source = f"summary:{os.path.relpath(path, entry.record.path)}:{opts.summary_row}"
    if values is None:
        key = _cache_key(entry.result_path, entry.record.path, opts.dataset_path)
        if not opts.no_cache:
            values = _read_cache(folder, key)
            entry.source = "cache" if values is not None else ""
        if values is None:
            values = _evaluate(entry, opts)
            entry.source = "eval"
            _write_cache(folder, key, values)
    entry.acc, entry.asr, entry.ra = values["acc"], values["asr"], values["ra"]


def _fill_retune(entry: Entry, opts) -> None:
    """P-ASR and the control's ASR: the `retune/` summaries beside the result when their key matches, else the
    attack is run (written there like `ftsam retune`, evaluated after the last epoch, the attack also before)."""
    from ftsam_plugin.retune import runs

    defense = runs.NO_DEFENSE if entry.defense == NO_DEFENSE else entry.defense
    sources = []
    for metric, settings in (("pasr", opts.retune_settings), ("casr", opts.retune_settings.control())):
        summary = None
        if not opts.no_cache:
            summary = runs.find_summary(entry.result_path, entry.record.path, settings, opts.dataset_path)
        sources.append("summary" if summary is not None else "run")
        if summary is None:
            record = _load_record(entry.record, opts)
            print(f"retuning {entry.record.label} / {entry.defense} ({settings.tag})", file=sys.stderr)
            model = runs.load_result_model(entry.result_path, record, opts.device)
            summary = runs.retune_and_save(model, record, entry.result_path, settings, defense, opts.dataset_path,
                                           opts.device, eval_every=settings.epochs, eval_batch_size=opts.batch_size,
                                           num_workers=opts.num_workers, evaluate_before=metric == "pasr")
        setattr(entry, metric, float(summary["after"]["asr"]))
    entry.retune_source = ";".join(sources)


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One dataset x model table: rows[i] is a record, cells[(label, defense)] an Entry."""

    dataset: str
    model: str
    rows: List[RecordInfo]
    defenses: List[str]  # NO_DEFENSE first
    cells: Dict[Tuple[str, str], Entry]
    metrics: Tuple[str, ...] = METRICS  # plus RETUNE_METRICS with --retune
    average: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)  # defense -> metric -> mean
    best: Dict[Tuple[str, str], set] = field(default_factory=dict)  # (row label or AVERAGE, defense) -> metrics

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.dataset}_{self.model}")

    def value(self, label: str, defense: str, metric: str) -> Optional[float]:
        if label == AVERAGE:
            return self.average.get(defense, {}).get(metric)
        entry = self.cells.get((label, defense))
        return entry.get(metric) if entry is not None else None


AVERAGE = "average"


def _patterns(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [p.strip().lower() for v in values for p in v.split(",") if p.strip()]


def _matches(patterns: Optional[List[str]], *names: Optional[str]) -> bool:
    if patterns is None:
        return True
    return any(n is not None and fnmatch.fnmatchcase(n.lower(), p) for p in patterns for n in names)


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _sort_key(spec: str, table: Table):
    if spec in ("name", "record"):
        return lambda r: r.label.lower(), False
    if spec == "attack":
        return lambda r: ((r.attack or "").lower(), r.label.lower()), False
    metric, _, defense = spec.partition(":")
    if metric not in table.metrics:
        raise FtsamError(f"--sort {spec!r}: use name, attack or <metric>[:<defense>] with metric in {table.metrics}"
                         + (" (pasr/casr need --retune)" if metric in RETUNE_METRICS else ""))
    if defense and defense not in table.defenses:
        raise FtsamError(f"--sort {spec!r}: no defense {defense!r} in the table; choose one of {table.defenses}")

    def key(r):
        if defense:
            v = table.value(r.label, defense, metric)
        elif metric == "der":
            v = _mean(table.value(r.label, d, "der") for d in table.defenses[1:])
        else:
            v = table.value(r.label, NO_DEFENSE, metric)
        missing = v is None
        v = 0.0 if missing else (v if HIGHER_IS_BETTER[metric] else -v)
        return (missing, -v, r.label.lower())

    return key, False


def _mark_best(table: Table, axis: str) -> None:
    table.best = {}
    labels = [r.label for r in table.rows] + [AVERAGE]
    for metric in table.metrics:
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        if axis == "row":
            groups = [[(label, d) for d in table.defenses[1:]] for label in labels]
        else:
            groups = [[(r.label, d) for r in table.rows] for d in table.defenses]
        for group in groups:
            scored = [(cell, table.value(cell[0], cell[1], metric)) for cell in group]
            scored = [(cell, v) for cell, v in scored if v is not None]
            if not scored:
                continue
            top = max(sign * v for _, v in scored)
            for cell, v in scored:
                if sign * v >= top - 1e-12:
                    table.best.setdefault(cell, set()).add(metric)


def build_leaderboard(roots: Sequence[str], opts) -> List[Table]:
    """Discover, filter and evaluate; returns the tables (sorted by dataset, model). See the module docstring."""
    datasets, models = _patterns(opts.dataset), _patterns(opts.model)
    attacks, defenses = _patterns(opts.attack), _patterns(opts.defense)
    records = find_records(roots)
    if not records:
        raise FtsamError(f"no attack_result.pt under {list(roots)}; pass record/ folders holding attack records")
    infos = []
    for path in records:
        try:
            info = _record_info(path)
        except FtsamError as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        if _matches(datasets, info.dataset) and _matches(models, info.model) and _matches(attacks, info.name,
                                                                                            info.attack):
            info.defenses = {n: p for n, p in info.defenses.items() if _matches(defenses, n)}
            infos.append(info)
    if not infos:
        raise FtsamError(f"none of the {len(records)} attack records under {list(roots)} match the filters; "
                         f"check --dataset/--model/--attack")
    groups: Dict[Tuple[str, str], List[RecordInfo]] = {}
    for info in infos:
        groups.setdefault((info.dataset, info.model), []).append(info)
    tables = []
    for (dataset, model), rows in sorted(groups.items()):
        _label_rows(rows)
        names = sorted({n for r in rows for n in r.defenses})
        table = Table(dataset, model, rows, [NO_DEFENSE, *names], {}, metrics=table_metrics(opts))
        for r in rows:
            cells = [Entry(r, NO_DEFENSE, os.path.join(r.path, "attack_result.pt"))]
            cells += [Entry(r, n, p) for n, p in r.defenses.items()]
            for entry in cells:
                try:
                    _fill_metrics(entry, opts)
                except FtsamError as exc:
                    entry.source = "error"
                    print(f"warning: {r.label}/{entry.defense}: {exc}", file=sys.stderr)
                if getattr(opts, "retune", False):
                    try:
                        _fill_retune(entry, opts)
                    except FtsamError as exc:
                        entry.retune_source = "error"
                        print(f"warning: {r.label}/{entry.defense}: retune: {exc}", file=sys.stderr)
                if entry.defense != NO_DEFENSE:
                    where = os.path.dirname(entry.result_path)
                    path, entry.purify, entry.purify_checked = _find_history(
                        where, _file_stem(where, entry.defense), entry.result_path)
                    entry.purify_source = os.path.relpath(path, r.path) if path else ""
                if entry.defense != NO_DEFENSE:
                    entry.protocol = run_protocol(os.path.dirname(entry.result_path))
                table.cells[(r.label, entry.defense)] = entry
            base = table.cells[(r.label, NO_DEFENSE)]
            for entry in cells[1:]:
                if None not in (base.acc, base.asr, entry.acc, entry.asr):
                    entry.der = metrics.der(base.acc, entry.acc, base.asr, entry.asr)
            r._loaded = None  # free the datasets and models of this record
        table.average = {d: {m: _mean(table.value(r.label, d, m) for r in rows) for m in table.metrics}
                         for d in table.defenses}
        key, reverse = _sort_key(opts.sort, table)
        table.rows.sort(key=key, reverse=reverse ^ bool(opts.reverse))
        _mark_best(table, opts.best_axis)
        tables.append(table)
    return tables


def run_protocol(folder: str) -> str:
    """How the run in the defense folder `folder` ran: 'ours, <protocol>' for a run of this package (its completion
    marker lists a summary, whose `protocol` column names it; 'ours, protocol not recorded' for older runs), else
    "BackdoorBench's defense/<folder name>.py" (no marker: BackdoorBench's own script wrote it)."""
    marker = read_marker(folder)
    if marker is None:
        return f"BackdoorBench's defense/{os.path.basename(folder.rstrip(os.sep))}.py"
    files = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    for name in (f for f in files if f.endswith("_df_summary.csv")):
        try:
            rows = read_history(os.path.join(folder, name))  # its first row: `last`
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        value = str(rows[0].get("protocol") or "").strip() if rows else ""
        if value:
            return f"ours, {value}"
    return "ours, protocol not recorded"


PROTOCOL_HEAD = ("Protocols (like-for-like with BackdoorBench's ft-sam / ft: ours with --protocol backdoorbench; "
                 "`fixed` is our own recipe)")


def protocol_line(table: Table, name) -> str:
    """'Protocols (...): `ftsam`: ours, fixed; `ft-sam`: BackdoorBench's defense/ft-sam.py' for the table's defense
    columns (a column whose runs differ lists each); `name(defense)` formats a column's name."""
    parts = []
    for d in table.defenses[1:]:
        cells = (table.cells.get((r.label, d)) for r in table.rows)
        seen = dict.fromkeys(c.protocol for c in cells if c is not None and c.protocol)
        if seen:
            parts.append(f"{name(d)}: {' / '.join(seen)}")
    return f"{PROTOCOL_HEAD}: " + "; ".join(parts) if parts else ""


def _label_rows(rows: List[RecordInfo]) -> None:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r.name] = counts.get(r.name, 0) + 1
    base = os.path.commonpath([os.path.dirname(r.path) for r in rows]) if len(rows) > 1 else ""
    for r in rows:
        r.label = r.name if counts[r.name] == 1 or not base else os.path.relpath(r.path, base)


# ---------------------------------------------------------------------------------------------- rendering


def table_metrics(opts) -> Tuple[str, ...]:
    """The metrics every table holds: METRICS, plus RETUNE_METRICS with --retune."""
    return METRICS + RETUNE_METRICS if getattr(opts, "retune", False) else METRICS


def _metrics_shown(opts) -> List[str]:
    return list(table_metrics(opts)) if opts.metric == "all" else [opts.metric]


def printable(text: str) -> str:
    """`text` safe to print and to write as UTF-8: the bytes of a folder name that is not UTF-8 (which Python keeps
    as surrogate escapes) become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def plain_label(text: str) -> str:
    """`printable(text)` for a figure: every `$` escaped, so matplotlib never parses a name as mathtext."""
    return printable(text).replace("$", r"\$")


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100.0 * value:.2f}"


def _cell_parts(table: Table, label: str, defense: str, shown: List[str]):
    """[(metric, text, is_best)] for the metrics shown in one cell (no DER under `no defense`)."""
    best = table.best.get((label, defense), set())
    return [(m, _pct(table.value(label, defense, m)), m in best)
            for m in shown if not (m == "der" and defense == NO_DEFENSE)]


def _cell_text(parts, bold) -> str:
    if all(t == "—" for _, t, _ in parts):
        return "—"
    texts = {m: bold(t) if b else t for m, t, b in parts}
    main = " / ".join(texts[m] for m in ("acc", "asr", "ra") if m in texts)
    if "der" in texts:
        main = f"{main} ({texts['der']})" if main else texts["der"]
    retuned = " / ".join(texts[m] for m in RETUNE_METRICS if m in texts)
    if retuned:
        main = f"{main} → {retuned}" if main else retuned
    return main


def _legend(shown: List[str]) -> str:
    names = [m.upper() for m in shown if m not in ("der", *RETUNE_METRICS)]
    text = " / ".join(names)
    if "der" in shown:
        text = f"{text} (DER)" if text else "DER"
    retuned = " / ".join(LABELS[m] for m in RETUNE_METRICS if m in shown)
    if retuned:
        text = f"{text} → {retuned} after the retuning attack" if text else f"{retuned} after the retuning attack"
    return f"cells: {text}, percent"


def _best_rule(shown: List[str]) -> str:
    lowest = "lowest ASR/P-ASR/control ASR" if any(m in shown for m in RETUNE_METRICS) else "lowest ASR"
    return f"highest ACC/RA/DER, {lowest}"


def _table_rows(table: Table):
    for r in table.rows:
        yield r.label, r.attack or ""
    yield AVERAGE, ""


def render_markdown(tables: List[Table], opts) -> str:
    shown = _metrics_shown(opts)
    lines = ["# Backdoor defense leaderboard", "",
             f"{_legend(shown)}; DER against the undefended model; best per {opts.best_axis} in bold "
             f"({_best_rule(shown)}); summary row `{opts.summary_row}` where a summary exists.", ""]
    for table in tables:
        lines += [f"## {table.dataset} / {table.model}", ""]
        lines.append("| record | attack | " + " | ".join(table.defenses) + " |")
        lines.append("|---|---|" + "---|" * len(table.defenses))
        for label, attack in _table_rows(table):
            cells = [_cell_text(_cell_parts(table, label, d, shown), lambda t: f"**{t}**") for d in table.defenses]
            name = f"**{label}**" if label == AVERAGE else label.replace("|", "\\|")
            lines.append(f"| {name} | {attack} | " + " | ".join(cells) + " |")
        lines += [protocol_line(table, lambda d: f"`{d}`"), ""]
        purify = _purify_rows(table)
        if purify:
            lines += ["### Time to purify", "", PURIFY_NOTE[0].upper() + PURIFY_NOTE[1:] + ".", "",
                      "| " + " | ".join(PURIFY_HEADER) + " |",
                      "|---" * len(PURIFY_HEADER) + "|"]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in purify] + [""]
            if _has_unchecked(table):
                lines += [UNCHECKED_NOTE, ""]
    return "\n".join(lines)


PURIFY_HEADER = ("record", "defense", "purified at", "of the run", "final ACC", "final ASR", "ASR evaluated every")
PURIFY_NOTE = ("first evaluated epoch from which ASR stays ≤ 5% to the end of the run (training seconds, where the "
               "run recorded them), from the run's per-epoch CSV")
UNCHECKED = "†"
UNCHECKED_NOTE = (f"{UNCHECKED} from a per-epoch CSV not covered by the run's completion marker (BackdoorBench's own "
                  f"defenses, or ours from before the marker listed it): it may come from another run than the result")


def _purify_entries(table: Table):
    """(record label, defense, entry) of each cell with a time to purify, in the table's row and defense order."""
    for r in table.rows:
        for d in table.defenses[1:]:
            entry = table.cells.get((r.label, d))
            if entry is not None and entry.purify is not None:
                yield r.label, d, entry


def _has_unchecked(table: Table) -> bool:
    return any(not entry.purify_checked for _, _, entry in _purify_entries(table))


def _purify_rows(table: Table) -> List[List[str]]:
    """One row of text per cell with a time to purify, in the table's row and defense order (UNCHECKED marks a CSV
    the run's marker does not cover)."""
    rows = []
    for label, d, entry in _purify_entries(table):
        p = entry.purify
        rows.append([label, d, p.when() + ("" if entry.purify_checked else f" {UNCHECKED}"), p.total(),
                     _pct(p.final_acc), _pct(p.final_asr), f"{p.eval_every} epoch(s)"])
    return rows


def csv_rows(tables: List[Table]) -> List[dict]:
    """Long format: one row per (table, record or average, defense); metrics as fractions."""
    rows = []
    for table in tables:
        for label, attack in _table_rows(table):
            for d in table.defenses:
                entry = table.cells.get((label, d))
                row = {"dataset": table.dataset, "model": table.model, "record": label, "attack": attack, "defense": d}
                for m in table.metrics:
                    v = table.value(label, d, m)
                    row[COLUMN_NAMES[m]] = "" if v is None else repr(v)
                row["best"] = ";".join(m for m in table.metrics if m in table.best.get((label, d), set()))
                row["source"] = entry.source if entry is not None else ("mean" if label == AVERAGE else "missing")
                row["protocol"] = entry.protocol if entry is not None else ""
                if RETUNE_METRICS[0] in table.metrics:
                    row["retune_source"] = entry.retune_source if entry is not None else row["source"]
                row.update(_purify_columns(entry))
                rows.append(row)
    return rows


PURIFY_COLUMNS = ("purify_epoch", "purify_train_time_s", "total_epochs", "total_train_time_s", "purify_eval_every",
                  "purify_checked")


def _purify_columns(entry: Optional[Entry]) -> dict:
    """leaderboard.csv's time-to-purify columns: numbers, 'never', or empty where unknown; purify_checked 'true'
    where the run's completion marker vouches for the CSV, 'false' where nothing does."""
    p = entry.purify if entry is not None else None
    if p is None:
        return dict.fromkeys(PURIFY_COLUMNS, "")
    text = lambda v: "" if v is None else repr(v)  # noqa: E731
    return {"purify_epoch": str(p.epoch) if p.purified else "never",
            "purify_train_time_s": text(p.train_s) if p.purified else ("never" if p.total_train_s is not None else ""),
            "total_epochs": str(p.epochs), "total_train_time_s": text(p.total_train_s),
            "purify_eval_every": text(p.eval_every), "purify_checked": str(entry.purify_checked).lower()}


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;
white-space:nowrap}th{background:#f0f0f0}td.name{text-align:left}tr.avg td{background:#fafafa;font-style:italic}
b{color:#0a5}img{max-width:48%;margin-right:1%}.note{color:#555}"""


def render_html(tables: List[Table], opts, images: Dict[str, List[Tuple[str, bytes]]]) -> str:
    shown = _metrics_shown(opts)
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>Backdoor defense leaderboard</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>Backdoor defense leaderboard</h1>",
             f"<p class='note'>{esc(_legend(shown))}; DER against the undefended model; best per "
             f"{esc(opts.best_axis)} in bold ({esc(_best_rule(shown))}); summary row "
             f"<code>{esc(opts.summary_row)}</code> where a summary exists.</p>"]
    for table in tables:
        parts.append(f"<h2>{esc(table.dataset)} / {esc(table.model)}</h2><table><tr><th>record</th><th>attack</th>"
                     + "".join(f"<th>{esc(d)}</th>" for d in table.defenses) + "</tr>")
        for label, attack in _table_rows(table):
            cls = " class='avg'" if label == AVERAGE else ""
            cells = "".join(
                f"<td>{_cell_text(_cell_parts(table, label, d, shown), lambda t: f'<b>{t}</b>')}</td>"
                for d in table.defenses)
            parts.append(f"<tr{cls}><td class='name'>{esc(label)}</td><td class='name'>{esc(attack)}</td>"
                         f"{cells}</tr>")
        parts.append(f"</table><p class='note'>{esc(protocol_line(table, str))}</p>")
        purify = _purify_rows(table)
        if purify:
            parts.append(f"<h3>Time to purify</h3><p class='note'>{esc(PURIFY_NOTE)}</p><table><tr>"
                         + "".join(f"<th>{esc(h)}</th>" for h in PURIFY_HEADER) + "</tr>")
            parts += ["<tr>" + "".join(f"<td class='name'>{esc(c)}</td>" if i < 2 else f"<td>{esc(c)}</td>"
                                       for i, c in enumerate(row)) + "</tr>" for row in purify]
            parts.append("</table>")
            if _has_unchecked(table):
                parts.append(f"<p class='note'>{esc(UNCHECKED_NOTE)}</p>")
        for title, png in images.get(table.slug, []):
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_heatmap(table: Table, metric: str) -> Optional[bytes]:
    """PNG bytes of a metric heatmap (rows: records + average; columns: defenses), or None if no value."""
    import numpy as np
    from matplotlib.figure import Figure

    defenses = table.defenses[1:] if metric == "der" else table.defenses
    labels = [label for label, _ in _table_rows(table)]
    if not defenses:
        return None
    grid = np.array([[np.nan if (v := table.value(label, d, metric)) is None else 100.0 * v for d in defenses]
                     for label in labels])
    if np.isnan(grid).all():
        return None
    fig = Figure(figsize=(1.4 + 1.2 * len(defenses), 1.0 + 0.45 * len(labels)), layout="constrained")
    ax = fig.subplots()
    cmap = "RdYlGn" if HIGHER_IS_BETTER[metric] else "RdYlGn_r"
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(defenses)), [plain_label(d) for d in defenses], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), [plain_label(label) for label in labels])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_title(plain_label(f"{LABELS.get(metric, metric.upper())} (%): {table.dataset} / {table.model}"))
    fig.colorbar(image, ax=ax)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_outputs(tables: List[Table], opts) -> Dict[str, str]:
    """Write leaderboard.md/.csv/.html and the heatmaps to `opts.out`; returns {kind: path}."""
    out = os.path.abspath(opts.out)
    paths = {"markdown": os.path.join(out, "leaderboard.md"), "csv": os.path.join(out, "leaderboard.csv"),
             "html": os.path.join(out, "leaderboard.html")}
    images: Dict[str, List[Tuple[str, bytes]]] = {}
    heatmaps = ("asr", "der", "pasr") if getattr(opts, "retune", False) else ("asr", "der")
    for table in tables:
        for metric in heatmaps:
            png = render_heatmap(table, metric)
            if png is None:
                continue
            path = os.path.join(out, f"heatmap_{table.slug}_{metric}.png")
            atomic_write_bytes(path, png)
            paths[f"heatmap_{table.slug}_{metric}"] = path
            images.setdefault(table.slug, []).append((f"{metric} heatmap", png))
    atomic_write_text(paths["markdown"], printable(render_markdown(tables, opts)))
    metrics = table_metrics(opts)
    columns = ["dataset", "model", "record", "attack", "defense", *(COLUMN_NAMES[m] for m in metrics), "best",
               "source", "protocol", *(["retune_source"] if RETUNE_METRICS[0] in metrics else []), *PURIFY_COLUMNS]
    write_csv(paths["csv"], [{k: printable(v) if isinstance(v, str) else v for k, v in row.items()}
                                   for row in csv_rows(tables)], columns=columns)
    atomic_write_text(paths["html"], printable(render_html(tables, opts, images)))
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("roots", nargs="+", help="record/ folders (searched recursively for attack_result.pt)")
    parser.add_argument("--out", default="leaderboard", help="output folder (default ./leaderboard)")
    parser.add_argument("--metric", choices=[*METRICS, *RETUNE_METRICS, "all"], default="all",
                        help="what the cells show (pasr, casr: with --retune)")
    parser.add_argument("--sort", default="name",
                        help="row order: name (default), attack, or <metric>[:<defense>], best first; without a "
                             "defense acc/asr/ra sort by the undefended model, der by the mean DER of the row")
    parser.add_argument("--reverse", action="store_true", help="reverse the row order")
    for flag, what in (("dataset", "datasets"), ("model", "models"), ("attack", "record names or attack types"),
                       ("defense", "defense names")):
        parser.add_argument(f"--{flag}", action="append", metavar="GLOB",
                            help=f"keep only these {what} (glob, case-insensitive; repeat or comma-separate)")
    parser.add_argument("--best_axis", choices=["row", "column"], default="row",
                        help="mark the best defense per attack row (default) or the best attack per column")
    parser.add_argument("--source", choices=["auto", "eval"], default="auto",
                        help="auto: summary CSVs where present, else evaluate; eval: always evaluate")
    parser.add_argument("--summary_row", choices=["last", "valid_max"], default="last",
                        help="row of *_df_summary.csv to read (default last: the final evaluation)")
    parser.add_argument("--no_cache", action="store_true",
                        help="ignore ftsam_eval.json caches and retune/ summaries (they are rewritten)")
    parser.add_argument("--retune", action="store_true",
                        help="add P-ASR (the retuning attack, `ftsam retune`) and the ASR after its poison_num 0 "
                             "control to every cell: read from <result folder>/retune/<tag>/summary.json, run where "
                             "missing")
    parser.add_argument("--retune_args", default="", metavar="FLAGS",
                        help="the retuning attack's settings as `ftsam retune` flags, e.g. '--poison_num 10 "
                             "--random_seed 1' (default: the reference's)")
    parser.add_argument("--dataset_path", default=None, help="dataset folder override passed to load_attack_result")
    parser.add_argument("--device", default=None, help="evaluation device (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--num_workers", type=int, default=0, help="evaluation data-loader workers")
    return parser


def _resolve_device(device: Optional[str]) -> str:
    """The evaluation device: `device` checked (FtsamError naming the fix), else cuda if available, else cpu."""
    import torch

    from ftsam_plugin.defense.ddp import resolve_device

    return str(resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


# every numeric and path flag, checked (with --device) before anything is read or written
FLAG_RULES = {"batch_size": Number(integer=True, low=1), "num_workers": Number(integer=True, low=0),
              "out": Text(), "dataset_path": Text()}


def run(args: argparse.Namespace) -> int:
    check_flags(args, FLAG_RULES)
    args.device = _resolve_device(args.device)
    metrics = table_metrics(args)
    metric = args.sort.partition(":")[0]
    if args.sort not in ("name", "record", "attack") and metric not in metrics:
        raise FtsamError(f"--sort {args.sort!r}: use name, attack or <metric>[:<defense>] with metric in {metrics}"
                         + (" (pasr/casr need --retune)" if metric in RETUNE_METRICS else ""))
    if args.metric not in (*metrics, "all"):
        raise FtsamError(f"--metric {args.metric} needs --retune")
    if args.retune:
        from ftsam_plugin.retune.settings import parse_settings

        args.retune_settings = parse_settings(args.retune_args)
    elif args.retune_args:
        raise FtsamError("--retune_args without --retune; add --retune")
    out = os.path.abspath(args.out)
    lock = FolderLock(out, what="leaderboard folder")
    lock.check()  # another leaderboard writing there: fail before evaluating anything
    tables = build_leaderboard(args.roots, args)
    make_output_folder(out)
    with lock:  # every file of one run, or none: two leaderboards never interleave their files
        remove_stale_temp_files(out, before=STARTED)
        paths = write_outputs(tables, args)
    print(printable(render_markdown(tables, args)))
    for kind, path in paths.items():
        print(f"wrote {path}")
    return 0
