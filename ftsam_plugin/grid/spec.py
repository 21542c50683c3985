"""The grid file: records x defenses (with their `ftsam defend` settings) x seeds, checked and expanded into cells.

    records: [record/badnet_*, record/blended_0_1]   # folders holding attack_result.pt (globs), or {alias: path}
    seeds: [0, 1, 2]                                  # each cell's --random_seed (default [0])
    common: {dataset_path: ../data, device: cpu}      # `ftsam defend` flags of every cell (an entry's own win)
    defenses:
      - defense: ftsam                                # an entry: a defense and its flags; a list expands
        rho: [2, 4]
        epochs: 20
      - defense: ft-baseline
        epochs: [20, 100]
        seeds: [0]                                    # an entry may narrow the grid's seeds, and records by name
        name: "ft_e{epochs}"                          # its cells' folder names ({flag} fields; default below)
        group: baseline                               # a label shown by --status and kept in each cell's summary
    executor: {executor: slurm, partition: gpu, time: 240, gpus_per_task: 1}   # defaults of `ftsam grid` flags

Every key of an entry but `defense`, `name`, `group`, `records`, `seeds` is an `ftsam defend` flag without `--`,
with the value it takes on the command line (a flag that takes a list, e.g. `steplr_milestones`, is written as
text: "50,75"). Relative paths are relative to the grid file's folder. Cells are ordered by entry, then seed, then
record, then the product of the entry's lists in the order written. A cell's folder is
`<record>/defense/<name>_s<seed>`; the default name is the defense and each of the entry's flags with its value
(`ftsam_rho4_epochs20`), so several settings of one defense sit side by side.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import Number, quote, read_yaml

from .cells import Cell

__all__ = ["GridSpec", "load_grid", "TOP_KEYS", "ENTRY_KEYS", "GRID_DECIDES"]

TOP_KEYS = ("records", "seeds", "common", "defenses", "executor")
ENTRY_KEYS = ("defense", "name", "group", "records", "seeds")  # the rest of an entry are `ftsam defend` flags
GRID_DECIDES = {  # flags each cell gets from the grid, never from the file
    "result_file": "list the records under `records`",
    "random_seed": "list the seeds under `seeds`",
    "resume": "the grid resumes an unfinished cell by itself",
    "force": "the grid never starts a cell over; move its folder away to redo it",
    "checkpoint_save": "each cell keeps its checkpoint in its own folder",
    "log": "each cell keeps its log in its own folder",
}
PATH_FLAGS = ("dataset_path", "index")  # always paths; yaml_path and checkpoint_path only when they name a file here
NAME_CHARS = re.compile(r"[^A-Za-z0-9.+-]+")  # what a value may show in a folder name
FOLDER_CHARS = re.compile(r"[^A-Za-z0-9._+-]")
MAX_NAME = 100
SEED = Number(integer=True, low=0, high=2 ** 32 - 1)


@dataclass
class GridSpec:
    """A checked grid file: its cells in order, and the defaults it gives the executor flags."""

    path: str
    cells: List[Cell]
    executor: Dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad value becomes the caller's one-line error, never argparse's exit
        raise FtsamError(message)


def defend_parser() -> argparse.ArgumentParser:
    """`ftsam defend`'s own parser: the grid checks every cell's flags with it."""
    from ftsam_plugin.defense.cli import add_arguments

    return add_arguments(_Parser(prog="ftsam defend", add_help=False))


def load_grid(path: str, need_records: bool = True) -> GridSpec:
    """Read, check and expand the grid file at `path`; FtsamError (one line) on anything wrong.

    Args:
        path: the grid YAML.
        need_records: False to expand a grid whose records are not made yet (a path that matches nothing is taken
            as written), e.g. to list a study's plan.
    Returns:
        GridSpec with every cell (duplicates, i.e. the same record, folder and settings twice, kept once).
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FtsamError(f"grid file {path} does not exist; pass the grid's YAML file")
    data = read_yaml(path, option="grid file")
    where = os.path.basename(path)
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise FtsamError(f"{where}: unknown key {quote(unknown[0])}{_close(unknown[0], TOP_KEYS)}; the keys are "
                         f"{', '.join(TOP_KEYS)}")
    base = os.path.dirname(path)
    records = _records(data.get("records"), base, where, need_records)
    seeds = _seeds(data.get("seeds", [0]), f"{where}: seeds")
    parser = defend_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    common = _flags(data.get("common") or {}, flags, f"{where}: common", base, lists=False)
    entries = data.get("defenses")
    if not isinstance(entries, list) or not entries:
        raise FtsamError(f"{where}: `defenses` must be a list of entries like `- defense: ftsam`; add one")
    cells: List[Cell] = []
    seen: Dict[Tuple[str, str], Tuple[Cell, str]] = {}
    for k, entry in enumerate(entries):
        what = f"{where}: defenses[{k}]"
        for cell in _expand(entry, what, records, seeds, common, flags, base, parser):
            key = (cell.record, cell.folder_name)
            if key in seen:
                if seen[key][0].settings_digest != cell.settings_digest:
                    raise FtsamError(f"{what} and {seen[key][1]} both name the folder {cell.label} with other "
                                     f"settings; give one of them its own `name`")
                continue
            seen[key] = (cell, what)
            cells.append(cell)
    executor = data.get("executor") or {}
    if not isinstance(executor, dict):
        raise FtsamError(f"{where}: `executor` must be a mapping of `ftsam grid` flags, e.g. {{executor: slurm}}")
    return GridSpec(path=path, cells=cells, executor=dict(executor))


# ---------------------------------------------------------------------------------------------- parts


def _records(value, base: str, where: str, need_records: bool = True) -> Dict[str, str]:
    """{name: absolute record folder} in the order given; globs expand in sorted order."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list) and value:
        items = [(None, v) for v in value]
    else:
        raise FtsamError(f"{where}: `records` must list record folders (paths or globs) or map names to them; "
                         f"add it")
    out: Dict[str, str] = {}
    for alias, pattern in items:
        if not isinstance(pattern, str) or not pattern:
            raise FtsamError(f"{where}: records: {quote(pattern)} is not a path; write the record folder as text")
        full = os.path.join(base, os.path.expanduser(pattern))
        found = [p for p in sorted(glob.glob(full)) if os.path.isfile(os.path.join(p, "attack_result.pt"))]
        if not found and not need_records:
            found = [os.path.normpath(full)]
        if not found:
            raise FtsamError(f"{where}: records: {quote(pattern)} matches no record folder (one holding "
                             f"attack_result.pt, relative to {base}); fix the path or make the record first")
        if alias is not None and len(found) > 1:
            raise FtsamError(f"{where}: records: {alias} names one record, but {quote(pattern)} matches "
                             f"{len(found)}; list them without a name")
        for folder in found:
            name = alias or os.path.basename(os.path.normpath(folder))
            folder = os.path.abspath(folder)
            if out.get(name, folder) != folder:
                raise FtsamError(f"{where}: records: two records are called {name}; name them in a mapping "
                                 f"{{name: path}}")
            out[name] = folder
    return out


def _seeds(value, what: str) -> List[int]:
    values = value if isinstance(value, list) else [value]
    parsed = [SEED.parse(v) for v in values]
    if not values or None in parsed:
        raise FtsamError(f"{what} must be seeds in 0..2^32-1 (one or a list), got {quote(value)}; fix it")
    return list(dict.fromkeys(parsed))


def _close(key: str, choices) -> str:
    near = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def _flags(values, flags: Dict[str, argparse.Action], what: str, base: str, lists: bool) -> Dict[str, Any]:
    """{flag: value or [values]} checked against `ftsam defend`'s flags; relative paths resolved against `base`."""
    if not isinstance(values, dict):
        raise FtsamError(f"{what} must be a mapping of `ftsam defend` flags (without --); fix it")
    out = {}
    for key, value in values.items():
        key = str(key).lstrip("-")
        if key in GRID_DECIDES:
            raise FtsamError(f"{what}: {key} is set by the grid ({GRID_DECIDES[key]}); remove it")
        if key not in flags or key == "defense":
            raise FtsamError(f"{what}: {quote(key)} is not an `ftsam defend` flag{_close(key, flags)}; see "
                             f"`ftsam defend --help`")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and (not lists or not value):
            raise FtsamError(f"{what}: {key}: " + ("a list expands only inside a `defenses` entry; give one value"
                                                    if not lists else "an empty list expands to no cell; give a value"))
        for item in items:
            if item is None or isinstance(item, (dict, list)):
                raise FtsamError(f"{what}: {key} must be a value (text, number or true/false), got {quote(item)}; "
                                 f"write a list of values to expand it, or a list-valued flag as text like '50,75'")
        items = [_resolve(key, item, base) for item in items]
        out[key] = items if isinstance(value, list) else items[0]
    return out


def _resolve(key: str, value, base: str):
    if not isinstance(value, str) or os.path.isabs(value):
        return value
    joined = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if key in PATH_FLAGS or (key in ("yaml_path", "checkpoint_path") and os.path.exists(joined)):
        return joined
    return value


def _expand(entry, what: str, records: Dict[str, str], seeds: List[int], common: Dict[str, Any],
            flags: Dict[str, argparse.Action], base: str, parser: argparse.ArgumentParser) -> List[Cell]:
    from ftsam_plugin.defense.registry import DEFENSES

    if not isinstance(entry, dict) or "defense" not in entry:
        raise FtsamError(f"{what} must be a mapping with a `defense` ({', '.join(DEFENSES)}) and its flags; fix it")
    defense = entry["defense"]
    if defense not in DEFENSES:
        raise FtsamError(f"{what}: unknown defense {quote(defense)}{_close(defense, DEFENSES)}; use one of "
                         f"{', '.join(DEFENSES)}")
    own = _flags({k: v for k, v in entry.items() if k not in ENTRY_KEYS}, flags, what, base, lists=True)
    template = entry.get("name")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise FtsamError(f"{what}: name must be text like 'ftsam_rho{{rho}}', got {quote(template)}; fix it")
    group = entry.get("group")
    group = None if group is None else str(group)
    chosen = records
    if "records" in entry:
        wanted = entry["records"] if isinstance(entry["records"], list) else [entry["records"]]
        missing = [w for w in wanted if str(w) not in records]
        if missing or not wanted:
            raise FtsamError(f"{what}: records: {quote(missing[0] if missing else wanted)} is not one of the grid's "
                             f"records ({', '.join(records)}); name records as the top-level `records` does")
        chosen = {str(w): records[str(w)] for w in wanted}
    chosen_seeds = _seeds(entry["seeds"], f"{what}: seeds") if "seeds" in entry else seeds
    keys = list(own)
    lists = [own[k] if isinstance(own[k], list) else [own[k]] for k in keys]
    cells = []
    for seed in chosen_seeds:
        for record_name, record in chosen.items():
            for combo in itertools.product(*lists):
                mine = dict(zip(keys, combo))
                settings = {**{k: v for k, v in common.items() if k not in mine}, **mine, "random_seed": seed}
                _check_argv(parser, defense, settings, f"{what} ({record_name}, seed {seed})")
                folder = _folder_name(template, defense, mine, settings, what)
                cells.append(Cell(record=record, defense=defense, folder_name=folder,
                                  settings=tuple(settings.items()), group=group))
    return cells


def _check_argv(parser: argparse.ArgumentParser, defense: str, settings: Dict[str, Any], what: str) -> None:
    argv = ["--defense", defense, "--result_file", "."] + [a for k, v in settings.items()
                                                           for a in (f"--{k}", Cell.text(v))]
    try:
        parser.parse_args(argv)
    except FtsamError as exc:
        raise FtsamError(f"{what}: {exc}; fix the grid file") from None


def _folder_name(template: Optional[str], defense: str, mine: Dict[str, Any], settings: Dict[str, Any],
                 what: str) -> str:
    """The default: the defense and the entry's own flags with their values; a template may use any flag of the
    cell, {seed} and {defense}. `_s<seed>` is appended unless the template places {seed}."""
    seed = settings["random_seed"]
    if template is None:
        name = "_".join([defense] + [f"{k}{_slug(k, v)}" for k, v in mine.items()])
    else:
        fields = {k: _slug(k, v) for k, v in settings.items()}
        fields.update(seed=seed, defense=defense)
        try:
            name = template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise FtsamError(f"{what}: name {quote(template)} uses {exc}, which is not a flag of the cell "
                             f"({', '.join(settings)}) nor seed or defense; fix the name") from None
    if template is None or "{seed}" not in template:
        name += f"_s{seed}"
    if FOLDER_CHARS.search(name):
        raise FtsamError(f"{what}: folder name {quote(name)} may hold only letters, digits and . _ + -; fix the name")
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    if name in (".", "..") or name.startswith("."):
        raise FtsamError(f"{what}: folder name {quote(name)} must not start with a dot; fix the name")
    return name


def _slug(key: str, value) -> str:
    """A value as it reads in a folder name: numbers as written (4, 0.5), paths by their file name."""
    text = Cell.text(value)
    if key in PATH_FLAGS + ("yaml_path", "checkpoint_path") and os.sep in text:
        text = os.path.splitext(os.path.basename(text.rstrip(os.sep)))[0]
    return NAME_CHARS.sub("-", text).strip("-") or "x"
