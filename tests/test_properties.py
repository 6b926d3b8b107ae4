"""Property-based tests (hypothesis): invariants of the core, each against an independent reference.

- The POPE answer rule against a second implementation of POPE's ``evaluate.py`` written here as a
  character scanner (no ``split``), on arbitrary strings; the strict rule likewise.
- The feature store's round trip: arbitrary rows (OK and error rows; scalar, list and text fields)
  and arrays (one ragged on its last axis), added in any order, in any chunk size, with a resume in
  the middle, read back equal in expected-id order.
- Every statistic of ``analysis/stats.py`` on random data against a formula written here (never the
  library the function wraps), plus bounds that follow from the bootstrap being a resample of images.
- Concentration metrics: invariances that hold by definition (scaling, transposing or flipping map and
  grid together, relabelling mass outside the selected tokens, moving mass outside a box).

Example counts are small and the runs derandomized, so the file is deterministic and cheap (CI runs it).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vrp_utils.analysis import concentration as C
from vrp_utils.analysis import stats as S
from vrp_utils.data.pope import AnswerParseError, parse_answer
from vrp_utils.extract.store import FeatureStore, store_identity

settings.register_profile(
    "vrp", max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
#: benchmarks/mutation.sh runs these tests once per mutant: fewer examples (set VRP_HYPOTHESIS_PROFILE).
settings.register_profile("mutation", parent=settings.get_profile("vrp"), max_examples=15)
settings.load_profile(os.environ.get("VRP_HYPOTHESIS_PROFILE", "vrp"))
_BUDGET = settings.default.max_examples
#: Store round trips write files: fewer examples.
STORE = settings(max_examples=max(5, _BUDGET * 5 // 12))
#: Bootstrap-backed statistics: fewer examples, few resamples.
STATS = settings(max_examples=max(5, _BUDGET * 2 // 3))
N_BOOT = 30


# ------------------------------------------------------------------------------------------------
# The POPE answer rule
# ------------------------------------------------------------------------------------------------


def pope_reference(text: str) -> str:
    """POPE's ``evaluate.py`` rule, re-implemented as one pass over the characters.

    The script keeps ``text.split('.')[0]`` when there is a '.', deletes ',', splits on ' ' and
    answers "no" iff a word is exactly ``No``, ``no`` or ``not``. Here: read characters until the
    first '.', skip commas, end a word at each single space (so other whitespace stays inside a word).
    """
    words, word = [], []
    for char in text:
        if char == ".":
            break
        if char == ",":
            continue
        if char == " ":
            words.append("".join(word))
            word = []
        else:
            word.append(char)
    words.append("".join(word))
    negations = {"No", "no", "not"}
    return "no" if any(w in negations for w in words) else "yes"


def strict_reference(text: str) -> str | None:
    """The strict rule: first whitespace-delimited token, word characters kept, lowercased, yes/no."""
    token = ""
    for char in text:
        if char.isspace():
            if token:
                break
            continue
        token += char
    kept = "".join(c for c in token if c.isalnum() or c == "_").lower()
    return kept if kept in ("yes", "no") else None


#: Pieces that matter to the rule (negations in every case, separators, look-alikes) mixed with any text.
ANSWER_PIECES = st.sampled_from([
    "No", "no", "not", "NO", "Not", "NOT", "Nope", "nо",  # the last has a Cyrillic "о"
    "Yes", "yes", "YES", "there", "is", "a", "cat",
    " ", "  ", ".", ",", ", ", ". ", "!", "?", ";", ":", "'", '"', "\n", "\t", "\r", "\u00a0", "\u3000", "_",
    "…", "。", "é", "😀", "İ", "ß",
])
ANSWERS = st.one_of(
    st.lists(ANSWER_PIECES | st.text(max_size=4), max_size=12).map("".join),
    st.text(),
)


@given(ANSWERS)
@example("No\n")  # the quirks, always tried (the mutation profile draws few examples)
@example("No, I don't think so")
@example("Yes. No.")
@example("Not,no")
def test_pope_rule_equals_an_independent_implementation(text):
    assert parse_answer(text, "pope") == pope_reference(text)


@given(ANSWERS, ANSWERS)
def test_pope_rule_reads_only_the_first_sentence(first, rest):
    assume("." not in first)
    assert parse_answer(first + "." + rest, "pope") == parse_answer(first, "pope")


@given(ANSWERS)
def test_pope_rule_ignores_commas(text):
    assert parse_answer(text, "pope") == parse_answer(text.replace(",", ""), "pope")


@given(ANSWERS)
@example("  No\n")
@example("YES!")
@example("")
@example("Yesterday")
def test_strict_rule_equals_an_independent_implementation(text):
    expected = strict_reference(text)
    assert parse_answer(text, "strict", on_fail="none") == expected
    if expected is None:
        with pytest.raises(AnswerParseError):
            parse_answer(text, "strict")
    else:
        assert parse_answer(text, "strict") == expected


# ------------------------------------------------------------------------------------------------
# The feature store's round trip
# ------------------------------------------------------------------------------------------------

MANIFEST = store_identity("model@p", "data@p", {"k": 1}, "props-v1")
FINITE = st.floats(allow_nan=False, width=64)
SAFE_INT = st.integers(-(2**53), 2**53)  # exact through pandas' float64 for columns with nulls


@st.composite
def store_examples(draw):
    """Expected ids, and per id either an OK row (record + arrays) or an error row; an add order."""
    ids = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8, unique=True))
    layers, width = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rows = {}
    for example_id in ids:
        record = {
            "score": draw(FINITE),
            "count": draw(SAFE_INT),
            "text": draw(st.text(max_size=8)),
            "tokens": draw(st.lists(FINITE, max_size=4)),
            "flag": draw(st.booleans()),
        }
        if draw(st.booleans()) and draw(st.booleans()):  # about a quarter are error rows
            kept = draw(st.sets(st.sampled_from(sorted(record))))
            rows[example_id] = ("error", draw(st.sampled_from(["parse_failed", "oom", "é"])),
                                {k: record[k] for k in kept})
            continue
        n_tokens = draw(st.integers(1, 5))
        arrays = {
            # any float16 bit pattern (NaN and inf included): compared bit for bit
            "attention": draw(hnp.arrays(np.uint16, (layers, 2, n_tokens))).view(np.float16),
            "hidden_last_prompt": draw(hnp.arrays(np.float32, (layers, width),
                                                  elements=st.floats(width=32, allow_nan=False))),
        }
        rows[example_id] = ("ok", record, arrays)
    order = draw(st.permutations(ids))
    chunk_sizes = (draw(st.integers(1, len(ids) + 1)), draw(st.integers(1, len(ids) + 1)))
    stop = draw(st.integers(0, len(ids)))  # the first writer is closed after this many adds
    return ids, rows, order, chunk_sizes, stop


def _add(writer, example_id, row):
    if row[0] == "ok":
        writer.add({"id": example_id, **row[1]}, row[2])
    else:
        writer.add_error(example_id, row[1], row[2])


def _expect_equal(actual, expected, what):
    if isinstance(expected, list):
        assert list(actual) == expected, what
    elif isinstance(expected, float) and isinstance(actual, float):
        assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), what
    else:
        assert actual == expected, what


@STORE
@given(store_examples())
def test_store_round_trip_in_any_chunking_order_and_resume(example):
    ids, rows, order, chunk_sizes, stop = example
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=chunk_sizes[0])
        for example_id in order[:stop]:
            _add(writer, example_id, rows[example_id])
        writer.close()
        writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=chunk_sizes[1])
        assert writer.done_ids() == set(order[:stop])
        for example_id in order[stop:]:
            _add(writer, example_id, rows[example_id])
        store = writer.finalize()
        store.verify()
        reopened = FeatureStore.open(path, expect=MANIFEST)

        table = reopened.table(include_errors=True)
        assert list(table["id"]) == ids  # expected-id order, whatever the add order
        ok_ids = [i for i in ids if rows[i][0] == "ok"]
        assert list(reopened.table()["id"]) == ok_ids
        assert reopened.n_ok == len(ok_ids) and reopened.n_errors == len(ids) - len(ok_ids)
        n_ok = 0
        for _, line in table.iterrows():
            kind, *data = rows[line["id"]]
            if kind == "error":
                reason, record = data
                assert line["error"] == reason and line["array_index"] == -1
                for field, value in record.items():
                    _expect_equal(line[field], value, field)
                continue
            record, _ = data
            assert pd.isna(line["error"]) and line["array_index"] == n_ok
            n_ok += 1
            for field, value in record.items():
                _expect_equal(line[field], value, field)
        if not ok_ids:
            assert reopened.array_names == []
            return
        assert reopened.array_names == ["attention", "hidden_last_prompt"]
        attention, hidden = reopened.attention(), reopened.hidden()
        lengths = [rows[i][2]["attention"].shape[-1] for i in ok_ids]
        assert attention.shape[0] == hidden.shape[0] == len(ok_ids)
        assert attention.shape[-1] == max(lengths)
        np.testing.assert_array_equal(reopened.lengths("attention"), lengths)
        np.testing.assert_array_equal(reopened.table()["n_image_tokens"], lengths)
        for j, example_id in enumerate(ok_ids):
            arrays = rows[example_id][2]
            n = arrays["attention"].shape[-1]
            np.testing.assert_array_equal(attention[j, ..., :n].view(np.uint16), arrays["attention"].view(np.uint16))
            assert not attention[j, ..., n:].view(np.uint16).any()  # padding is +0.0
            np.testing.assert_array_equal(hidden[j], arrays["hidden_last_prompt"])
        assert attention.dtype == np.float16 and hidden.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Statistics against independent formulas
# ------------------------------------------------------------------------------------------------


@st.composite
def scored_examples(draw, min_size=4, max_size=40, ties=True):
    """Score, 0/1 label and image ids (at least 2 images), both classes and a non-constant score."""
    n = draw(st.integers(min_size, max_size))
    values = st.integers(-3, 3).map(float) if ties and draw(st.booleans()) else st.floats(-1e3, 1e3)
    score = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    correct = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    groups = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)))
    assume(len(set(groups.tolist())) >= 2)
    return score, correct, groups


@STATS
@given(scored_examples())
def test_point_biserial_is_the_mean_difference_formula(data):
    score, correct, groups = data
    assume(0 < correct.sum() < len(correct) and np.ptp(score) > 0)
    est = S.point_biserial(score, correct, groups, n_boot=N_BOOT)
    # r_pb = (M1 - M0) / s_n * sqrt(p q), s_n the population SD of the score: not a Pearson formula.
    p = correct.mean()
    m1, m0 = score[correct == 1].mean(), score[correct == 0].mean()
    s_n = math.sqrt(((score - score.mean()) ** 2).mean())
    assume(s_n > 1e-9 * max(1.0, abs(score).max()))
    expected = (m1 - m0) / s_n * math.sqrt(p * (1 - p))
    assert est.value == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert est.n == len(score) and est.n_groups == len(set(groups.tolist()))
    assert est.details["n_correct"] == int(correct.sum())
    assert -1 <= est.ci_low <= est.ci_high <= 1


@STATS
@given(scored_examples())
def test_auroc_is_mann_whitney_u_over_the_pairs(data):
    score, correct, groups = data
    n1, n0 = int(correct.sum()), int((1 - correct).sum())
    assume(n1 and n0)
    est = S.auroc(score, correct, groups, n_boot=N_BOOT)
    u = scipy.stats.mannwhitneyu(score[correct == 1], score[correct == 0]).statistic
    assert est.value == pytest.approx(u / (n1 * n0), abs=1e-12)
    assert est.details["n_correct"] == n1 and est.details["n_wrong"] == n0
    # Flipping the score's sign mirrors the AUROC.
    assert S.auroc(-score, correct, groups, n_boot=N_BOOT).value == pytest.approx(1 - est.value, abs=1e-12)


@STATS
@given(scored_examples())
def test_auroc_bootstrap_replicates_equal_the_pair_count_on_resampled_images(data):
    """One resample of images, made explicit, against the vectorised replicate (hand pair count)."""
    score, correct, groups = data
    codes = np.unique(groups, return_inverse=True)[1]
    k = codes.max() + 1
    pairs, pos, neg = S._auroc_terms(score, correct.astype(np.int8), codes, k)
    counts = np.random.default_rng(len(score)).integers(0, 3, size=k).astype(float)
    rows = np.repeat(np.arange(len(score)), counts[codes].astype(int))
    s, y = score[rows], correct[rows]
    positives, negatives = s[y == 1], s[y == 0]
    expected = math.nan
    if len(positives) and len(negatives):
        diff = positives[:, None] - negatives[None, :]
        expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    got = float(S._auroc_from_terms(pairs, pos, neg, counts))
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


@st.composite
def paired_examples(draw):
    n = draw(st.integers(2, 40))
    before = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    after = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    groups = np.array(draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=n, max_size=n)))
    assume(len(set(groups.tolist())) >= 2)
    return before, after, groups


@STATS
@given(paired_examples())
def test_paired_accuracy_change_and_mcnemar_against_the_binomial_test(data):
    before, after, groups = data
    est = S.paired_accuracy_change(before, after, groups, n_boot=N_BOOT)
    n10 = sum(1 for b, a in zip(before, after) if b == 1 and a == 0)
    n01 = sum(1 for b, a in zip(before, after) if b == 0 and a == 1)
    assert est.value == pytest.approx((n01 - n10) / len(before), abs=1e-12)
    assert est.details["n_correct_to_wrong"] == n10 and est.details["n_wrong_to_correct"] == n01
    assert est.details["accuracy_before"] == pytest.approx(before.sum() / len(before))
    assert est.details["accuracy_after"] == pytest.approx(after.sum() / len(after))
    expected_p = 1.0 if n10 + n01 == 0 else scipy.stats.binomtest(n10, n10 + n01, 0.5).pvalue
    assert est.p_value == pytest.approx(expected_p, rel=1e-9)
    # A resample of images is a weighted mean of per-image changes: the CI lies within their range.
    per_image = [(after[groups == g] - before[groups == g]).mean() for g in np.unique(groups)]
    assert min(per_image) - 1e-12 <= est.ci_low <= est.ci_high <= max(per_image) + 1e-12


@STATS
@given(scored_examples(min_size=2, ties=False))
def test_mean_estimate_value_and_its_interval_within_the_image_means(data):
    values, _, groups = data
    est = S.mean_estimate(values, groups, n_boot=N_BOOT)
    assert est.value == pytest.approx(math.fsum(values) / len(values), rel=1e-9, abs=1e-9)
    per_image = [values[groups == g].mean() for g in np.unique(groups)]
    tol = 1e-9 * max(1.0, abs(values).max())
    assert min(per_image) - tol <= est.ci_low <= est.ci_high <= max(per_image) + tol
    assert est.n == len(values) and est.p_value is None


def holm_reference(p: list[float | None]) -> list[float]:
    """Holm's step-down by hand: the i-th smallest of m p-values times (m - i), made monotone, capped at 1."""
    family = [(v, i) for i, v in enumerate(p) if v is not None and not math.isnan(v)]
    family.sort()
    m, out, running = len(family), [math.nan] * len(p), 0.0
    for rank, (value, i) in enumerate(family):
        running = max(running, min(1.0, (m - rank) * value))
        out[i] = running
    return out


@given(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.05, None, math.nan])), max_size=12))
def test_holm_equals_the_hand_step_down(p):
    got = S.holm(p)
    expected = holm_reference(p)
    assert got.shape == (len(p),)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert np.array_equal(np.isnan(got), np.isnan(expected))


@given(st.lists(st.floats(0, 1), min_size=1, max_size=5), st.sampled_from([-0.1, 1.5, math.inf, -math.inf]))
def test_holm_rejects_values_outside_zero_one(p, bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.holm([*p, bad])


# ------------------------------------------------------------------------------------------------
# Concentration: invariances that hold by definition
# ------------------------------------------------------------------------------------------------


@st.composite
def grids(draw, max_side=6):
    return draw(st.integers(1, max_side)), draw(st.integers(1, max_side))


@st.composite
def distinct_maps(draw, grid=None):
    """A map without ties (so every selection is by value alone) on a grid, summing to 1."""
    rows, cols = grid if grid is not None else draw(grids())
    s = rows * cols
    weights = draw(st.lists(st.integers(1, 10**6), min_size=s, max_size=s, unique=True))
    p = np.array(weights, dtype=np.float64)
    return p / p.sum(), (rows, cols)


@st.composite
def raw_rows(draw):
    """Stored rows [1, layers, heads, steps, tokens] (positive) with the example's real token count."""
    layers, heads, steps, tokens = (draw(st.integers(1, 3)) for _ in range(4))
    shape = (1, layers, heads, steps, tokens)
    rows = draw(hnp.arrays(np.float64, shape, elements=st.floats(1e-3, 1.0)))
    count = draw(st.integers(1, tokens))
    return rows, np.array([count])


@given(raw_rows(), st.integers(-20, 20), st.sampled_from(C.AGGREGATES))
def test_scaling_the_rows_by_a_power_of_two_changes_no_map_and_no_metric(data, exponent, aggregate):
    rows, counts = data
    lengths = np.array([rows.shape[3]])
    base = C.attention_maps(rows, counts, aggregate, answer_lengths=lengths)
    scaled = C.attention_maps(rows * 2.0**exponent, counts, aggregate, answer_lengths=lengths)
    np.testing.assert_array_equal(scaled.maps, base.maps)  # powers of two scale exactly
    s = int(counts[0])
    for layer in range(rows.shape[1]):
        a = C.map_metrics(base.maps[0, layer, :s], (1, s))
        b = C.map_metrics(scaled.maps[0, layer, :s], (1, s))
        assert a == pytest.approx(b, nan_ok=True)


@given(raw_rows(), st.floats(1e-3, 1e3), st.sampled_from(C.AGGREGATES))
def test_scaling_the_rows_by_any_factor_changes_the_maps_by_rounding_only(data, factor, aggregate):
    rows, counts = data
    lengths = np.array([rows.shape[3]])
    base = C.attention_maps(rows, counts, aggregate, answer_lengths=lengths).maps
    scaled = C.attention_maps(rows * factor, counts, aggregate, answer_lengths=lengths).maps
    np.testing.assert_allclose(scaled, base, rtol=1e-12, atol=1e-15)
    s = int(counts[0])
    np.testing.assert_allclose(base[0, :, :s].sum(-1), 1.0, rtol=1e-12)
    assert not base[0, :, s:].any()  # padded tokens get no mass


@given(raw_rows(), st.data())
def test_per_row_map_ignores_the_scale_of_each_head(data, draw):
    rows, counts = data
    heads = rows.shape[2]
    factors = np.array(draw.draw(st.lists(st.floats(1e-3, 1e3), min_size=heads, max_size=heads)))
    base = C.attention_maps(rows, counts, "per_row").maps
    scaled = C.attention_maps(rows * factors[None, None, :, None, None], counts, "per_row").maps
    np.testing.assert_allclose(scaled, base, rtol=1e-12, atol=1e-15)


def _expected_maps(rows, count, aggregate, length):
    """Maps by definition, per layer, with plain loops over heads and steps."""
    _, layers, heads, _, _ = rows.shape
    out = []
    for layer in range(layers):
        if aggregate == "step0":
            raw = sum(rows[0, layer, h, 0, :count] for h in range(heads)) / heads
        elif aggregate == "answer":
            raw = sum(rows[0, layer, h, t, :count] for h in range(heads) for t in range(length)) / (heads * length)
        else:
            raw = sum(rows[0, layer, h, 0, :count] / rows[0, layer, h, 0, :count].sum() for h in range(heads)) / heads
        out.append(raw / raw.sum())
    return out


@given(raw_rows(), st.sampled_from(C.AGGREGATES), st.data())
def test_maps_equal_their_definition(data, aggregate, draw):
    rows, counts = data
    length = draw.draw(st.integers(1, rows.shape[3]))
    maps = C.attention_maps(rows, counts, aggregate, answer_lengths=np.array([length])).maps
    s = int(counts[0])
    for layer, expected in enumerate(_expected_maps(rows, s, aggregate, length)):
        np.testing.assert_allclose(maps[0, layer, :s], expected, rtol=1e-12)


def _components_4(picked: np.ndarray) -> int:
    """4-connected components of a boolean grid, by flood fill."""
    rows, cols = picked.shape
    seen, components = set(), 0
    for r0 in range(rows):
        for c0 in range(cols):
            if not picked[r0, c0] or (r0, c0) in seen:
                continue
            components += 1
            stack = [(r0, c0)]
            seen.add((r0, c0))
            while stack:
                r, c = stack.pop()
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < rows and 0 <= cc < cols and picked[rr, cc] and (rr, cc) not in seen:
                        seen.add((rr, cc))
                        stack.append((rr, cc))
    return components


def _dbscan_reference(points: np.ndarray) -> int:
    """DBSCAN's cluster count by its definition: core points linked within eps, by flood fill."""
    k = len(points)
    near = [[i for i in range(k) if np.hypot(*(points[i] - points[j])) <= C.DBSCAN_EPS] for j in range(k)]
    core = [len(near[i]) >= C.DBSCAN_MIN_SAMPLES for i in range(k)]
    seen, clusters = set(), 0
    for start in range(k):
        if not core[start] or start in seen:
            continue
        clusters += 1
        stack = [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            for j in near[i]:
                if core[j] and j not in seen:
                    seen.add(j)
                    stack.append(j)
    return clusters


@given(distinct_maps(), st.floats(0.01, 0.99))
def test_ck_text_and_top_tokens_against_a_sort_and_a_flood_fill(data, mass):
    p, (rows, cols) = data
    order = sorted(range(len(p)), key=lambda i: -p[i])
    picked, total = [], 0.0
    for i in order:
        picked.append(i)
        total += p[i]
        if total >= mass - 1e-12:
            break
    assert sorted(C.tokens_to_mass(p, mass).tolist()) == sorted(picked)
    grid = np.zeros(rows * cols, dtype=bool)
    grid[picked] = True
    assert C.ck_text(p, (rows, cols), mass) == _components_4(grid.reshape(rows, cols)) - 1
    k = math.ceil(0.1 * rows * cols - 1e-9)
    assert C.top_tokens(p, k).tolist() == order[:k]
    assert C.map_metrics(p, (rows, cols))["top10_mass"] == pytest.approx(p[order[:k]].sum())
    points = np.array([divmod(i, cols) for i in order[:k]], dtype=float)
    assert C.ck_dbscan(p, (rows, cols)) == _dbscan_reference(points)


@given(distinct_maps(), st.sampled_from(["transpose", "flip_rows", "flip_cols", "rotate"]))
def test_connectivity_metrics_invariant_to_grid_symmetries(data, how):
    p, (rows, cols) = data
    square = p.reshape(rows, cols)
    moved = {"transpose": square.T, "flip_rows": square[::-1], "flip_cols": square[:, ::-1],
             "rotate": np.rot90(square)}[how]
    q = np.ascontiguousarray(moved).ravel()
    a, b = C.map_metrics(p, (rows, cols)), C.map_metrics(q, moved.shape)
    assert b["ck_text"] == a["ck_text"] and b["ck_dbscan"] == a["ck_dbscan"]
    for name in ("entropy", "entropy_norm", "top10_mass", "gini"):
        assert b[name] == pytest.approx(a[name], rel=1e-12, abs=1e-15, nan_ok=True)


@given(distinct_maps(), st.randoms(use_true_random=False))
def test_relabelling_mass_outside_the_selected_tokens_changes_no_connectivity_metric(data, rng):
    p, grid = data
    selected = set(C.tokens_to_mass(p, 0.3).tolist()) | set(C.top_tokens(p, C.top_count(len(p))).tolist())
    outside = [i for i in range(len(p)) if i not in selected]
    shuffled = outside[:]
    rng.shuffle(shuffled)
    q = p.copy()
    q[shuffled] = p[outside]
    a, b = C.map_metrics(p, grid), C.map_metrics(q, grid)
    assert b["ck_text"] == a["ck_text"] and b["ck_dbscan"] == a["ck_dbscan"]
    assert b["top10_mass"] == a["top10_mass"]


@st.composite
def rows_with_box(draw):
    s = draw(st.integers(2, 30))
    weights = np.array(draw(st.lists(st.floats(1e-3, 1e3), min_size=s, max_size=s)))
    inside = np.array(draw(st.lists(st.booleans(), min_size=s, max_size=s)))
    assume(inside.any() and not inside.all())
    return weights, inside


def _one_map(weights):
    rows = weights[None, None, None, None, :]  # one example, layer, head, step
    return C.attention_maps(rows, np.array([len(weights)])).maps[0, 0]


@given(rows_with_box(), st.data())
def test_inbox_mass_is_the_box_share_and_ignores_moves_outside_it(data, draw):
    weights, inside = data
    mass, chance = C.inbox_mass(_one_map(weights), inside)
    assert mass == pytest.approx(math.fsum(weights[inside]) / math.fsum(weights), rel=1e-12)
    assert chance == pytest.approx(inside.sum() / len(inside), rel=1e-15)
    # Redistribute the mass outside the box (same total): in-box mass does not move.
    out = np.flatnonzero(~inside)
    shares = np.array(draw.draw(st.lists(st.floats(1e-3, 1.0), min_size=len(out), max_size=len(out))))
    moved = weights.copy()
    moved[out] = shares / shares.sum() * weights[out].sum()
    assert C.inbox_mass(_one_map(moved), inside)[0] == pytest.approx(mass, rel=1e-9)
    # Adding mass outside changes it only through renormalisation: share = in / (in + out').
    extra = draw.draw(st.floats(0.0, 1e3))
    grown = weights.copy()
    grown[out[0]] += extra
    expected = weights[inside].sum() / (weights.sum() + extra)
    assert C.inbox_mass(_one_map(grown), inside)[0] == pytest.approx(expected, rel=1e-9)


@given(distinct_maps())
def test_entropy_and_gini_against_their_formulas(data):
    p, grid = data
    s = len(p)
    m = C.map_metrics(p, grid)
    assert m["entropy"] == pytest.approx(-math.fsum(v * math.log(v) for v in p), rel=1e-9, abs=1e-12)
    # Gini as mean absolute difference over twice the mean.
    mad = np.abs(p[:, None] - p[None, :]).sum() / (s * s)
    assert m["gini"] == pytest.approx(mad / (2 * p.mean()), rel=1e-9, abs=1e-12)
    if s > 1:
        assert m["entropy_norm"] == pytest.approx(m["entropy"] / math.log(s), rel=1e-12)
    else:
        assert math.isnan(m["entropy_norm"])

