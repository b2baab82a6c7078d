"""Sweeps from the notebooks: one papermill execution per combination of parameter values.

    python -m pyconv_core.sweep notebooks/01_classification.ipynb -p lr 0.05,0.1 -p seed 0,1
    python -m pyconv_core.sweep notebooks/04_segmentation.ipynb --grid grid.yaml --parallel 2

``-p NAME V1,V2`` gives a parameter's values (one value: the same in every combination), typed as the
notebook's ``parameters`` cell declares the parameter (``lr: float``); ``--grid FILE`` is a YAML mapping
of names to lists of values, for lists and values holding commas (``heads: [[fcn], [pspnet]]``). A name
the notebook does not declare, or a value of another type, is refused before anything runs.

Each combination (named by the parameters with more than one value, ``lr=0.1,seed=1``) is executed into
``runs/<sweep>/<combination>.ipynb``, with the kernel in ``runs/<sweep>/`` so that its runs land in the
runs folder that holds the sweep, and the notebook's ``run_prefix`` set to ``<sweep>-<combination>-``
(or its ``run_name`` to ``<sweep>-<combination>``), so that every combination has run folders of its own.
Papermill writes ``<combination>.running.ipynb`` (the sweep holds the folder's lock, so no one else does),
renamed on success; a failed execution is kept as ``<combination>.failed.ipynb``, reported, and the other
combinations go on. A combination is finished when its notebook ran to the end with the same parameters
and each of its runs trained every epoch; finished combinations are skipped, so running a sweep again runs
only what is missing or failed. At the end the sweep prints the comparison table of its runs
(:func:`pyconv_core.compare.compare_runs`) and writes it to ``runs/<sweep>/comparison.csv``. Exit status:
0, or 1 when a combination failed or the input was wrong (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import papermill as pm
import yaml

from pyconv_core.compare import compare_runs, find_runs
from pyconv_core.engine.files import hold_run_dir, replace_durably, write_atomic
from pyconv_core.engine.logging import read_config, read_metrics, workbook_path
from pyconv_core.tasks.base import annotation_kind, check_value

__all__ = ["Combination", "SweepReport", "notebook_parameters", "read_grid", "plan_sweep", "run_sweep", "main"]

_RUN_NAMES = ("run_prefix", "run_name")  # what the sweep sets to keep combinations apart, in this order
_NAME_CHARS = r"[^\w.+=,-]"  # characters a sweep's or combination's name replaces by "_"


@dataclass
class Combination:
    """One execution of the sweep: its name, the parameters papermill injects (the sweep's ``run_prefix``
    or ``run_name`` included) and the executed notebook's path."""

    name: str
    parameters: dict[str, Any]
    notebook: Path

    @property
    def running(self) -> Path:
        return self.notebook.with_suffix(".running.ipynb")

    @property
    def failed(self) -> Path:
        return self.notebook.with_suffix(".failed.ipynb")


@dataclass
class SweepReport:
    """What a sweep did: the combinations it ran, skipped (finished before) and those that failed (with
    the error), and the comparison table of its runs (empty when there are none)."""

    name: str
    folder: Path
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    table: pd.DataFrame


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, str]:
    """The parameters of ``notebook``'s ``parameters`` cell -> their declared type (``int``, ``list``;
    ``None`` where a parameter has no annotation), as ``papermill --help-notebook`` reads them."""
    if not Path(notebook).is_file():
        raise ValueError(f"{notebook}: no such notebook (e.g. notebooks/01_classification.ipynb)")
    return {name: p["inferred_type_name"] for name, p in pm.inspect_notebook(str(notebook)).items()}


def _from_text(text: str, kind: str) -> Any:
    """A ``-p`` value as the type declared (``None`` where it may be None: the recipe's); text that is not
    one stays text, for ``check_value`` to refuse."""
    base, optional = annotation_kind(kind)
    if optional and text.lower() == "none":
        return None
    parse: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "bool": lambda t: {"true": True, "false": False}.get(t.lower(), t),
    }
    try:
        return parse.get(base, str)(text)
    except ValueError:
        return text


def read_grid(
    notebook: str | os.PathLike, pairs: Sequence[tuple[str, str]] = (), grid_file: str | os.PathLike | None = None
) -> dict[str, list]:
    """Each swept parameter's values, typed and checked against ``notebook``'s parameters: from the YAML
    mapping in ``grid_file`` (name -> list of values), then from ``pairs`` (``-p name v1,v2``: values
    split at commas and typed as the parameter is declared)."""
    given: dict[str, tuple[str, list, bool]] = {}  # name -> (where it was given, values, given as text)
    if grid_file is not None:
        loaded = yaml.safe_load(Path(grid_file).read_text())
        if not isinstance(loaded, dict) or not all(isinstance(v, list) and v for v in loaded.values()):
            raise ValueError(
                f"{grid_file}: expected a mapping of parameter names to non-empty lists of values "
                f"(e.g. 'lr: [0.05, 0.1]'), got {loaded!r}"
            )
        given.update({str(name): (f"{grid_file}: {name}", values, False) for name, values in loaded.items()})
    for name, text in pairs:
        if name in given:
            raise ValueError(f"-p {name} {text}: {name} is given twice ({given[name][0]}); give it once")
        given[name] = (f"-p {name} {text}", text.split(","), True)
    declared = notebook_parameters(notebook)
    grid = {}
    for name, (where, values, as_text) in given.items():
        if name in _RUN_NAMES:
            raise ValueError(
                f"{where}: the sweep sets {name} (runs are named <sweep>-<combination>); name the "
                f"sweep with --name instead"
            )
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where}: {name!r} is not a parameter of {Path(notebook).name}{hint}; its parameters: "
                f"{', '.join(declared) or 'none'}"
            )
        kind = declared[name]
        try:
            typed = [check_value(name, _from_text(v, kind) if as_text else v, kind) for v in values]
        except ValueError as err:
            lists = " (lists, and values holding commas, go in a --grid YAML file)" if as_text else ""
            raise ValueError(f"{where}: {err}{lists}") from None
        if len({json.dumps(v, sort_keys=True) for v in typed}) < len(typed):
            raise ValueError(f"{where}: a value is given twice; give each once")
        grid[name] = typed
    return grid


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_label(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def plan_sweep(
    notebook: str | os.PathLike,
    grid: Mapping[str, Sequence],
    name: str | None = None,
    runs_dir: str | os.PathLike = "runs",
) -> tuple[str, list[Combination]]:
    """The sweep's name (``name``, or the notebook's stem and the parameters with more than one value)
    and its combinations, in grid order, each with its own ``run_prefix`` / ``run_name`` and notebook."""
    varying = [k for k, values in grid.items() if len(values) > 1]
    sweep = re.sub(_NAME_CHARS, "_", name or "-".join([Path(notebook).stem, *varying]))
    if sweep in ("", ".", ".."):
        raise ValueError(f"--name {name!r}: a sweep needs a folder name, e.g. {Path(notebook).stem!r}")
    setter = next((p for p in _RUN_NAMES if p in notebook_parameters(notebook)), None)
    folder = workbook_path(runs_dir) / sweep
    combinations: dict[str, Combination] = {}
    for values in itertools.product(*grid.values()):
        chosen = dict(zip(grid, values))
        label = re.sub(_NAME_CHARS, "_", ",".join(f"{k}={_label(chosen[k])}" for k in varying) or "default")
        if label in combinations:
            raise ValueError(
                f"two combinations are both named {label!r} (characters other than letters, digits "
                f"and . + = , - become _): give values that differ in those characters"
            )
        if setter is not None:
            chosen[setter] = f"{sweep}-{label}" + ("-" if setter == "run_prefix" else "")
        combinations[label] = Combination(label, chosen, folder / f"{label}.ipynb")
    return sweep, list(combinations.values())


def _runs_of(combinations: Sequence[Combination], sweep: str, runs_dir: Path) -> dict[str, list[Path]]:
    """Each combination's run folders in ``runs_dir``: named ``<sweep>-<combination>`` or starting with
    ``<sweep>-<combination>-``, the longest such combination name owning a folder that two could."""
    owned: dict[str, list[Path]] = {c.name: [] for c in combinations}
    for run_dir in sorted(d for group in find_runs(runs_dir).values() for d in group):
        mine = [
            c.name
            for c in combinations
            if run_dir.name == f"{sweep}-{c.name}" or run_dir.name.startswith(f"{sweep}-{c.name}-")
        ]
        if mine:
            owned[max(mine, key=len)].append(run_dir)
    return owned


def _unfinished(run_dir: Path) -> str | None:
    """Why a run folder's run did not finish (None: it trained every epoch, or evaluated with epochs 0)."""
    epochs = ((read_config(run_dir) or {}).get("train") or {}).get("epochs")
    rows = read_metrics(run_dir)
    if epochs == 0:
        return None if any(r["kind"] == "eval" for r in rows) else "its evaluation is missing"
    trained = max((r["epoch"] for r in rows if r["kind"] == "train"), default=0)
    return None if epochs is not None and trained >= epochs else f"trained {trained} of {epochs} epochs"


def _finished(combination: Combination, notebook: Path, run_dirs: Sequence[Path]) -> bool:
    """Whether ``combination`` ran to the end and its runs finished; an executed notebook of other
    parameters or from another notebook is refused (the sweep's name is taken)."""
    if not combination.notebook.is_file():
        return False
    recorded = json.loads(combination.notebook.read_text()).get("metadata", {}).get("papermill", {})
    source, before = Path(recorded.get("input_path") or "?"), recorded.get("parameters") or {}
    now = json.loads(json.dumps(combination.parameters))
    changed = [
        f"{k} {before.get(k)!r} -> {now.get(k)!r}"
        for k in dict.fromkeys([*before, *now])
        if before.get(k) != now.get(k)
    ]
    if source.name != notebook.name or changed:
        what = (
            f"from {source.name}" if source.name != notebook.name else f"with other parameters ({', '.join(changed)})"
        )
        raise ValueError(
            f"{combination.notebook} was executed {what}: pass another --name, or remove "
            f"{combination.notebook.parent} to run the sweep there again"
        )
    return all(_unfinished(d) is None for d in run_dirs)


def _execute(notebook: str, output: str, parameters: dict[str, Any], kernel: str | None, cwd: str) -> str | None:
    """Execute one combination with papermill into ``output``: None on success, else the error in one line."""
    try:
        pm.execute_notebook(notebook, output, parameters=parameters, kernel_name=kernel, progress_bar=False, cwd=cwd)
    except pm.PapermillExecutionError as err:
        return f"{err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}"
    except Exception as err:  # a kernel that died or would not start fails this combination, not the sweep
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _share_cores(processes: int) -> None:
    """In a pool worker: the kernels it starts share the machine's cores with the others' (OpenMP threads)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))


def run_sweep(
    notebook: str | os.PathLike,
    grid: Mapping[str, Sequence],
    name: str | None = None,
    runs_dir: str | os.PathLike = "runs",
    parallel: int = 1,
    kernel: str | None = None,
) -> SweepReport:
    """Execute ``notebook`` once per combination of ``grid``'s values that has not finished yet, one after
    another or in ``parallel`` processes (a kernel each), then compare the sweep's runs (module docstring).
    ``kernel``: papermill's kernel name (default: the notebook's, ``pyconv-workbook``)."""
    notebook, runs_dir = Path(notebook).resolve(), workbook_path(runs_dir)
    if not (runs_dir / "README.md").is_file():
        raise ValueError(
            f"{runs_dir} is not a workbook's runs folder (it holds no README.md, which marks where "
            f"notebooks put their runs): run from the workbook, or pass such a folder as --runs-dir"
        )
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    sweep, combinations = plan_sweep(notebook, grid, name, runs_dir)
    folder = runs_dir / sweep
    with hold_run_dir(folder):
        owned = _runs_of(combinations, sweep, runs_dir)
        todo = [c for c in combinations if not _finished(c, notebook, owned[c.name])]
        skipped = [c.name for c in combinations if c not in todo]
        print(
            f"sweep {sweep}: {len(combinations)} combinations, {len(skipped)} finished before, running "
            f"{len(todo)} into {folder}",
            flush=True,
        )
        ran: list[str] = []
        failed: dict[str, str] = {}
        started = time.monotonic()

        def finish(combination: Combination, error: str | None) -> None:
            if error is None:
                run_dirs = _runs_of([combination], sweep, runs_dir)[combination.name]
                stopped = [f"{d.name} {why}" for d in run_dirs if (why := _unfinished(d))]
                error = f"runs not finished: {'; '.join(stopped)}" if stopped else None
            step = f"[{len(ran) + len(failed) + 1}/{len(todo)}] {combination.name}"
            if error is None:
                replace_durably(combination.running, combination.notebook)
                combination.failed.unlink(missing_ok=True)
                ran.append(combination.name)
                print(f"{step}: done, {time.monotonic() - started:.0f} s into the sweep", flush=True)
                return
            if combination.running.is_file():
                os.replace(combination.running, combination.failed)
            failed[combination.name] = error
            print(f"{step}: failed: {error} (see {combination.failed})", flush=True)

        jobs = [(str(notebook), str(c.running), c.parameters, kernel, str(folder)) for c in todo]
        if parallel > 1 and len(todo) > 1:
            with ProcessPoolExecutor(
                parallel,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_share_cores,
                initargs=(parallel,),
            ) as pool:
                futures = {pool.submit(_execute, *job): c for job, c in zip(jobs, todo)}
                for future in as_completed(futures):
                    finish(futures[future], future.result())
        else:
            for job, c in zip(jobs, todo):
                finish(c, _execute(*job))
        owned = _runs_of(combinations, sweep, runs_dir)
        runs = {d.name[len(sweep) + 1 :]: d for c in combinations for d in owned[c.name]}
        table = compare_runs(runs) if runs else pd.DataFrame()
        if runs:
            write_atomic(folder / "comparison.csv", table.to_csv().encode())
    return SweepReport(sweep, folder, ran, skipped, failed, table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pyconv_core.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebook", help="the notebook to execute, e.g. notebooks/01_classification.ipynb")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUES"),
        help="a parameter and its comma-separated values",
    )
    parser.add_argument("--grid", help="YAML file: parameter name -> list of values")
    parser.add_argument("--name", help="the sweep's folder in runs/ (default: notebook stem and swept parameters)")
    parser.add_argument("--parallel", type=int, default=1, help="notebooks executed at once (default: 1)")
    parser.add_argument("--runs-dir", default="runs", help="the workbook's runs folder (default: runs)")
    parser.add_argument("-k", "--kernel", help="papermill's kernel (default: the notebook's, pyconv-workbook)")
    args = parser.parse_args(argv)
    try:
        grid = read_grid(args.notebook, [tuple(p) for p in args.parameter], args.grid)
        report = run_sweep(args.notebook, grid, args.name, args.runs_dir, args.parallel, args.kernel)
    except (ValueError, OSError, yaml.YAMLError) as err:  # input errors: their message says the fix
        if os.environ.get("PYCONV_TRACEBACK") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if report.table.empty:
        print(
            f"no run folders of sweep {report.name} (the notebook sets no run_prefix or run_name, or no "
            f"combination ran to the end)"
        )
    else:
        with pd.option_context("display.width", 200, "display.max_columns", None):
            print(report.table.round(3).to_string())
        print(f"table: {report.folder / 'comparison.csv'}")
    print(
        f"{len(report.ran)} ran, {len(report.skipped)} skipped as finished, {len(report.failed)} failed"
        + "".join(f"\nfailed: {name}: {error}" for name, error in report.failed.items())
    )
    if report.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
