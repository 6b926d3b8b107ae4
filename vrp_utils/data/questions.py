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
:func:`question_splits` reads several files into one split each (the extraction CLI's ``--questions``, a chapter's
``questions`` parameter), :func:`chapter_questions` a chapter's parameters into those splits.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

from vrp_utils.data.pope import (
    FEATURES, ErrorPolicy, LoadReport, PopeFormatError, _check_image, _error_at, _read_records, _start_loading,
    load_pope, parse_object,
)
from vrp_utils.data.tasks import DEFAULT_TASK, TASKS

__all__ = ["TASK_FEATURES", "add_default_task", "chapter_questions", "load_question_file", "load_questions",
           "question_file_format", "question_splits"]

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


# --------------------------------------------------------------------- splits for the CLI and the chapters
def file_state(path: Path) -> tuple[int, int] | None:
    """(modification time, size) of a file or folder, None where absent: a cache key that changes with it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def parse_question_files(questions: str | Path | Sequence[str | Path]) -> tuple[Path, ...]:
    """A comma-separated string (a notebook parameter), one path or a list -> the question files, in order."""
    if isinstance(questions, str):
        paths = [Path(part.strip()) for part in questions.split(",") if part.strip()]
    elif isinstance(questions, Path):
        paths = [questions]
    else:
        paths = [Path(q) for q in questions]
    if not paths:
        raise ValueError("no question file given: pass POPE or task files (JSON Lines), comma-separated")
    return tuple(paths)


@functools.lru_cache(maxsize=16)
def _load_question_file(path: Path, image_dir: Path, where: tuple, state: tuple) -> Any:
    """``path`` with ``image_dir`` as given (errors name them so); ``where`` (both resolved) and ``state`` key the cache."""
    return load_question_file(path, image_dir)


def question_splits(paths: str | Path | Sequence[str | Path], image_dir: str | Path | None,
                    limit: int | None = None) -> dict[str, Any]:
    """Question files (POPE's format or task files, each told by its first row) -> one split per file.

    Each split is named by its file's setting (``random``/``popular``/``adversarial`` in the file name, else the
    file's stem; :func:`vrp_utils.data.pope.load_pope`); two files of one name are refused. Where any file is a
    task file, the others get the default task (:func:`add_default_task`). Every row is checked first: a bad one
    raises :class:`~vrp_utils.data.pope.PopeFormatError` naming the file and its line. ``limit`` keeps each file's
    first questions. One entry point for the extraction CLI (``--questions``) and the chapters (parameter
    ``questions``), so both read the same splits, and so the same store. A file is read once per process while it
    and the image folder are unchanged.
    """
    if image_dir is None or str(image_dir) == "":
        raise ValueError("question files need the folder their images are in (image_dir)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all questions) or an integer >= 1, got {limit!r}")
    image_dir = Path(image_dir)
    splits: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for path in parse_question_files(paths):
        for kind, wanted, found in (("question file", path, path.is_file()), ("image folder", image_dir, image_dir.is_dir())):
            if not found:
                raise FileNotFoundError(f"{kind} not found: {wanted}"
                                        + ("" if wanted.is_absolute() else f" (relative paths are read from {Path.cwd()})"))
        where = (path.resolve(), image_dir.resolve())
        split = _load_question_file(path, image_dir, where, tuple(file_state(p) for p in where))
        name = split.select_columns(["setting"])[0]["setting"] if len(split) else str(path)
        if name in splits:
            raise ValueError(f"two question files give the setting {name!r}: {files[name]} and {path}; rename one "
                             "(a split is named by its file: random/popular/adversarial in the name, else the stem)")
        splits[name], files[name] = split, path
    splits = add_default_task(splits)
    if limit is not None:
        splits = {name: split.select(range(min(limit, len(split)))) for name, split in splits.items()}
    return splits


def chapter_questions(settings: str | Sequence[str], limit: int | None, questions: str | Sequence[str] | None = None,
                      image_dir: str | Path | None = None) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """A chapter's questions from its parameters: ``(split names, splits)``, checked before any work.

    Without ``questions``: the embedded benchmark's ``settings``
    (:func:`vrp_utils.extract.features.parse_settings`) and ``None`` (then
    :func:`~vrp_utils.extract.features.open_features` reads the benchmark, as always). With ``questions`` (question
    files, comma-separated) and ``image_dir``: every file read and checked (:func:`question_splits`; a bad row is
    named by file and line) and its splits. Refused: ``questions`` without ``image_dir``, ``image_dir`` without
    ``questions``, and ``settings`` other than ``"all"`` beside ``questions`` (the files are the settings then).
    Why here, on the data floor: a chapter calls it in the cell after its parameters, so a bad file fails in
    about two seconds, before the extraction code (transformers: ~4 s to import) is loaded.
    """
    if questions is None:
        from vrp_utils.extract.features import parse_settings

        if image_dir is not None:
            raise ValueError(f"image_dir ({image_dir}) is read only with questions: pass the question files too, "
                             "or leave image_dir out to read the embedded benchmark")
        return parse_settings(settings), None
    if image_dir is None:
        raise ValueError(f"questions ({questions}) needs image_dir: the folder the files' images are in, "
                         "e.g. -p image_dir data/benchmark/images")
    if settings != "all":
        raise ValueError(f"settings ({settings!r}) chooses the embedded benchmark's settings; with questions every "
                         "file is read (one split per file): leave settings at 'all'")
    splits = question_splits(questions, image_dir, limit)
    return tuple(splits), splits
