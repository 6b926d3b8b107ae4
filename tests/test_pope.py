"""POPE loader validation, answer parsing (official rule + strict), metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from vrp_utils.data import benchmark as bm
from vrp_utils.data.pope import (
    AnswerParseError, LoadReport, PopeFormatError, load_benchmark, load_pope, load_train, parse_answer,
    parse_object, pope_metrics,
)


# ------------------------------------------------------------------ answer parsing

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("yes.", "yes"),
    ("No, there is not.", "no"), ("Yes, there is.", "yes"),
    ("Not really", "yes"),               # "Not" is not one of the words No/no/not
    ("Yes, there is no doubt.", "no"),   # negation anywhere in the first sentence
    ("", "yes"),                         # no negation -> yes
    ("Yes. No.", "yes"),                 # only the first sentence counts
    ("No. Yes.", "no"),
    ("Yes,no", "yes"),                   # commas are deleted (not split on): one word "Yesno"
    ("Yes, no", "no"),                   # ... but here "no" stays a word
    ("There is not a cup", "no"),
    ("NO", "yes"), ("No!", "yes"), ("Nope", "yes"),  # case- and punctuation-sensitive words
    ("I think, no", "no"),               # comma dropped, "no" is a word
    ("No, I don't think so", "no"),      # "No," loses its comma and is the word "No"
    ("No\n", "yes"), ("no\tway", "yes"),  # only single spaces split words
])
def test_parse_answer_pope_rule(text: str, expected: str) -> None:
    assert parse_answer(text) == expected
    assert parse_answer(text, rule="pope") == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("yes.", "yes"), ("YES, there is.", "yes"), ("No, there is not.", "no"),
    ("no!", "no"), ("  No\n", "no"), ("No. Yes.", "no"),
])
def test_parse_answer_strict(text: str, expected: str) -> None:
    assert parse_answer(text, rule="strict") == expected


@pytest.mark.parametrize("text", ["", "Not really", "There is a cup.", "Maybe yes", "Yesterday"])
def test_parse_answer_strict_rejects(text: str) -> None:
    with pytest.raises(AnswerParseError, match="yes/no"):
        parse_answer(text, rule="strict")
    assert parse_answer(text, rule="strict", on_fail="none") is None


def test_parse_answer_bad_rule_and_type() -> None:
    with pytest.raises(ValueError, match="rule"):
        parse_answer("yes", rule="loose")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_answer(None)  # type: ignore[arg-type]


def test_parse_object() -> None:
    assert parse_object("Is there a dining table in the image?") == "dining table"
    assert parse_object("Is there an apple in the image?") == "apple"
    # the object keeps the question's capitals; only the frame is matched in any case
    assert parse_object("Is there a TV in the image?") == "TV"
    assert parse_object("is there A Teddy Bear IN THE IMAGE?") == "Teddy Bear"
    for bad in ["Is there a in the image?", "Is the cup in the image?", "Is there a cup?", "cup"]:
        with pytest.raises(ValueError, match="does not match"):
            parse_object(bad)


# ------------------------------------------------------------------ metrics

def test_pope_metrics_by_hand() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no", "no"]  # TP=2 FN=1 FP=1 TN=2
    m = pope_metrics(labels, preds)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (2, 1, 1, 2, 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_f1_in_popes_form() -> None:
    """F1 is POPE's 2pr/(p+r), exactly as Python computes it, not 2tp/(2tp+fp+fn)."""
    # TP=3 FP=1 FN=2 TN=4: P = 3/4, R = 3/5; the two forms of F1 differ in the last bit here
    m = pope_metrics(["yes"] * 5 + ["no"] * 5, ["yes"] * 3 + ["no"] * 2 + ["yes"] + ["no"] * 4)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 2, 4)
    assert m["precision"] == 0.75 and m["recall"] == 0.6
    assert m["f1"] == 2 * 0.75 * 0.6 / 1.35 == 0.6666666666666665 != 2 * 3 / (2 * 3 + 1 + 2)
    assert m["accuracy"] == 0.7 and m["yes_ratio"] == 0.4
    # TP=1 FP=0 FN=4 (found by searching small counts): P = 1, R = 0.2, F1 = 0.33333333333333337 (not 1/3)
    m = pope_metrics(["yes"] * 5, ["yes"] + ["no"] * 4)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 0, 4, 0)
    assert m["precision"] == 1.0 and m["recall"] == 0.2
    assert m["f1"] == 0.33333333333333337 and 2 * 1 / (2 * 1 + 0 + 4) == 0.3333333333333333


def _pope_script(labels: list[str], preds: list[str]) -> dict[str, float]:
    """POPE's evaluate.py, transcribed (its loop over answers and its formulas), with 0 where it
    would divide by zero."""
    label_list = [0 if x == "no" else 1 for x in labels]
    pred_list = [0 if x == "no" else 1 for x in preds]
    pos, neg = 1, 0
    yes_ratio = pred_list.count(1) / len(pred_list)
    TP, TN, FP, FN = 0, 0, 0, 0
    for pred, label in zip(pred_list, label_list):
        if pred == pos and label == pos:
            TP += 1
        elif pred == pos and label == neg:
            FP += 1
        elif pred == neg and label == neg:
            TN += 1
        elif pred == neg and label == pos:
            FN += 1
    precision = float(TP) / float(TP + FP) if TP + FP else 0.0
    recall = float(TP) / float(TP + FN) if TP + FN else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = (TP + TN) / (TP + TN + FP + FN)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio,
            "tp": TP, "fp": FP, "tn": TN, "fn": FN}


def test_pope_metrics_equal_popes_script_exactly() -> None:
    """Bit-for-bit equal to an independent transcription of POPE's script on many prediction sets
    (sizes 1..60, every yes rate), including all-yes and all-no answers."""
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(1, 61))
        labels = rng.choice(["yes", "no"], n, p=[q := rng.uniform(), 1 - q]).tolist()
        preds = rng.choice(["yes", "no"], n, p=[q := rng.choice([0.0, 1.0, rng.uniform()]), 1 - q]).tolist()
        m, ref = pope_metrics(labels, preds), _pope_script(labels, preds)
        assert {k: m[k] for k in ref} == ref, (trial, labels, preds)


def test_pope_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(["yes", "no"], 500).tolist()
    preds = rng.choice(["yes", "no"], 500, p=[0.7, 0.3]).tolist()
    m = pope_metrics(labels, preds)
    y, p = np.array(labels) == "yes", np.array(preds) == "yes"
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, p))
    assert m["recall"] == pytest.approx(recall_score(y, p))
    assert m["f1"] == pytest.approx(f1_score(y, p))
    assert m["yes_ratio"] == pytest.approx(p.mean())


def test_pope_metrics_edge_cases() -> None:
    m = pope_metrics(["yes", "no"], ["no", "no"])  # nothing predicted yes: precision 0 by convention
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0
    assert pope_metrics(["Yes", "NO"], ["yes", "no"])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="predictions must be 'yes'/'no'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="length"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="no examples"):
        pope_metrics([], [])


# ------------------------------------------------------------------ loader validation

@pytest.fixture
def pope_dir(tmp_path: Path) -> Path:
    """A tiny COCO-like POPE folder: two good JPEGs, one corrupt image."""
    images = tmp_path / "val2014"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (32, 24), colour).save(images / f"COCO_val2014_{i:012d}.jpg")
    good = images / "COCO_val2014_000000000000.jpg"
    (images / "corrupt.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (images / "text.png").write_text("not an image")
    return tmp_path


def _row(qid: int, image: str = "COCO_val2014_000000000000.jpg", text: str = "Is there a dining table in the image?",
         label: str = "yes", **extra: object) -> str:
    return json.dumps({"question_id": qid, "image": image, "text": text, "label": label, **extra})


GOOD = [_row(1, image_id=0), _row(2, label="no", text="Is there an umbrella in the image?"),
        _row(3, image="COCO_val2014_000000000001.jpg", label="No")]

BAD_ROWS = {
    "missing key": json.dumps({"question_id": 9, "image": "COCO_val2014_000000000000.jpg", "label": "yes"}),
    "bad label": _row(9, label="maybe"),
    "missing image": _row(9, image="COCO_val2014_000000000099.jpg"),
    "unreadable image": _row(9, image="corrupt.jpg"),
    "malformed JSON": '{"question_id": 9, "image": ',
    "bad question": _row(9, text="Is there a cup?"),
    "duplicate question_id": _row(1, label="no"),
    "bad question_id": json.dumps({"question_id": "nine", "image": "COCO_val2014_000000000000.jpg",
                                   "text": "Is there a cup in the image?", "label": "yes"}),
}


def test_load_good_coco_style_file(pope_dir: Path) -> None:
    q = pope_dir / "coco_pope_adversarial.json"
    q.write_text("\n".join(GOOD) + "\n\n")  # trailing blank lines are fine
    ds = load_pope(q, pope_dir / "val2014")
    assert ds.column_names == ["question_id", "image_file", "image", "question", "label", "object", "setting", "boxes"]
    assert ds["object"] == ["dining table", "umbrella", "dining table"]
    assert ds["label"] == ["yes", "no", "no"]
    assert set(ds["setting"]) == {"adversarial"} and ds["boxes"] == [[], [], []]
    img = ds[2]["image"]
    assert isinstance(img, Image.Image) and img.size == (32, 24)
    assert load_pope(q, pope_dir / "val2014", setting="mine")["setting"][0] == "mine"


@pytest.mark.parametrize("problem", sorted(BAD_ROWS))
def test_each_bad_row_raises_with_file_and_line(pope_dir: Path, problem: str) -> None:
    q = pope_dir / "questions.jsonl"
    q.write_text("\n".join(GOOD[:2] + [BAD_ROWS[problem]] + GOOD[2:]) + "\n")
    with pytest.raises(PopeFormatError) as info:
        load_pope(q, pope_dir / "val2014")
    err = info.value
    assert isinstance(err, ValueError)
    assert err.line == 3 and err.path == q and err.problem.startswith(problem)
    assert str(q) in str(err) and "line 3" in str(err)


def test_skip_counts_every_bad_row(pope_dir: Path) -> None:
    q = pope_dir / "questions.jsonl"
    q.write_text("\n".join(GOOD + list(BAD_ROWS.values())) + "\n")
    ds, report = load_pope(q, pope_dir / "val2014", on_error="skip", return_report=True)
    assert isinstance(report, LoadReport)
    assert len(ds) == 3 and ds["question_id"] == [1, 2, 3]
    assert (report.n_rows, report.n_loaded, report.n_skipped) == (3 + len(BAD_ROWS), 3, len(BAD_ROWS))
    assert report.counts_by_problem() == {p: 1 for p in BAD_ROWS}
    assert [e.line for e in report.skipped] == list(range(4, 4 + len(BAD_ROWS)))
    assert f"{len(BAD_ROWS)} skipped" in report.summary()
    with pytest.warns(UserWarning, match=f"{len(BAD_ROWS)} skipped"):  # without the report it is announced, not silent
        assert len(load_pope(q, pope_dir / "val2014", on_error="skip")) == 3


def test_image_that_is_not_an_image(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text(_row(1, image="text.png") + "\n")
    with pytest.raises(PopeFormatError, match="unreadable image"):
        load_pope(q, pope_dir / "val2014")


def test_json_array_input(pope_dir: Path) -> None:
    q = pope_dir / "pope_popular.json"
    q.write_text(json.dumps([json.loads(r) for r in GOOD], indent=2))
    ds = load_pope(q, pope_dir / "val2014")
    assert len(ds) == 3 and ds["setting"][0] == "popular"
    q.write_text(json.dumps([json.loads(GOOD[0]), {"question_id": 2, "image": "x.jpg", "label": "yes"}]))
    with pytest.raises(PopeFormatError, match=r"pope_popular.json, element 2: missing key: text") as info:
        load_pope(q, pope_dir / "val2014")
    assert "line" not in str(info.value) and (info.value.element, info.value.line) == (2, None)
    q.write_text(json.dumps([json.loads(GOOD[0]), json.loads(GOOD[1]), json.loads(GOOD[0])], indent=2))
    with pytest.raises(PopeFormatError, match=r"element 3: duplicate question_id: 1 \(first on element 1\)"):
        load_pope(q, pope_dir / "val2014")
    q.write_text("[" + GOOD[0] + ",")
    with pytest.raises(PopeFormatError, match="malformed JSON array"):
        load_pope(q, pope_dir / "val2014")


@pytest.mark.parametrize("content", ["", "\n  \n\t\n", "[]", "\ufeff\n", " [ ]\n"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_question_file_fails_naming_it(pope_dir: Path, content: str, on_error: str) -> None:
    q = pope_dir / "coco_pope_random.json"
    q.write_text(content, encoding="utf-8")
    with pytest.raises(PopeFormatError, match="empty file") as info:
        load_pope(q, pope_dir / "val2014", on_error=on_error)  # type: ignore[arg-type]
    assert str(q) in str(info.value) and info.value.path == q


def test_empty_boxes_file_fails_naming_it(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD) + "\n")
    boxes = pope_dir / "boxes.jsonl"
    boxes.write_text("\n")
    with pytest.raises(PopeFormatError, match=r"boxes.jsonl: empty file"):
        load_pope(q, pope_dir / "val2014", boxes=boxes, on_error="skip")


def test_byte_order_mark_keeps_the_first_row(pope_dir: Path) -> None:
    q = pope_dir / "coco_pope_popular.json"
    for text in ["\n".join(GOOD) + "\n", json.dumps([json.loads(r) for r in GOOD])]:
        q.write_text(text, encoding="utf-8-sig")
        assert q.read_bytes().startswith(b"\xef\xbb\xbf")
        ds, report = load_pope(q, pope_dir / "val2014", on_error="skip", return_report=True)
        assert ds["question_id"] == [1, 2, 3] and report.n_skipped == 0


def test_skip_report_keeps_boxes_problems_apart(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD[:2]) + "\n")  # two questions, both on image 0
    boxes = pope_dir / "boxes.jsonl"
    bad = {"image": "COCO_val2014_000000000000.jpg", "objects": [{"category": "cup", "bbox": [1, 2]}]}
    boxes.write_text("\n".join([json.dumps(bad), "{oops", json.dumps({"image": "x.jpg"}),
                                json.dumps({"image": "y.jpg", "objects": []})]) + "\n")
    ds, report = load_pope(q, pope_dir / "val2014", boxes=boxes, on_error="skip", return_report=True)
    assert len(ds) == 0
    summary = report.summary()
    assert f"{q}: 0 of 2 rows loaded, 2 skipped (missing boxes: 2)" in summary, summary
    assert f"{boxes}: 1 of 4 rows loaded, 3 skipped (bad object: 1, malformed JSON: 1, missing key: 1)" in summary
    assert (report.n_rows, report.n_loaded, report.n_skipped) == (2, 0, 2)
    assert (report.n_boxes_rows, report.n_boxes_loaded, report.n_boxes_skipped) == (4, 1, 3)
    assert report.counts_by_problem() == {"missing boxes": 2}
    assert report.counts_by_problem("boxes") == {"bad object": 1, "malformed JSON": 1, "missing key": 1}
    assert all(e.path == q for e in report.skipped) and all(e.path == boxes for e in report.boxes_skipped)
    with pytest.warns(UserWarning, match="boxes.jsonl: 1 of 4 rows loaded, 3 skipped"):
        load_pope(q, pope_dir / "val2014", boxes=boxes, on_error="skip")


def test_boxes_are_attached_and_checked(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD) + "\n")
    boxes = pope_dir / "boxes.jsonl"
    boxes.write_text(json.dumps({"image": "COCO_val2014_000000000000.jpg",
                                 "objects": [{"category": "dining table", "bbox": [1, 2, 30.4, 20]}]}) + "\n")
    with pytest.raises(PopeFormatError, match=r"line 3: missing boxes"):
        load_pope(q, pope_dir / "val2014", boxes=boxes)
    with pytest.warns(UserWarning, match="missing boxes: 1"):
        ds = load_pope(q, pope_dir / "val2014", boxes=boxes, on_error="skip")
    assert ds["boxes"][0] == [{"category": "dining table", "bbox": [1, 2, 30, 20]}]
    boxes.write_text('{"image": "a.jpg", "objects": [{"category": "cup", "bbox": [1, 2]}]}\n')
    with pytest.raises(PopeFormatError, match=r"boxes.jsonl, line 1: bad object"):
        load_pope(q, pope_dir / "val2014", boxes=boxes)


def test_missing_paths_and_bad_policy(pope_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="question file"):
        load_pope(pope_dir / "nope.jsonl", pope_dir / "val2014")
    q = pope_dir / "q.jsonl"
    q.write_text(GOOD[0] + "\n")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_pope(q, pope_dir / "nowhere")
    with pytest.raises(ValueError, match="on_error"):
        load_pope(q, pope_dir / "val2014", on_error="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------ round trip with the benchmark

def test_round_trip_synthetic_benchmark(tmp_path: Path) -> None:
    root = bm.build_benchmark(tmp_path / "b", n_eval_images=5, n_train_images=4, progress=False)
    boxes = {json.loads(l)["image"]: json.loads(l) for l in (root / "boxes.jsonl").read_text().splitlines()}
    for setting in bm.SETTINGS:
        ds = load_benchmark(setting, root)
        raw = [json.loads(l) for l in (root / f"pope_{setting}.jsonl").read_text().splitlines()]
        assert len(ds) == len(raw) == 30
        assert ds["question_id"] == [r["question_id"] for r in raw]
        assert ds["question"] == [r["text"] for r in raw] and ds["label"] == [r["label"] for r in raw]
        assert set(ds["setting"]) == {setting}
        for row in ds.select(range(0, 30, 7)):
            assert row["boxes"] == boxes[row["image_file"]]["objects"]
            assert (row["object"] in {o["category"] for o in row["boxes"]}) == (row["label"] == "yes")
            assert row["image"].size == (64, 64)
            assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(root / "images" / row["image_file"])))
    train = load_train(root)
    assert len(train) == 24 and set(train["setting"]) == {"train"}
    assert all(f.startswith("train_") for f in train["image_file"])
    with pytest.raises(ValueError, match="setting"):
        load_benchmark("train", root)


# ------------------------------------------------------------------ error locations, boxes checks, wrappers
# (added to kill surviving mutants of benchmarks/mutation.sh: each test names what it pins down)

#: Bad rows beyond BAD_ROWS whose problem has no test of its own: a row that is not an object, a
#: question that is not a string.
MORE_BAD_ROWS = {
    "malformed row": "[1, 2]",
    "bad question: text must be a string": _row(9, text=5),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("problem", sorted(set(BAD_ROWS) - {"malformed JSON"} | set(MORE_BAD_ROWS)))
def test_each_bad_row_of_a_json_array_is_located_by_element(pope_dir: Path, problem: str) -> None:
    """In a JSON array file every kind of bad row is located by element, never by line."""
    bad = {**BAD_ROWS, **MORE_BAD_ROWS}[problem]
    q = pope_dir / "questions.json"
    q.write_text(json.dumps([json.loads(r) for r in GOOD[:2] + [bad] + GOOD[2:]], indent=2))
    with pytest.raises(PopeFormatError) as info:
        load_pope(q, pope_dir / "val2014")
    err = info.value
    assert (err.path, err.line, err.element) == (q, None, 3) and err.problem.startswith(problem)
    assert str(err).startswith(f"{q}, element 3: {problem}")


@pytest.mark.parametrize("problem", sorted(MORE_BAD_ROWS))
def test_more_bad_rows_of_json_lines_are_located_by_line(pope_dir: Path, problem: str) -> None:
    q = pope_dir / "questions.jsonl"
    q.write_text("\n".join(GOOD[:2] + [MORE_BAD_ROWS[problem]] + GOOD[2:]) + "\n")
    with pytest.raises(PopeFormatError) as info:
        load_pope(q, pope_dir / "val2014")
    assert (info.value.line, info.value.element) == (3, None) and info.value.problem.startswith(problem)


def test_blank_lines_and_duplicates_keep_their_line_numbers(pope_dir: Path) -> None:
    q = pope_dir / "questions.jsonl"
    q.write_text("\n".join([GOOD[0], "", "   ", GOOD[1], _row(1, label="no"), GOOD[2]]) + "\n")
    with pytest.raises(PopeFormatError, match=r"line 5: duplicate question_id: 1 \(first on line 1\)"):
        load_pope(q, pope_dir / "val2014")
    q.write_text("\n".join([GOOD[0], "", GOOD[1], "", GOOD[2]]) + "\n")  # rows after a blank line are read
    assert load_pope(q, pope_dir / "val2014")["question_id"] == [1, 2, 3]


def test_broken_json_array_names_the_line_of_the_problem(pope_dir: Path) -> None:
    q = pope_dir / "questions.json"
    q.write_text("[\n" + GOOD[0] + ",\n" + GOOD[1] + "\n" + GOOD[2] + "\n]")  # comma missing after line 3
    with pytest.raises(PopeFormatError, match="malformed JSON array") as info:
        load_pope(q, pope_dir / "val2014")
    assert info.value.line == 4 and "line 4" in str(info.value)


@pytest.mark.parametrize("row, problem", [
    ('{"image": "COCO_val2014_000000000000.jpg", "objects": [{"category": 5, "bbox": [1, 2, 3, 4]}]}', "bad object"),
    ('{"image": "COCO_val2014_000000000000.jpg", "objects": [{"category": "cup"}]}', "bad object"),
    ('{"image": "COCO_val2014_000000000000.jpg", "objects": ["cup"]}', "bad object"),
    ('{"image": "COCO_val2014_000000000000.jpg", "objects": [{"category": "cup", "bbox": [1, 2, "3", 4]}]}', "bad object"),
    ('{"objects": []}', "missing key"),
    ('{"image": "COCO_val2014_000000000000.jpg"}', "missing key"),
    ('["image", "objects"]', "missing key"),
    ("{oops", "malformed JSON"),
])
def test_each_bad_boxes_row_is_located_by_line_and_by_element(pope_dir: Path, row: str, problem: str) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD) + "\n")
    good = json.dumps({"image": "COCO_val2014_000000000001.jpg", "objects": []})
    boxes = pope_dir / "boxes.jsonl"
    boxes.write_text("\n".join([good, row]) + "\n")
    with pytest.raises(PopeFormatError) as info:
        load_pope(q, pope_dir / "val2014", boxes=boxes)
    assert (info.value.path, info.value.line, info.value.element) == (boxes, 2, None)
    assert info.value.problem.startswith(problem)
    if problem == "malformed JSON":
        return  # a JSON array cannot hold a malformed row
    boxes = pope_dir / "boxes.json"
    boxes.write_text("[" + good + ", " + row + "]")
    with pytest.raises(PopeFormatError) as info:
        load_pope(q, pope_dir / "val2014", boxes=boxes)
    assert (info.value.path, info.value.line, info.value.element) == (boxes, None, 2)
    assert info.value.problem.startswith(problem)


def test_skip_report_counts_every_good_boxes_row_and_joins_clauses(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD) + "\n")
    boxes = pope_dir / "boxes.jsonl"
    rows = [{"image": f"COCO_val2014_{i:012d}.jpg", "objects": []} for i in range(2)] + [{"image": "z.jpg"}]
    boxes.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds, report = load_pope(q, pope_dir / "val2014", boxes=boxes, on_error="skip", return_report=True)
    assert len(ds) == 3 and (report.n_boxes_rows, report.n_boxes_loaded, report.n_boxes_skipped) == (3, 2, 1)
    assert report.summary() == (f"{q}: 3 of 3 rows loaded, 0 skipped; "
                                f"{boxes}: 2 of 3 rows loaded, 1 skipped (missing key: 1)")


def test_skip_warning_points_at_the_caller(pope_dir: Path) -> None:
    q = pope_dir / "q.jsonl"
    q.write_text("\n".join(GOOD + [BAD_ROWS["bad label"]]) + "\n")
    with pytest.warns(UserWarning, match="1 skipped") as record:
        load_pope(q, pope_dir / "val2014", on_error="skip")
    # stacklevel=2: the caller, never pope.py itself (mutmut's trampoline adds a frame, so the exact
    # caller is not checked)
    assert len(record) == 1 and Path(record[0].filename).name != "pope.py"


@pytest.fixture
def benchmark_root(pope_dir: Path) -> Path:
    """A benchmark-shaped folder (images/, boxes.jsonl, pope_random.jsonl, train.jsonl), each file one bad row."""
    root = pope_dir / "bench"
    root.mkdir()
    (pope_dir / "val2014").rename(root / "images")
    boxes = [{"image": f"COCO_val2014_{i:012d}.jpg", "objects": [{"category": "cup", "bbox": [1, 2, 3, 4]}]}
             for i in range(2)]
    (root / "boxes.jsonl").write_text("\n".join(json.dumps(b) for b in boxes) + "\n")
    for name in ("pope_random.jsonl", "train.jsonl"):
        (root / name).write_text("\n".join(GOOD + [BAD_ROWS["bad label"]]) + "\n")
    return root


@pytest.mark.parametrize("split", ["random", "train"])
def test_benchmark_loaders_pass_boxes_setting_and_policy(benchmark_root: Path, split: str) -> None:
    def load(**kwargs):
        if split == "train":
            return load_train(benchmark_root, **kwargs)
        return load_benchmark(split, benchmark_root, **kwargs)

    with pytest.raises(PopeFormatError, match="line 4: bad label"):
        load()
    with pytest.warns(UserWarning, match="1 skipped"):
        ds = load(on_error="skip")
    assert ds["question_id"] == [1, 2, 3] and set(ds["setting"]) == {split}
    assert ds["boxes"][0] == [{"category": "cup", "bbox": [1, 2, 3, 4]}]
    (benchmark_root / "boxes.jsonl").write_text(json.dumps({"image": "other.jpg", "objects": []}) + "\n")
    with pytest.raises(PopeFormatError, match="missing boxes"):
        load(on_error="raise")


def test_metrics_name_the_argument_with_bad_values() -> None:
    with pytest.raises(ValueError, match=r"^labels must be 'yes'/'no', found \['maybe'\]"):
        pope_metrics(["yes", "maybe"], ["yes", "no"])
    with pytest.raises(ValueError, match=r"^predictions must be 'yes'/'no', found \['1'\]"):
        pope_metrics(["yes", "no"], ["yes", 1])


def test_missing_boxes_in_a_json_array_is_located_by_element(pope_dir: Path) -> None:
    q = pope_dir / "questions.json"
    q.write_text(json.dumps([json.loads(r) for r in GOOD]))
    boxes = pope_dir / "boxes.jsonl"
    boxes.write_text(json.dumps({"image": "COCO_val2014_000000000000.jpg", "objects": []}) + "\n")
    with pytest.raises(PopeFormatError, match=r"questions.json, element 3: missing boxes") as info:
        load_pope(q, pope_dir / "val2014", boxes=boxes)
    assert (info.value.line, info.value.element) == (None, 3)
