"""The synthetic POPE-style benchmark: determinism, idempotence, splits, POPE sampling semantics."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vrp_utils.data import benchmark as bm
from vrp_utils.data.__main__ import main as cli_main
from vrp_utils.data.pope import parse_object

SMALL = dict(seed=0, n_eval_images=12, n_train_images=20, image_size=64)
QUESTION_RE = re.compile(r"^Is there (a|an) ([a-z]+) in the image\?$")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bm.build_benchmark(tmp_path_factory.mktemp("bench") / "b", progress=False, **SMALL)


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough eval images for popular/co-occurrence rankings to be non-trivial."""
    return bm.build_benchmark(tmp_path_factory.mktemp("bench") / "m", seed=3, n_eval_images=60,
                              n_train_images=10, progress=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def questions_by_image(rows: list[dict]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["image"], []).append((parse_object(r["text"]), r["label"]))
    return out


def test_categories_vocabulary_and_question_text() -> None:
    assert len(bm.CATEGORIES) >= 12 and len(set(bm.CATEGORIES)) == len(bm.CATEGORIES)
    assert all(re.fullmatch(r"[a-z]+", c) for c in bm.CATEGORIES)
    assert bm.question_text("apple") == "Is there an apple in the image?"
    assert bm.question_text("cup") == "Is there a cup in the image?"
    vocab = bm.vocabulary()
    assert vocab == sorted(set(vocab)) and vocab == bm.vocabulary()
    assert set(bm.CATEGORIES) <= set(vocab)
    assert {"is", "there", "a", "an", "in", "the", "image", "?", "yes", "no", "not", ".", ","} <= set(vocab)
    for forms in bm.ANSWER_FORMS.values():
        for form in forms:
            assert set(bm.words(form)) <= set(vocab)
    assert bm.words("Yes, there is.") == ["yes", ",", "there", "is", "."]


def test_same_seed_gives_identical_bytes(tmp_path: Path, small: Path) -> None:
    other = bm.build_benchmark(tmp_path / "again", progress=False, **SMALL)
    a, b = all_files(small), all_files(other)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    different = bm.build_benchmark(tmp_path / "seed1", progress=False, **{**SMALL, "seed": 1})
    assert (different / "pope_random.jsonl").read_bytes() != (small / "pope_random.jsonl").read_bytes()


def test_layout_and_manifest(small: Path) -> None:
    names = {p.name for p in (small / "images").iterdir()}
    assert names == {f"eval_{i:06d}.png" for i in range(12)} | {f"train_{i:06d}.png" for i in range(20)}
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["build_key"]["seed"] == 0 and manifest["build_key"]["n_train_images"] == 20
    assert manifest["categories"] == list(bm.CATEGORIES)
    on_disk = {k: hashlib.sha256(v).hexdigest() for k, v in all_files(small).items() if k != "manifest.json"}
    assert manifest["files"] == on_disk
    assert manifest["counts"]["questions"] == {"random": 72, "popular": 72, "adversarial": 72, "train": 120}
    with Image.open(small / "images" / "eval_000000.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB" and not im.info.get("dpi")


def test_rebuild_only_when_needed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    args = ["build", "--out", str(out), "--n-eval-images", "4", "--n-train-images", "3", "--quiet"]
    assert cli_main(args) == 0
    assert "built" in capsys.readouterr().out
    before = (out / "manifest.json").stat().st_mtime_ns
    assert cli_main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before
    # A damaged file or a changed parameter triggers a rebuild; the stale image is gone afterwards.
    (out / "images" / "eval_000000.png").write_bytes(b"garbage")
    assert bm.build_benchmark_verbose(out, n_eval_images=4, n_train_images=3, progress=False).rebuilt
    result = bm.build_benchmark_verbose(out, n_eval_images=3, n_train_images=3, progress=False)
    assert result.rebuilt and not (out / "images" / "eval_000003.png").exists()
    assert not list(tmp_path.glob(".b.*"))  # no staging leftovers


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        bm.build_benchmark(tmp_path, n_eval_images=2, n_train_images=0, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_image_size_is_a_parameter(tmp_path: Path) -> None:
    out = bm.build_benchmark(tmp_path / "b48", n_eval_images=2, n_train_images=1, image_size=48, progress=False)
    with Image.open(out / "images" / "eval_000001.png") as im:
        assert im.size == (48, 48)
    for rec in read_jsonl(out / "boxes.jsonl"):
        assert all(0 <= o["bbox"][0] < o["bbox"][2] <= 48 and 0 <= o["bbox"][1] < o["bbox"][3] <= 48
                   for o in rec["objects"])


def test_splits_are_disjoint_and_images_unique(small: Path) -> None:
    eval_images = {r["image"] for s in bm.SETTINGS for r in read_jsonl(small / f"pope_{s}.jsonl")}
    train_images = {r["image"] for r in read_jsonl(small / "train.jsonl")}
    assert len(eval_images) == 12 and len(train_images) == 20
    assert eval_images.isdisjoint(train_images)
    pixel_hashes = [hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
                    for p in sorted((small / "images").glob("*.png"))]
    assert len(set(pixel_hashes)) == len(pixel_hashes) == 32


def test_boxes_sidecar(small: Path) -> None:
    records = read_jsonl(small / "boxes.jsonl")
    assert len(records) == 32
    for rec in records:
        assert rec["scene"] in bm.SCENES and rec["split"] in ("eval", "train")
        cats = {o["category"] for o in rec["objects"]}
        assert len(cats) >= 3 and cats <= set(bm.CATEGORIES)
        for o in rec["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 >= 2 and y1 - y0 >= 2


def test_questions_format_and_balance(small: Path) -> None:
    for name in [f"pope_{s}.jsonl" for s in bm.SETTINGS] + ["train.jsonl"]:
        rows = read_jsonl(small / name)
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        for r in rows:
            m = QUESTION_RE.match(r["text"])
            assert m and m.group(2) in bm.CATEGORIES and m.group(1) == bm.article_for(m.group(2))
            assert parse_object(r["text"]) == m.group(2)
        for qs in questions_by_image(rows).values():
            assert [label for _, label in qs] == ["yes", "no"] * 3  # POPE interleaving, 3 + 3
            assert len({obj for obj, _ in qs}) == 6


def _present(root: Path) -> dict[str, set[str]]:
    return {r["image"]: {o["category"] for o in r["objects"]} for r in read_jsonl(root / "boxes.jsonl")}


def test_positives_present_negatives_absent_same_positives(medium: Path) -> None:
    present = _present(medium)
    positives_per_setting = []
    for setting in bm.SETTINGS:
        qs = questions_by_image(read_jsonl(medium / f"pope_{setting}.jsonl"))
        positives_per_setting.append({img: [o for o, l in q if l == "yes"] for img, q in qs.items()})
        for img, q in qs.items():
            assert all((obj in present[img]) == (label == "yes") for obj, label in q), (setting, img)
    assert positives_per_setting[0] == positives_per_setting[1] == positives_per_setting[2]


def test_popular_negatives_are_most_frequent_absent(medium: Path) -> None:
    present = _present(medium)
    eval_sets = [cats for img, cats in present.items() if img.startswith("eval_")]
    freq = Counter(c for cats in eval_sets for c in cats)
    order = sorted(bm.CATEGORIES, key=lambda c: (-freq[c], c))
    for img, q in questions_by_image(read_jsonl(medium / "pope_popular.jsonl")).items():
        negatives = [o for o, l in q if l == "no"]
        assert negatives == [c for c in order if c not in present[img]][:3]


def test_adversarial_negatives_co_occur_most(medium: Path) -> None:
    present = _present(medium)
    co: dict[str, Counter[str]] = {c: Counter() for c in bm.CATEGORIES}
    for img, cats in present.items():
        if img.startswith("eval_"):
            for a in cats:
                co[a].update(cats - {a})
    n_fallback = 0
    for img, q in questions_by_image(read_jsonl(medium / "pope_adversarial.jsonl")).items():
        chosen: list[str] = []
        for (pos, _), (neg, _) in zip(q[0::2], q[1::2]):
            candidates = [c for c in bm.CATEGORIES if co[pos][c] > 0 and c not in present[img] and c not in chosen]
            if candidates:
                best = max(co[pos][c] for c in candidates)
                assert co[pos][neg] == best and neg == min(c for c in candidates if co[pos][c] == best)
            else:  # POPE falls back to a random absent object
                n_fallback += 1
                assert neg not in present[img] and neg not in chosen
            chosen.append(neg)
    assert n_fallback < 10
    # Adversarial negatives co-occur with the image's objects more than random ones do.
    def mean_co(setting: str) -> float:
        vals = [sum(co[p][o] for p in present[img]) for img, q in
                questions_by_image(read_jsonl(medium / f"pope_{setting}.jsonl")).items() for o, l in q if l == "no"]
        return float(np.mean(vals))
    assert mean_co("adversarial") > mean_co("random")


def test_random_negatives_vary_and_train_uses_random(medium: Path) -> None:
    rows = read_jsonl(medium / "pope_random.jsonl")
    negatives = Counter(parse_object(r["text"]) for r in rows if r["label"] == "no")
    assert len(negatives) >= 12  # spread over many categories, unlike popular
    present = _present(medium)
    for img, q in questions_by_image(read_jsonl(medium / "train.jsonl")).items():
        assert all((o in present[img]) == (l == "yes") for o, l in q)


def test_colour_does_not_identify_category() -> None:
    """Instance colours are drawn from one palette independently of the category."""
    colours: dict[str, Counter] = {c: Counter() for c in bm.CATEGORIES}
    for i in range(400):
        for obj in bm.sample_scene(0, "train", i, 64).objects:
            colours[obj.category][obj.color] += 1
    for cat, counter in colours.items():
        assert len(counter) >= 8, cat  # most palette colours occur for every category
        assert max(counter.values()) / sum(counter.values()) < 0.3, cat


def test_category_sheet_renders(tmp_path: Path) -> None:
    path = bm.category_sheet(tmp_path / "cats.png", per_category=2, zoom=1)
    with Image.open(path) as im:
        assert im.size == (128, 64 * len(bm.CATEGORIES))
        assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 50
