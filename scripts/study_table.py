"""Print an Optuna study of Atelier's sweeper as a Markdown table (best first) and optionally write it as CSV.

    python scripts/study_table.py outputs/optuna/gan_optuna.db
    python scripts/study_table.py outputs/optuna/gan_mnist_short.db --study gan_mnist_short --csv docs/study.csv

Columns: trial number, state (COMPLETE / FAIL / ...), objective value, wall seconds, then one column per searched
parameter (the override value the trial ran with). Complete trials are sorted by value in the study's direction,
the others follow in trial order.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any


def study_rows(storage: str, study_name: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of the study ``study_name`` in ``storage`` (an SQLAlchemy URL or a path to an SQLite file).

    Returns:
        ``(columns, rows)``: ``rows`` are dicts keyed by ``columns``, best complete trial first.

    Raises:
        ValueError: when the storage holds several studies and ``study_name`` is not given (the names are listed),
            or no study of that name.
    """
    import optuna

    if "://" not in storage:
        path = Path(storage)
        if not path.is_file():
            raise ValueError(f"no study file {path}")
        storage = f"sqlite:///{path.resolve()}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{storage} holds the studies {names}: pass --study NAME")
        study_name = names[0]
    if study_name not in names:
        raise ValueError(f"no study {study_name!r} in {storage}; it holds {names}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    params = sorted({key for t in study.trials for key in t.params})
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    complete.sort(key=lambda t: -t.value if maximize else t.value)
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    rows = []
    for t in complete + others:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "value": t.value,
                               "seconds": None if seconds is None else round(seconds)}
        row.update({key: t.params.get(key) for key in params})
        rows.append(row)
    return ["trial", "state", "value", "seconds", *params], rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("storage", help="SQLite file of the study (or an SQLAlchemy storage URL)")
    parser.add_argument("--study", default=None, help="study name (needed when the storage holds several)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    try:
        columns, rows = study_rows(args.storage, args.study)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from atelier.tasks.evaluate import format_table

    print(format_table(rows, columns))
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
