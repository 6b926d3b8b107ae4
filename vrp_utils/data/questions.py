"""User question files: questions of any task (presence, counting), one JSON object a line.

Why a format of our own beside POPE's: a POPE row says only yes or no about "Is there a <object> in the
image?", while a user's questions ask other things and have other answers, each judged by its task's rule
(:mod:`vrp_utils.data.tasks`). The format (documented with a sample in ``data/README.md``)::

    {"question_id": 1, "question": "How many apples are there in the image?", "image": "kitchen.png", "answer": "2", "task": "counting"}

- ``question`` (non-empty text), ``image`` (a file under the image folder), ``answer`` and ``task``
  (``presence`` or ``counting``) are required; ``question_id`` (an integer, unique in the file) is optional
  and defaults to the row's line number. Other keys are ignored.
- ``answer``: for ``presence`` ``"yes"`` or ``"no"`` (any case); for ``counting`` a whole number >= 0, as a
  JSON integer or a text the counting rule reads (``2``, ``"2"``, ``"two"``). It is stored canonical
  (``"yes"``, ``"2"``) in the ``label`` column; a ``task`` column holds the task.

Rows are validated and named exactly as POPE rows are (:func:`vrp_utils.data.pope.load_pope`): a bad row
raises :class:`~vrp_utils.data.pope.PopeFormatError` naming the file, ``line N`` and the problem, or with
``on_error="skip"`` is skipped and counted in a :class:`~vrp_utils.data.pope.LoadReport`.
:func:`load_question_file` reads either format: a file whose first row has a ``task`` key is a task file.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import datasets

from vrp_utils.data.pope import (
    FEATURES, ErrorPolicy, LoadReport, PopeFormatError, _check_image, _error_at, _read_records, _start_loading,
    load_pope, parse_object,
)
from vrp_utils.data.tasks import DEFAULT_TASK, TASKS

__all__ = ["TASK_FEATURES", "add_default_task", "load_question_file", "load_questions", "question_file_format"]

#: Column types of a loaded task file: POPE's columns plus the task.
TASK_FEATURES = datasets.Features({**FEATURES, "task": datasets.Value("string")})
_REQUIRED_KEYS = ("question", "image", "answer", "task")


def load_questions(questions: str | Path, image_dir: str | Path, on_error: ErrorPolicy = "raise",
                   setting: str | None = None,
                   return_report: bool = False) -> datasets.Dataset | tuple[datasets.Dataset, LoadReport]:
    """Load a task question file (see the module's format) with its image folder.

    Checked per row: JSON syntax, the required keys, a known task, an answer the task's rule accepts, a
    non-empty question, an integer ``question_id`` unique in the file, the image present and decodable.
    ``object`` is parsed where the question has POPE's form, else empty; ``boxes`` are empty; ``setting``
    defaults as for POPE files (random/popular/adversarial in the file name, else its stem).
    """
    questions, image_dir, setting, report = _start_loading(questions, image_dir, on_error, setting, "task")
    image_status: dict[str, str | None] = {}
    seen_ids: dict[int, int] = {}
    columns: dict[str, list] = {name: [] for name in TASK_FEATURES}

    unit, records = _read_records(questions)
    for position, rec in records:
        report.n_rows += 1
        try:
            row = _check_row(questions, unit, position, rec, image_dir, image_status, seen_ids)
        except PopeFormatError as err:
            if on_error == "raise":
                raise
            report.skipped.append(err)
            continue
        seen_ids[row["question_id"]] = position
        for name, value in row.items():
            columns[name].append(value)
        columns["setting"].append(setting)
        columns["boxes"].append([])
        report.n_loaded += 1

    dataset = datasets.Dataset.from_dict(columns, features=TASK_FEATURES)
    if return_report:
        return dataset, report
    if report.skipped:
        warnings.warn(f"load_questions skipped rows: {report.summary()}", stacklevel=2)
    return dataset


def _check_row(path: Path, unit: Literal["line", "element"], position: int, rec: Any, image_dir: Path,
               image_status: dict[str, str | None], seen_ids: Mapping[int, int]) -> dict[str, Any]:
    """One row's columns (all but ``setting`` and ``boxes``), or the :class:`PopeFormatError` naming its problem."""
    def fail(problem: str) -> PopeFormatError:
        return _error_at(path, unit, position, problem)

    if isinstance(rec, Exception):
        raise fail(f"malformed JSON: {rec}")
    if not isinstance(rec, dict):
        raise fail(f"malformed row: expected a JSON object, got {type(rec).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in rec]
    if missing:
        raise fail(f"missing key: {', '.join(missing)}")
    task = rec["task"]
    if task not in TASKS:
        raise fail(f"bad task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    try:
        label = TASKS[task].canonical_label(rec["answer"])
    except ValueError as exc:
        raise fail(f"bad answer for a {task} question: {exc}") from None
    qid = rec.get("question_id", position)
    if isinstance(qid, bool) or not isinstance(qid, int):
        raise fail(f"bad question_id: expected an integer, got {qid!r}")
    if qid in seen_ids:
        raise fail(f"duplicate question_id: {qid} (first on {unit} {seen_ids[qid]})")
    text = rec["question"]
    if not isinstance(text, str) or not text.strip():
        raise fail(f"bad question: expected non-empty text, got {text!r}")
    image_file = rec["image"]
    if not isinstance(image_file, str) or not image_file:
        raise fail(f"bad image: expected a file name, got {image_file!r}")
    if image_file not in image_status:
        image_status[image_file] = _check_image(image_dir / image_file)
    if image_status[image_file] is not None:
        raise fail(image_status[image_file])
    try:
        obj = parse_object(text)
    except ValueError:
        obj = ""
    return {"question_id": qid, "image_file": image_file, "image": str((image_dir / image_file).resolve()),
            "question": text, "label": label, "object": obj, "task": task}


def question_file_format(path: str | Path) -> Literal["pope", "tasks"]:
    """``"tasks"`` when the file's first row that is a JSON object has a ``task`` key, else ``"pope"``.

    Why the first row decides: a file is one format; a malformed row is then named by that format's loader.
    """
    _, records = _read_records(Path(path))
    for _, rec in records:
        if isinstance(rec, dict):
            return "tasks" if "task" in rec else "pope"
    return "pope"


def load_question_file(path: str | Path, image_dir: str | Path, on_error: ErrorPolicy = "raise") -> datasets.Dataset:
    """A POPE question file or a task file (:func:`question_file_format`), loaded by its own loader."""
    if question_file_format(path) == "tasks":
        return load_questions(path, image_dir, on_error=on_error)
    return load_pope(path, image_dir, on_error=on_error)


def add_default_task(splits: Mapping[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """The splits, where any has a ``task`` column, with one added (:data:`DEFAULT_TASK`) to those without.

    Why: POPE splits and task files go into one store (``datasets.concatenate_datasets`` needs one schema),
    while POPE-only runs keep their datasets, and so their fingerprints, unchanged.
    """
    if not any("task" in split.column_names for split in splits.values()):
        return dict(splits)
    return {name: split if "task" in split.column_names else
            split.add_column("task", [DEFAULT_TASK] * len(split))
            for name, split in splits.items()}
