"""Tables a person reads: a results frame as a short Markdown table, its full rows as a CSV beside the page.

One entry point, :func:`show`: a notebook passes the frame and a declared rename map (source column -> header with
its unit), and gets

* human headers, no index;
* estimates with their interval in one cell, "0.82 [0.80, 0.84]" (points: "+1.2 [-0.3, +2.7]", see :class:`Estimate`);
* integers as integers ("1,725", layer "1"), p-values to 2 significant digits ("0.00012", "< 1e-4");
* columns empty on every row dropped, and a column with one value on every row moved to a caption line under the
  table ("method: bootstrap over images");
* at most ``top`` rows on the page, sorted by what matters (``sort``), and every row, unformatted, in
  ``tables/<chapter>-<name>.csv`` beside the executed notebook, linked under the table (Sphinx copies a linked
  local file into ``_downloads/`` of the built book).

:func:`format_table` is the pure part (frame in, strings out) that the tests read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

#: Shown for a value that is missing (NaN, None) in a row where the column has values elsewhere.
MISSING = "–"
#: A source column whose name matches this is a p-value (p, p_value, p_holm, drop_p, p_mcnemar_yes ...).
P_VALUE = re.compile(r"^p$|^p_|_p$")
#: Below this a p-value is shown as "< 1e-4".
P_FLOOR = 1e-4
#: Rows on the page; the rest are in the CSV.
TOP = 20


@dataclass(frozen=True)
class Estimate:
    """How to show a value column with its interval: ``low`` and ``high`` name the interval's columns.

    ``scale`` multiplies all three (100: a share shown in points), ``signed`` prints "+" before positive numbers.
    """

    low: str
    high: str
    digits: int = 3
    signed: bool = False
    scale: float = 1.0


def points(low: str = "ci_low", high: str = "ci_high", scale: float = 1.0) -> Estimate:
    """An estimate in percentage points: one decimal, signed ("+1.2 [-0.3, +2.7]")."""
    return Estimate(low, high, digits=1, signed=True, scale=scale)


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _number(value: float, digits: int, signed: bool = False) -> str:
    text = f"{value:{'+' if signed else ''}.{digits}f}"
    if float(text) == 0:  # "-0.000" and "+0.000" read as a sign that is not there
        text = f"{0:.{digits}f}"
    return text


def format_p(p) -> str:
    """A p-value to 2 significant digits: 0.39734 -> "0.40", 0.000123 -> "0.00012", 3e-7 -> "< 1e-4"."""
    if _missing(p):
        return MISSING
    p = float(p)
    if p < P_FLOOR:
        return f"< {P_FLOOR:.0e}".replace("e-0", "e-")
    text = f"{p:#.2g}"
    if "e" in text:  # (1e-4 <= p: never reached, kept for safety)
        text = f"{p:.6f}".rstrip("0")
    return text


def format_estimate(value, low, high, spec: Estimate) -> str:
    """ "0.820 [0.800, 0.840]"; a missing value is shown as missing, a missing interval is left out."""
    if _missing(value):
        return MISSING
    show = lambda v: _number(float(v) * spec.scale, spec.digits, spec.signed)  # noqa: E731
    if _missing(low) or _missing(high):
        return show(value)
    return f"{show(value)} [{show(low)}, {show(high)}]"


def _integral(column: pd.Series) -> bool:
    """Whole numbers only, also in an object column (a layer column holds None on the controls' rows)."""
    values = column.dropna()
    if values.empty or values.dtype == bool or any(isinstance(v, (bool, np.bool_, str)) for v in values):
        return False
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and np.isfinite(numbers).all() and (numbers == numbers.round()).all())


def _format_column(column: pd.Series, source: str, digits: int) -> list[str]:
    if P_VALUE.search(source):
        return [format_p(v) for v in column]
    present = [v for v in column if not _missing(v)]
    if column.dtype == bool or (present and all(isinstance(v, (bool, np.bool_)) for v in present)):
        return [MISSING if _missing(v) else ("yes" if v else "no") for v in column]
    if _integral(column):
        return [MISSING if _missing(v) else f"{int(round(float(v))):,}" for v in column]
    if pd.api.types.is_numeric_dtype(column):
        return [MISSING if _missing(v) else _number(float(v), digits) for v in column]
    return [MISSING if _missing(v) else str(v) for v in column]


def _order(frame: pd.DataFrame, sort: str | Callable[[pd.DataFrame], pd.Series] | None, ascending: bool) -> pd.DataFrame:
    if sort is None:
        return frame.reset_index(drop=True)
    key = frame[sort] if isinstance(sort, str) else pd.Series(np.asarray(sort(frame)), index=frame.index)
    order = key.sort_values(ascending=ascending, na_position="last", kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def format_table(
    frame: pd.DataFrame,
    columns: Mapping[str, str],
    *,
    estimates: Mapping[str, Estimate] | None = None,
    sort: str | Callable[[pd.DataFrame], pd.Series] | None = None,
    ascending: bool = False,
    top: int = TOP,
    digits: int = 3,
    keep: tuple[str, ...] = (),
    note: str | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The page's table (strings, human headers, at most ``top`` rows) and its caption lines.

    ``columns`` maps each shown source column to its header, in the order shown; a column named in ``estimates``
    is shown with its interval. ``note`` is the caption's first line. A column empty on every row is dropped;
    a text column with the same text on every row where it has one (of more than one) goes to the caption as "header: value", unless it is in ``keep``. ``sort`` (a column, or a
    function of the frame giving one key per row) orders the rows, largest first unless ``ascending``.
    """
    estimates = dict(estimates or {})
    missing = [c for c in [*columns, *(s for e in estimates.values() for s in (e.low, e.high))] if c not in frame.columns]
    if missing:
        raise KeyError(f"columns not in the frame: {missing} (it has {list(frame.columns)})")
    ordered = _order(frame, sort, ascending)
    shown = ordered.head(top)
    cells: dict[str, list[str]] = {}
    captions: list[str] = [note] if note else []
    for source, header in columns.items():
        if ordered[source].map(_missing).all():
            continue  # empty on every row, of the whole frame
        if source in estimates:
            spec = estimates[source]
            text = [format_estimate(v, lo, hi, spec) for v, lo, hi in zip(shown[source], shown[spec.low], shown[spec.high])]
        else:
            text = _format_column(shown[source], source, digits)
        whole = _format_column(ordered[source], source, digits) if source not in estimates else None
        textual = whole is not None and not pd.api.types.is_numeric_dtype(ordered[source])
        # (a method applies to the rows that have a value; any other partial column would be misread as every row's)
        present = {t for t in whole if t != MISSING or source != "method"} if textual else None
        constant = len(ordered) > 1 and present is not None and len(present) == 1 and source not in keep
        if constant:
            captions.append(f"{header}: {present.pop()}")
        else:
            cells[header] = text
    table = pd.DataFrame(cells, index=range(len(shown)))
    if len(ordered) > len(shown):
        captions.append(f"{len(shown)} of {len(ordered):,} rows shown" + (f", by {_describe(sort, columns, ascending)}" if sort is not None else ""))
    return table, captions


def _describe(sort, columns: Mapping[str, str], ascending: bool) -> str:
    if isinstance(sort, str):
        name = columns.get(sort, sort)
    else:
        name = getattr(sort, "__doc__", None) or "importance"
    return f"{name}, {'smallest' if ascending else 'largest'} first"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame, captions: list[str], csv_link: str | None = None, n_rows: int | None = None) -> str:
    """A MyST pipe table with its caption lines and the link to the full CSV under it."""
    if table.columns.empty:
        return "*(no rows)*"
    lines = ["| " + " | ".join(_cell(str(c)) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    notes = list(captions)
    if csv_link is not None:
        notes.append(f"[All {n_rows:,} rows as CSV]({csv_link})" if n_rows is not None else f"[CSV]({csv_link})")
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "; ".join(notes) + "."
    return text


def csv_dir() -> Path:
    """Where a running notebook's CSVs go: ``tables/`` beside its executed copy (the runner says where)."""
    from vrp_utils.paths import REPO_ROOT

    return Path(os.environ.get("VRP_OUTPUT_DIR", REPO_ROOT / "runs")) / "tables"


def write_csv(frame: pd.DataFrame, chapter: str, name: str, directory: Path | None = None) -> Path:
    """Every row of ``frame`` (source columns, full precision) to ``<directory>/<chapter>-<name>.csv``."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"table name {name!r}: use lower-case letters, digits and _")
    directory = csv_dir() if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{chapter}-{name}.csv"
    frame.to_csv(path, index=False)
    return path


def show(frame: pd.DataFrame, name: str, columns: Mapping[str, str], weak=None, **options) -> None:
    """Display ``frame`` as a table a person reads and write its full rows to this chapter's CSV (see the module).

    ``weak``: the chapter's :func:`vrp_utils.flags.weak_models`; a note on each weak model the table shows goes
    under it.
    """
    from IPython.display import Markdown, display

    chapter = os.environ.get("VRP_NOTEBOOK", "notebook")
    path = write_csv(frame, chapter, name)
    table, captions = format_table(frame, columns, **options)
    display(Markdown(to_markdown(table, captions, f"tables/{path.name}", len(frame))))
    if weak is not None:
        from vrp_utils.flags import footnote

        footnote(weak, sorted(set(frame["model"].astype(str))) if "model" in frame else None)


#: Headers of the columns that many chapters' frames share (source column -> header with its unit).
HEADERS = {
    "model": "model", "scope": "setting", "setting": "setting", "subset": "questions", "metric": "metric",
    "layer": "layer", "n": "n (inputs)", "n_groups": "images", "p_value": "p", "p_holm": "p (Holm)",
    "method": "method", "undefined": "undefined because", "seeds": "seeds", "probe": "probe", "position": "token",
    "source": "features", "condition": "condition", "fraction": "share masked", "k": "k",
}


def headers(*columns: str | tuple[str, str]) -> dict[str, str]:
    """A rename map in display order: a name of :data:`HEADERS`, or a (source column, header) pair."""
    out = {}
    for column in columns:
        source, header = column if isinstance(column, tuple) else (column, HEADERS[column])
        out[source] = header
    return out
