"""Machine-readable results of a notebook.

A notebook calls :func:`publish` with a JSON-serialisable dict; the value travels inside the
executed notebook as a display output with its own MIME type, and the runner
(:mod:`vrp_utils.run`) lifts it into ``results/<notebook>.json``. So a result file can only come
from a notebook that ran to the end, and the number in the book and the number in the file are
the same object.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vrp_utils.atomic import atomic_write_json

RESULTS_MIMETYPE = "application/vnd.vrp.results+json"
INPUTS_MIMETYPE = "application/vnd.vrp.inputs+json"
#: The kinds of input a notebook may declare with :func:`publish_inputs`.
INPUT_KINDS = ("data", "models", "features")


def _jsonable(value: Any) -> Any:
    """Convert numpy/pandas scalars and containers to plain JSON types (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"result value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


#: Everything :func:`publish` attached in this process (the running notebook's kernel), merged as the runner
#: merges it into ``results/<notebook>.json``.
_PUBLISHED: dict[str, Any] = {}


def publish(results: dict[str, Any]) -> None:
    """Attach ``results`` to the running notebook's outputs (picked up by the runner)."""
    from IPython.display import display

    payload = _jsonable(results)
    json.dumps(payload)  # fail here, in the notebook, if it cannot be written
    _PUBLISHED.update(json.loads(json.dumps(payload)))
    display({RESULTS_MIMETYPE: payload, "text/plain": f"<{len(payload)} results published>"}, raw=True)


def published() -> dict[str, Any]:
    """A copy of what this notebook has published so far, as the runner will write it (later keys win): what a
    chapter's opening paragraph is written from (:mod:`vrp_utils.answers`), so prose and file cannot disagree."""
    return json.loads(json.dumps(_PUBLISHED))


def publish_inputs(**kinds: dict[str, str]) -> None:
    """Declare the fingerprints of what the notebook read, e.g. ``publish_inputs(data={"benchmark": fp},
    models={"zoo-llava": fp}, features={"zoo-llava/adversarial": store_dir_name})``.

    Optional: the runner lifts them into the ``inputs`` field of ``results/<notebook>.json`` (beside, not
    inside, ``results``) and the status page lists them, so a reader can tell which data, model and
    feature store a number came from.
    """
    from IPython.display import display

    unknown = sorted(set(kinds) - set(INPUT_KINDS))
    if unknown:
        raise ValueError(f"unknown input kinds {unknown}; use {', '.join(INPUT_KINDS)}")
    payload = {kind: {str(name): str(fp) for name, fp in entries.items()} for kind, entries in kinds.items()}
    display({INPUTS_MIMETYPE: payload, "text/plain": f"<{sum(map(len, payload.values()))} inputs declared>"}, raw=True)


def _merge(notebook: Any, mimetype: str, depth: int) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            payload = output.get("data", {}).get(mimetype)
            if payload is None:
                continue
            if depth == 1:
                merged.update(payload)
            else:
                for key, value in payload.items():
                    merged.setdefault(key, {}).update(value)
    return merged


def collect(notebook: Any) -> dict[str, Any]:
    """Merge every published results payload of an executed notebook (later keys win)."""
    return _merge(notebook, RESULTS_MIMETYPE, 1)


def strip_bookkeeping(notebook: Any) -> None:
    """Drop the :func:`publish` / :func:`publish_inputs` outputs from an executed notebook, in place.

    Why: the runner lifts them into ``results/<notebook>.json`` first; left in the notebook, the book would show
    their plain-text fallback ("<6 results published>") on the chapter's page.
    """
    for cell in notebook.cells:
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"]
                               if not {RESULTS_MIMETYPE, INPUTS_MIMETYPE} & set(o.get("data", {}))]


def collect_inputs(notebook: Any) -> dict[str, dict[str, str]]:
    """Merge every :func:`publish_inputs` declaration of an executed notebook, per kind."""
    return _merge(notebook, INPUTS_MIMETYPE, 2)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON (indented, sorted keys) to ``path`` atomically: readers never see half a file."""
    atomic_write_json(path, payload, indent=2, sort_keys=True)
