"""Task question files (issue 25): the format, its validation by line, and a counting file through extraction.

- every kind of bad row is named with the file and its line, as POPE rows are; ``on_error="skip"`` counts them;
- the sample in ``data/README.md`` loads, with canonical labels;
- the extraction CLI tells a task file from a POPE file and extracts a counting file with a tiny real model
  (``count-llava``, whose vocabulary holds counting words) into a store whose ``correct`` column is the
  counting rule's (``count_correct``), and whose identity holds every task's declared rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from vrp_utils.data.counts import NUMBER_WORDS, count_correct, parse_count
from vrp_utils.data.pope import LoadReport, PopeFormatError, load_benchmark, parse_answer
from vrp_utils.data.questions import add_default_task, load_question_file, load_questions, question_file_format
from vrp_utils.data.tasks import task_rules

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
GOOD = {"question": "How many bananas are there in the image?", "image": "eval_000000.png", "answer": "2", "task": "counting"}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _readme_sample() -> list[str]:
    text = (REPO_ROOT / "data" / "README.md").read_text()
    block = re.search(r"<!-- task-file-sample:start -->\n```json\n(.*?)```\n<!-- task-file-sample:end -->", text, re.S)
    assert block, "data/README.md lost its task-file sample"
    return block.group(1).strip().splitlines()


@pytest.mark.parametrize(("row", "problem"), [
    ("{not json", "malformed JSON"),
    ([1, 2], "malformed row: expected a JSON object, got list"),
    ({k: v for k, v in GOOD.items() if k != "task"}, "missing key: task"),
    ({k: v for k, v in GOOD.items() if k not in ("answer", "image")}, "missing key: image, answer"),
    ({**GOOD, "task": "spatial"}, "bad task: expected one of 'presence', 'counting', got 'spatial'"),
    ({**GOOD, "answer": "2 apples"}, "bad answer for a counting question: expected a whole number >= 0"),
    ({**GOOD, "answer": -1}, "bad answer for a counting question"),
    ({**GOOD, "answer": True}, "bad answer for a counting question"),
    ({**GOOD, "task": "presence"}, "bad answer for a presence question: expected 'yes' or 'no', got '2'"),
    ({**GOOD, "question_id": "7"}, "bad question_id: expected an integer, got '7'"),
    ({**GOOD, "question_id": 1}, "duplicate question_id: 1 (first on line 1)"),
    ({**GOOD, "question": "  "}, "bad question: expected non-empty text"),
    ({**GOOD, "image": "eval_999999.png"}, "missing image:"),
])
def test_a_malformed_row_is_named_by_file_and_line(row, problem, tiny_benchmark, tmp_path):
    path = _write(tmp_path / "mine.jsonl", [GOOD, "", row, GOOD | {"question_id": 9}])  # line 2 blank: lines still count
    with pytest.raises(PopeFormatError) as raised:
        load_questions(path, tiny_benchmark / "images")
    assert raised.value.line == 3 and raised.value.path == path
    assert str(raised.value).startswith(f"{path}, line 3: {problem}")
    dataset, report = load_questions(path, tiny_benchmark / "images", on_error="skip", return_report=True)
    assert isinstance(report, LoadReport) and (report.n_rows, report.n_loaded, report.n_skipped) == (3, 2, 1)
    assert report.skipped[0].line == 3 and dataset["question_id"] == [1, 9]


def test_the_readme_sample_loads_with_canonical_labels(tiny_benchmark, tmp_path):
    path = _write(tmp_path / "my_counts.jsonl", _readme_sample())
    assert question_file_format(path) == "tasks"
    dataset = load_question_file(path, tiny_benchmark / "images")
    assert dataset["task"] == ["counting"] * 4 + ["presence"]
    assert dataset["label"] == ["2", "1", "1", "0", "yes"]  # "2", 1, "one", "0", "yes" as the rules read them
    assert dataset["object"] == ["", "", "", "", "bottle"] and dataset["setting"] == ["my_counts"] * 5
    assert question_file_format(tiny_benchmark / "pope_random.jsonl") == "pope"


def test_pope_splits_get_the_presence_task_only_beside_a_task_file(tiny_benchmark, tmp_path):
    pope = load_benchmark("random", tiny_benchmark).select(range(2))
    alone = add_default_task({"random": pope})
    assert alone["random"] is pope  # a POPE-only run keeps its dataset, so its fingerprint
    mine = load_questions(_write(tmp_path / "mine.jsonl", [GOOD]), tiny_benchmark / "images")
    mixed = add_default_task({"random": pope, "mine": mine})
    assert mixed["random"]["task"] == ["presence"] * 2 and mixed["mine"] is mine


def test_a_counting_file_runs_through_extraction_judged_by_the_counting_rule(tiny_loaded, tiny_model_dir, tiny_benchmark,
                                                                            tmp_path):
    from vrp_utils.extract.engine import ExtractionSettings, run_batch
    from vrp_utils.extract.scale import main
    from vrp_utils.extract.store import FeatureStore

    images = sorted(p.name for p in (tiny_benchmark / "images").glob("eval_*.png"))
    questions = [f"How many {o} are there in the image?" for o in ("bananas", "trees", "apples", "lamps")]
    inputs = [(image, question) for image in images for question in questions]
    loaded = tiny_loaded("count-llava")
    # The model's own greedy answers first, so the labels make some rows right and some wrong by the rule.
    from PIL import Image

    pictures = [Image.open(tiny_benchmark / "images" / image).convert("RGB") for image, _ in inputs]
    settings = ExtractionSettings(max_new_tokens=1, attention=False, hidden=False)
    answers = [r["answer"] for r in run_batch(loaded, pictures, [q for _, q in inputs], settings, ["counting"] * len(inputs)).records]
    counts = [parse_count(a) for a in answers]
    assert any(c is not None for c in counts) and any(c is None for c in counts), answers
    word_of = {value: word for word, value in NUMBER_WORDS.items()}
    rows, labels = [], []
    for i, ((image, question), answer, count) in enumerate(zip(inputs, answers, counts)):
        if count is None:
            label = 0  # a non-count answer is wrong whatever the count
        elif i % 2:
            label = count + 1  # another count: wrong
        else:  # the same count in the other spelling: right ("four" against "4", "4" against "four")
            label = word_of[count] if answer.strip().isdigit() else str(count)
        rows.append({"question_id": 100 + i, "question": question, "image": image, "answer": label, "task": "counting"})
        labels.append(label)
    rows.append({"question_id": 1, "question": "Is there a banana in the image?", "image": images[0], "answer": "no", "task": "presence"})
    path = _write(tmp_path / "counts.jsonl", rows)

    out = tmp_path / "features"
    assert main(["--model", str(tiny_model_dir("count-llava")), "--questions", str(path), "--image-dir",
                 str(tiny_benchmark / "images"), "--max-new-tokens", "1", "--out", str(out)]) == 0
    (store_dir,) = out.iterdir()
    store = FeatureStore.open(store_dir)
    assert store.manifest["settings"]["task_rules"] == task_rules()
    table = store.table()
    assert table["task"].tolist() == ["counting"] * len(inputs) + ["presence"]
    counting = table[table["task"] == "counting"]
    assert counting["answer"].tolist() == answers  # the store's greedy answers are the batch's
    assert counting["label"].tolist() == [str(parse_count(str(label))) for label in labels]
    assert counting["correct"].tolist() == [count_correct(a, int(parse_count(str(label)))) for a, label in zip(answers, labels)]
    assert counting["correct"].any() and not counting["correct"].all()
    assert [None if pd.isna(p) else p for p in counting["parsed"]] == [None if c is None else str(c) for c in counts]
    presence = table[table["task"] == "presence"].iloc[0]
    assert bool(presence["correct"]) == (parse_answer(presence["answer"]) == "no")


def test_the_cli_names_a_bad_row_by_line(tiny_model_dir, tiny_benchmark, tmp_path, capsys):
    from vrp_utils.extract.scale import main

    path = _write(tmp_path / "counts.jsonl", [GOOD, {**GOOD, "question_id": 5, "answer": "a few"}])
    assert main(["--model", str(tiny_model_dir("count-llava")), "--questions", str(path), "--image-dir",
                 str(tiny_benchmark / "images"), "--out", str(tmp_path / "features")]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}, line 2: bad answer for a counting question" in err and "Traceback" not in err
    assert not (tmp_path / "features").exists()


def test_question_splits_read_pope_and_task_files_as_the_cli_and_the_chapters_do(tiny_benchmark, tmp_path):
    """One entry point (``question_splits``): a split per file named by its setting, the default task added beside a
    task file, ``limit`` per file; a bad row named by file and line; two files of one name refused."""
    from vrp_utils.data.questions import chapter_questions, question_splits

    images = tiny_benchmark / "images"
    mine = _write(tmp_path / "mine.jsonl", [GOOD, GOOD | {"question_id": 2, "answer": 0}, GOOD | {"question_id": 3}])
    pope = tiny_benchmark / "pope_random.jsonl"
    splits = question_splits(f"{pope},{mine}", images, limit=2)
    assert list(splits) == ["random", "mine"] and [len(s) for s in splits.values()] == [2, 2]
    assert splits["random"]["task"] == ["presence"] * 2 and splits["mine"]["label"] == ["2", "0"]
    assert chapter_questions("all", 2, [str(pope), str(mine)], str(images))[0] == ("random", "mine")
    assert chapter_questions("random", None) == (("random",), None)  # no files: the embedded benchmark, as always
    bad = _write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "question_id": 5, "answer": "a few"}])
    with pytest.raises(PopeFormatError, match=rf"^{re.escape(str(bad))}, line 2: bad answer for a counting question"):
        question_splits([bad], images)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="two question files give the setting 'mine'"):
        question_splits([mine, _write(other / "mine.jsonl", [GOOD])], images)
    for args, problem in [((mine, None), "needs image_dir"), ((None, images), "image_dir .* is read only with questions"),
                          ((mine, images, "random"), "with questions every file is read")]:
        questions, folder, *settings = args
        with pytest.raises(ValueError, match=problem):
            chapter_questions(settings[0] if settings else "all", None, questions, folder)
    with pytest.raises(FileNotFoundError, match="question file not found: nowhere.jsonl \\(relative paths are read from"):
        question_splits("nowhere.jsonl", images)
