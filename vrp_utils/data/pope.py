"""Load POPE question files (official COCO ones or our synthetic benchmark), parse answers, score.

One loader for both sources, so every downstream step sees the same columns:
``question_id, image_file, image, question, label, object, setting, boxes``.

Files are read as UTF-8 with an optional byte-order mark (``utf-8-sig``). Bad rows are never
dropped silently: ``on_error="raise"`` (default) raises :class:`PopeFormatError` naming the file,
where in it (``line N`` of a JSON Lines file, ``element N`` of a JSON array) and the problem;
``on_error="skip"`` skips the row and records it in a :class:`LoadReport`, which keeps the question
file's rows and the boxes file's rows apart. Get the report with
``load_pope(..., return_report=True) -> (dataset, report)``; without it, skipped rows are announced
with a ``warnings.warn`` carrying the report summary. A file with no rows at all (empty, blank
lines only, or ``[]``) is an error under either policy: nothing to load is never a silent success.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, overload

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from vrp_utils.paths import BENCHMARK_DIR

__all__ = [
    "AnswerParseError", "LoadReport", "PopeFormatError", "FEATURES", "load_benchmark", "load_pope",
    "load_train", "parse_answer", "parse_object", "pope_metrics", "first_token_decision", "NEGATION_WORDS",
]

ErrorPolicy = Literal["raise", "skip"]

#: Column types of every loaded POPE dataset.
FEATURES = datasets.Features({
    "question_id": datasets.Value("int64"),
    "image_file": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "label": datasets.Value("string"),
    "object": datasets.Value("string"),
    "setting": datasets.Value("string"),
    "boxes": datasets.List({"category": datasets.Value("string"), "bbox": datasets.List(datasets.Value("int32"))}),
})

_REQUIRED_KEYS = ("question_id", "image", "text", "label")
_QUESTION_RE = re.compile(r"^\s*Is there (?:a|an) (?P<object>.+?) in the image\?\s*$", re.IGNORECASE)
_SETTING_RE = re.compile(r"(random|popular|adversarial)", re.IGNORECASE)


class PopeFormatError(ValueError):
    """A POPE question/boxes file is bad; the message names the file, where in it, and the problem.

    ``line`` is the 1-based line of a JSON Lines file; ``element`` the 1-based element of a JSON
    array file (then ``line`` is None). Both are None for a problem with the whole file (e.g. empty).
    """

    def __init__(self, path: str | Path, line: int | None, problem: str, *, element: int | None = None):
        self.path, self.line, self.element, self.problem = Path(path), line, element, problem
        where = f"{path}" + (f", line {line}" if line is not None else "") + (
            f", element {element}" if element is not None else "")
        super().__init__(f"{where}: {problem}")


class AnswerParseError(ValueError):
    """The strict answer parser found no leading yes/no."""


@dataclass
class LoadReport:
    """What :func:`load_pope` read, kept and skipped (with ``on_error="skip"``), per file.

    ``n_rows``, ``n_loaded`` and ``skipped`` count the question file's rows only; the boxes file's
    rows are counted apart in ``n_boxes_rows``, ``n_boxes_loaded`` and ``boxes_skipped`` (a question
    row whose image lost its boxes to a bad boxes row is skipped as "missing boxes" in the questions).
    """

    questions_file: Path
    n_rows: int = 0
    n_loaded: int = 0
    skipped: list[PopeFormatError] = field(default_factory=list)
    boxes_file: Path | None = None
    n_boxes_rows: int = 0
    n_boxes_loaded: int = 0
    boxes_skipped: list[PopeFormatError] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        """Question rows skipped."""
        return len(self.skipped)

    @property
    def n_boxes_skipped(self) -> int:
        """Boxes rows skipped."""
        return len(self.boxes_skipped)

    def counts_by_problem(self, file: Literal["questions", "boxes"] = "questions") -> dict[str, int]:
        """Skipped rows of one file per kind of problem (the text before the first ':')."""
        skipped = {"questions": self.skipped, "boxes": self.boxes_skipped}[file]
        return dict(Counter(e.problem.split(":")[0] for e in skipped))

    def summary(self) -> str:
        """One clause per file read, e.g. ``q.jsonl: 0 of 2 rows loaded, 2 skipped (missing boxes: 2);
        boxes.jsonl: 0 of 3 rows loaded, 3 skipped (bad object: 3)``."""
        parts = [self._clause(self.questions_file, self.n_loaded, self.n_rows, "questions")]
        if self.boxes_file is not None:
            parts.append(self._clause(self.boxes_file, self.n_boxes_loaded, self.n_boxes_rows, "boxes"))
        return "; ".join(parts)

    def _clause(self, path: Path, loaded: int, rows: int, file: Literal["questions", "boxes"]) -> str:
        counts = self.counts_by_problem(file)
        text = f"{path}: {loaded} of {rows} rows loaded, {sum(counts.values())} skipped"
        if counts:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")"
        return text


def parse_object(question: str) -> str:
    """The object of a POPE question, ``"Is there a dining table in the image?" -> "dining table"``.

    The object keeps the question's spelling and capitals (``"Is there a TV in the image?" -> "TV"``);
    only the surrounding words are matched case-insensitively. Raises ``ValueError`` when the text is not of that form (so a typo never becomes a new object).
    """
    match = _QUESTION_RE.match(question)
    if not match:
        raise ValueError(f"question does not match 'Is there a/an <object> in the image?': {question!r}")
    return match.group("object").strip()


def _infer_setting(path: Path) -> str:
    match = _SETTING_RE.search(path.stem)
    return match.group(1).lower() if match else path.stem


_Unit = Literal["line", "element"]


def _read_records(path: Path) -> tuple[_Unit, list[tuple[int, Any]]]:
    """Where rows are counted (``"line"`` or ``"element"``) and (1-based position, parsed JSON or
    the exception) per row of a JSON Lines file or a JSON array file.

    Read as ``utf-8-sig``, so a byte-order mark does not cost the first row. Row errors are
    returned, not raised, so the caller applies one error policy to every kind; a file with no
    rows (empty, blank lines only, ``[]``) or a broken JSON array raises :class:`PopeFormatError`.
    """
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise PopeFormatError(path, None, "empty file: no rows (expected JSON Lines or a JSON array of rows)")
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:  # one broken array: nothing to salvage row by row
            raise PopeFormatError(path, exc.lineno, f"malformed JSON array: {exc.msg}") from exc
        if not array:
            raise PopeFormatError(path, None, "empty file: the JSON array has no rows")
        return "element", list(enumerate(array, start=1))
    records: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((lineno, exc))
    return "line", records


def _error_at(path: Path, unit: _Unit, position: int, problem: str) -> PopeFormatError:
    """A row's error, located by line (JSON Lines) or by element (JSON array)."""
    if unit == "element":
        return PopeFormatError(path, None, problem, element=position)
    return PopeFormatError(path, position, problem)


def _check_image(path: Path) -> str | None:
    """None if ``path`` is a readable image, else the problem. Decodes fully (verify() alone misses
    truncated data)."""
    if not path.is_file():
        return f"missing image: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image: {path} ({type(exc).__name__}: {exc})"
    return None


def _load_boxes(path: Path, on_error: ErrorPolicy, report: LoadReport) -> dict[str, list[dict]]:
    """``image -> objects`` from a boxes JSONL (our sidecar format); counts go to the report's boxes fields."""
    boxes: dict[str, list[dict]] = {}
    report.boxes_file = path
    unit, records = _read_records(path)
    for lineno, rec in records:
        report.n_boxes_rows += 1
        try:
            if isinstance(rec, Exception):
                raise _error_at(path, unit, lineno, f"malformed JSON: {rec}")
            if not isinstance(rec, dict) or "image" not in rec or "objects" not in rec:
                raise _error_at(path, unit, lineno, "missing key: boxes rows need 'image' and 'objects'")
            objects = []
            for obj in rec["objects"]:
                bbox = obj.get("bbox") if isinstance(obj, dict) else None
                if (not isinstance(obj, dict) or not isinstance(obj.get("category"), str) or not isinstance(bbox, list)
                        or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)):
                    raise _error_at(path, unit, lineno,
                                    f"bad object: expected {{category, bbox: [x0,y0,x1,y1]}}, got {obj!r}")
                objects.append({"category": obj["category"], "bbox": [int(round(v)) for v in bbox]})
            boxes[str(rec["image"])] = objects
        except PopeFormatError as err:
            if on_error == "raise":
                raise
            report.boxes_skipped.append(err)
            continue
        report.n_boxes_loaded += 1
    return boxes


def _start_loading(questions: str | Path, image_dir: str | Path, on_error: ErrorPolicy, setting: str | None,
                   kind: str) -> tuple[Path, Path, str, LoadReport]:
    """What every question-file loader checks first (the policy, the file, the image folder), with the file's
    setting (given, else :func:`_infer_setting`) and its empty report."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    questions, image_dir = Path(questions), Path(image_dir)
    if not questions.is_file():
        raise FileNotFoundError(f"{kind} question file not found: {questions}")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{kind} image folder not found: {image_dir}")
    return questions, image_dir, setting if setting is not None else _infer_setting(questions), LoadReport(questions)


@overload
def load_pope(questions: str | Path, image_dir: str | Path, boxes: str | Path | None = ...,
              on_error: ErrorPolicy = ..., setting: str | None = ...,
              return_report: Literal[False] = ...) -> datasets.Dataset: ...
@overload
def load_pope(questions: str | Path, image_dir: str | Path, boxes: str | Path | None = ...,
              on_error: ErrorPolicy = ..., setting: str | None = ...,
              *, return_report: Literal[True]) -> tuple[datasets.Dataset, LoadReport]: ...


def load_pope(questions: str | Path, image_dir: str | Path, boxes: str | Path | None = None,
              on_error: ErrorPolicy = "raise", setting: str | None = None,
              return_report: bool = False) -> datasets.Dataset | tuple[datasets.Dataset, LoadReport]:
    """Load a POPE question file (JSON Lines, or a JSON array) with its image folder.

    Every row is validated: JSON syntax, required keys (``question_id, image, text, label``),
    unique integer ``question_id``, label yes/no (any case; stored lowercase), question form (the
    ``object`` column is parsed from it), image present and decodable, and boxes present for the
    image when a ``boxes`` file is given. ``setting`` defaults to random/popular/adversarial found
    in the file name, else the file stem. Extra keys (e.g. COCO's ``image_id``) are ignored.
    The ``image`` column is a ``datasets.Image`` that decodes to ``PIL.Image`` on access.

    Files are read as ``utf-8-sig`` (a byte-order mark is fine). Errors name the file and
    ``line N`` (JSON Lines) or ``element N`` (JSON array). An empty question or boxes file (no
    rows, blank lines only, or ``[]``) raises :class:`PopeFormatError` whatever ``on_error`` says.
    With ``on_error="skip"`` the :class:`LoadReport` counts question rows and boxes rows apart, and
    its summary names each file with its own counts.
    """
    questions, image_dir, setting, report = _start_loading(questions, image_dir, on_error, setting, "POPE")
    box_map = _load_boxes(Path(boxes), on_error, report) if boxes is not None else None
    image_status: dict[str, str | None] = {}
    seen_ids: dict[int, int] = {}  # question_id -> line of the loaded row
    columns: dict[str, list] = {name: [] for name in FEATURES}

    unit, records = _read_records(questions)
    for lineno, rec in records:
        report.n_rows += 1
        try:
            if isinstance(rec, Exception):
                raise _error_at(questions, unit, lineno, f"malformed JSON: {rec}")
            if not isinstance(rec, dict):
                raise _error_at(questions, unit, lineno, f"malformed row: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in _REQUIRED_KEYS if k not in rec]
            if missing:
                raise _error_at(questions, unit, lineno, f"missing key: {', '.join(missing)}")
            qid = rec["question_id"]
            if isinstance(qid, bool) or not isinstance(qid, int):
                raise _error_at(questions, unit, lineno, f"bad question_id: expected an integer, got {qid!r}")
            if qid in seen_ids:
                raise _error_at(questions, unit, lineno, f"duplicate question_id: {qid} (first on {unit} {seen_ids[qid]})")
            label = rec["label"]
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise _error_at(questions, unit, lineno, f"bad label: expected 'yes' or 'no', got {label!r}")
            text = rec["text"]
            if not isinstance(text, str):
                raise _error_at(questions, unit, lineno, f"bad question: text must be a string, got {text!r}")
            try:
                obj = parse_object(text)
            except ValueError as exc:
                raise _error_at(questions, unit, lineno, f"bad question: {exc}") from None
            image_file = str(rec["image"])
            if image_file not in image_status:
                image_status[image_file] = _check_image(image_dir / image_file)
            if image_status[image_file] is not None:
                raise _error_at(questions, unit, lineno, image_status[image_file])
            if box_map is not None and image_file not in box_map:
                raise _error_at(questions, unit, lineno, f"missing boxes: {image_file} not in {boxes}")
        except PopeFormatError as err:
            if on_error == "raise":
                raise
            report.skipped.append(err)
            continue
        seen_ids[qid] = lineno
        columns["question_id"].append(qid)
        columns["image_file"].append(image_file)
        columns["image"].append(str((image_dir / image_file).resolve()))
        columns["question"].append(text)
        columns["label"].append(label.strip().lower())
        columns["object"].append(obj)
        columns["setting"].append(setting)
        columns["boxes"].append(box_map[image_file] if box_map is not None else [])
        report.n_loaded += 1

    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    if return_report:
        return dataset, report
    if report.skipped or report.boxes_skipped:
        warnings.warn(f"load_pope skipped rows: {report.summary()}", stacklevel=2)
    return dataset


def load_benchmark(setting: str, root: str | Path = BENCHMARK_DIR, on_error: ErrorPolicy = "raise") -> datasets.Dataset:
    """One evaluation split (``random``, ``popular`` or ``adversarial``) of the synthetic benchmark."""
    from vrp_utils.data.benchmark import SETTINGS

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    root = Path(root)
    return load_pope(root / f"pope_{setting}.jsonl", root / "images", boxes=root / "boxes.jsonl",
                     on_error=on_error, setting=setting)


def load_train(root: str | Path = BENCHMARK_DIR, on_error: ErrorPolicy = "raise") -> datasets.Dataset:
    """The training split of the synthetic benchmark (images disjoint from the evaluation ones)."""
    root = Path(root)
    return load_pope(root / "train.jsonl", root / "images", boxes=root / "boxes.jsonl", on_error=on_error,
                     setting="train")


@overload
def parse_answer(text: str, rule: Literal["pope", "strict"] = ..., on_fail: Literal["raise"] = ...) -> str: ...
@overload
def parse_answer(text: str, rule: Literal["pope", "strict"] = ..., *, on_fail: Literal["none"]) -> str | None: ...


def parse_answer(text: str, rule: Literal["pope", "strict"] = "pope",
                 on_fail: Literal["raise", "none"] = "raise") -> str | None:
    """Map a free-text answer to ``"yes"``/``"no"``.

    ``rule="pope"`` is the official POPE evaluation rule (``evaluate.py``): keep the text before
    the first ``"."``, delete commas, split on single spaces; the answer is ``"no"`` if any word is
    exactly ``"No"``, ``"no"`` or ``"not"``, else ``"yes"``. Quirks kept on purpose, for
    comparability with published numbers:

    * anything without a negation word is "yes": ``""`` -> yes, ``"Maybe"`` -> yes;
    * only the first sentence counts: ``"Yes. No."`` -> yes;
    * negation anywhere in it counts: ``"Yes, there is no doubt."`` -> no;
    * whole words only, case-sensitive: ``"Not really"`` -> yes, ``"NO"`` -> yes, ``"Nope"`` -> yes;
    * split on single spaces, so ``"No!"``, ``"no?"`` or ``"No\\n"`` are not the word "no" -> yes.

    ``rule="strict"``: the first word, lowercased with punctuation stripped, must be yes or no;
    otherwise :class:`AnswerParseError` (or ``None`` with ``on_fail="none"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a str, got {type(text).__name__}")
    if rule == "pope":
        first = text.split(".")[0] if "." in text else text
        word_list = first.replace(",", "").split(" ")
        return "no" if ("No" in word_list or "not" in word_list or "no" in word_list) else "yes"
    if rule == "strict":
        tokens = text.split()
        first_word = re.sub(r"[^\w]", "", tokens[0]).lower() if tokens else ""
        if first_word in ("yes", "no"):
            return first_word
        if on_fail == "none":
            return None
        raise AnswerParseError(f"answer does not start with yes/no: {text!r}")
    raise ValueError(f"rule must be 'pope' or 'strict', got {rule!r}")


#: POPE's negation words (``vrp_utils.data.pope.parse_answer``, rule "pope").
NEGATION_WORDS = ("No", "no", "not")


def first_token_decision(text: str, is_end: bool = False) -> str | None:
    """What a first answer token decides under POPE's rule: ``"yes"``, ``"no"`` or ``None`` (later tokens decide).

    - the end token: the answer is empty, which POPE's rule reads as yes;
    - a token holding ``"."``: the first sentence is closed, so its text decides (POPE's rule on it);
    - a token with a negation word (No/no/not, whole words after POPE's comma removal): no, since POPE's
      rule reads "no" from a negation anywhere in the first sentence;
    - anything else, a yes-word included ("Yes", a space, "Maybe"): None. A yes-word does not decide:
      "Yes" + " not" reads no. Measured: on a random-weight Qwen2-VL at T = 1 counting "Yes" as deciding
      biased q upward (24 inputs, sum of z^2 = 55.6 on 24 df); these tokens are resolved by sampling.

    A negation token could in principle still be continued into another word ("No" + "pe" = "Nope",
    with subword vocabularies); how often that happens is measured on the samples
    (``consistency.decision_violations``), never assumed away.
    """
    if is_end:
        return parse_answer("", rule="pope")
    if "." in text:
        return parse_answer(text, rule="pope")
    words = text.replace(",", "").split(" ")
    if any(word in NEGATION_WORDS for word in words):
        return "no"
    return None


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float | int]:
    """POPE's table: accuracy, precision, recall, F1 ("yes" is positive), yes_ratio, n, and counts.

    Computed from the counts in the form of POPE's own evaluation script, so the numbers agree
    with it to the last bit: accuracy ``(tp + tn) / n``, precision ``p = tp / (tp + fp)``, recall
    ``r = tp / (tp + fn)``, F1 ``2 * p * r / (p + r)`` (not ``2tp / (2tp + fp + fn)``, which
    differs in the last bit on about a third of count triples), yes_ratio ``(tp + fp) / n``.
    Where POPE's script would divide by zero the value is 0.0, not an error or NaN: precision with
    no predicted "yes", recall with no actual "yes", F1 where ``p + r == 0``. So a model answering
    always "no" gets F1 0.
    """
    y_true = _as_yes_no(labels, "labels")
    y_pred = _as_yes_no(predictions, "predictions")
    if len(y_true) != len(y_pred):
        raise ValueError(f"labels and predictions differ in length: {len(y_true)} vs {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no examples to score")
    true_yes, pred_yes = y_true == "yes", y_pred == "yes"
    tp = int(np.sum(true_yes & pred_yes))
    fp = int(np.sum(~true_yes & pred_yes))
    tn = int(np.sum(~true_yes & ~pred_yes))
    fn = int(np.sum(true_yes & ~pred_yes))
    n = tp + fp + tn + fn
    precision = float(tp) / float(tp + fp) if tp + fp else 0.0
    recall = float(tp) / float(tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n, "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def _as_yes_no(values: Sequence[str], name: str) -> np.ndarray:
    arr = np.asarray([str(v).strip().lower() for v in values], dtype=object)
    bad = sorted({v for v in arr if v not in ("yes", "no")})
    if bad:
        raise ValueError(f"{name} must be 'yes'/'no', found {bad[:5]}")
    return arr
