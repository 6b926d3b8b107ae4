"""Task rules and the signals for any short answer (issue 25), on real tiny models of all three families.

- each task's rule: presence is POPE's parse, counting is ``count_correct``; a sampled answer's class is the
  normalised one ("2" = "two"), so S_SC is a majority over normalised answers;
- what a first token decides under the counting rule (``"none"`` or open), by a table of cases;
- the answer margin (top-1 minus top-2 logit at the first answer token) equals |yes-no margin| when yes and no
  are the top two tokens (lifted there by a hook on the output layer) and differs where they are not;
- the exact S_SC limit through class probabilities: for presence the multinomial equals today's binomial of q;
  for counting it is the multinomial of the class probabilities, which match the sampled class frequencies.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch

from vrp_utils.analysis import consistency
from vrp_utils.data.counts import can_become_count, count_correct, first_token_count
from vrp_utils.data.pope import load_benchmark, parse_answer
from vrp_utils.data.tasks import TASKS, get_task, task_rules
from vrp_utils.extract.engine import ExtractionSettings, Intervention, extract, run_batch

torch.set_num_threads(1)
ZOO_MODELS = ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")
#: float32 log-softmax of two summation orders (see test_engine.FLOAT_TOL); the lift adds 100 to two logits.
FLOAT_TOL = 1e-4


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize(("answer", "label", "rule"), [
    ("Yes, there is.", "yes", "pope"), ("No.", "no", "pope"), ("Not really", "no", "pope"), ("Maybe", "no", "strict"),
])
def test_presence_is_popes_parse(answer, label, rule):
    presence = get_task("presence")
    assert presence.correct(answer, label, rule) == (parse_answer(answer, rule=rule, on_fail="none") == label)
    assert presence.answer_class(answer, rule) == (parse_answer(answer, rule=rule, on_fail="none") or "none")


@pytest.mark.parametrize("answer", ["2", "two", "Two.", " 2 ", "3", "2 apples", "", "yes", "twenty"])
def test_counting_is_count_correct_and_classes_are_normalised(answer):
    counting = get_task("counting")
    assert counting.correct(answer, "2", "pope") == count_correct(answer, 2)
    assert counting.answer_class(answer, "pope") in {"2", "3", "20", "none"}
    assert consistency.s_sc([[counting.answer_class(a, "pope") for a in ("2", "two", "Two.", "3")]], 4).tolist() == [0.75]


def test_every_task_has_a_declared_rule_in_the_store_identity_and_an_unknown_one_is_named():
    from vrp_utils.extract.engine import ExtractionSettings, store_settings

    assert set(task_rules()) == set(TASKS) == {"presence", "counting"}
    assert store_settings(ExtractionSettings())["task_rules"] == task_rules()
    assert get_task(None).name == "presence"
    with pytest.raises(ValueError, match="unknown task 'spatial'; choose from 'presence', 'counting'"):
        get_task("spatial")


@pytest.mark.parametrize(("text", "is_end", "decided"), [
    ("", True, "none"),  # the end token: an empty answer is no count
    ("There", False, "none"), ("yes", False, "none"), ("2a", False, "none"), ("twenty-", False, "none"),
    ("seventy", False, "none"), ("2 apples", False, "none"), ("2..", False, "none"),
    ("2", False, None), ("two", False, None), ("Two.", False, None), ("tw", False, None), (" ", False, None),
    ("seven", False, None), ("2 ", False, None), ("007", False, None), ("T", False, None), ("!", False, "none"),
])
def test_what_a_first_token_decides_under_the_counting_rule(text, is_end, decided):
    assert first_token_count(text, is_end) == decided
    assert get_task("counting").first_token(text, is_end) == decided
    if not is_end:
        assert can_become_count(text) == (decided is None)


# ------------------------------------------------------------------------------------------- answer margin
@contextmanager
def _lift(model, token_ids: list[int], by: float):
    """Add ``by`` to the output layer's logits of ``token_ids`` at every position (yes and no become the top two)."""
    def hook(module, args, output):
        output = output.clone()
        output[..., token_ids] += by
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_answer_margin_is_the_yes_no_margin_when_yes_and_no_lead(name, tiny_loaded, tiny_benchmark, tmp_path):
    loaded = tiny_loaded(name)
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(8))
    yes, no = loaded.adapter.yes_no_token_ids(loaded.processor.tokenizer)
    assert len(yes) == len(no) == 1, (yes, no)  # one variant each, so the identity is exact
    settings = ExtractionSettings(max_new_tokens=1, batch_size=8, attention=False, hidden=False)
    plain = extract(loaded, dataset, settings, root=tmp_path, progress=False).table()
    lifted_by = Intervention({"kind": "test_lift_yes_no", "by": 100.0}, hooks=lambda model: _lift(model, yes + no, 100.0))
    lifted = extract(loaded, dataset, settings, root=tmp_path, progress=False, intervention=lifted_by).table()

    # Lifted: yes and no are the top two, the answer is one of them, and the margins agree.
    assert set(lifted["answer"]) <= {"yes", "no"}, lifted["answer"].tolist()
    np.testing.assert_allclose(lifted["answer_margin"], lifted["yes_no_margin"].abs(), atol=FLOAT_TOL)
    np.testing.assert_allclose(lifted["yes_no_margin"], plain["yes_no_margin"], atol=FLOAT_TOL)  # a common lift cancels

    # Plain: the answer margin is the reference's top-1 minus top-2, and differs where yes and no are not those two.
    with torch.no_grad():
        images = [row["image"].convert("RGB") for row in dataset]
        inputs = loaded.adapter.build_inputs(loaded.processor, images, list(dataset["question"]))
        logits = loaded.model(**loaded.adapter.model_inputs(inputs)).logits[:, -1].float()
    top = logits.topk(2, dim=-1)
    np.testing.assert_allclose(plain["answer_margin"], (top.values[:, 0] - top.values[:, 1]).numpy(), atol=FLOAT_TOL)
    others = np.array([set(ids.tolist()) != set(yes + no) for ids in top.indices])
    assert others.any(), "yes and no lead every example: the 'differs' half checks nothing"
    gap = (plain["answer_margin"] - plain["yes_no_margin"].abs()).abs().to_numpy()
    assert (gap[others] > 1e-3).all(), gap


# ------------------------------------------------------------------------------------- the exact S_SC limit
def _sampled_frame(loaded, images, questions, tasks, n_samples: int, resolve: int) -> pd.DataFrame:
    settings = consistency.pool_settings(n_samples, 1.0, 1.0, seed=5)
    settings = type(settings)(**{**settings.__dict__, "resolve_samples": resolve, "max_new_tokens": 3})
    records = []
    for start in range(0, len(images), 8):
        part = slice(start, start + 8)
        records += run_batch(loaded, images[part], questions[part], settings, tasks[part]).records
    frame = pd.DataFrame.from_records(records)
    frame["task"] = tasks
    return frame


def test_presence_class_probabilities_give_todays_binomial_limit(tiny_loaded, tiny_benchmark):
    split = load_benchmark("random", tiny_benchmark).select(range(12))
    images = [row["image"].convert("RGB") for row in split]
    frame = _sampled_frame(tiny_loaded("zoo-qwen2-vl"), images, list(split["question"]), ["presence"] * 12, 10, 8)
    q = consistency.exact_q(frame)["q"].to_numpy()
    probs = consistency.class_probs(frame)
    assert all(set(p) <= {"yes", "no"} for p in probs)
    matrix = np.array([[p.get("yes", 0.0), p.get("no", 0.0)] for p in probs])
    np.testing.assert_allclose(matrix[:, 0], q, atol=1e-12)
    assert ((q > 0) & (q < 1)).any(), q  # not every input certain
    for k in (1, 2, 5, 10, 20):
        np.testing.assert_allclose(consistency.expected_s_sc_multiclass(matrix, k), consistency.expected_s_sc(q, k), atol=1e-12)
    out = consistency.consistency_frame(frame.assign(distinct_id=range(12), image_file="", label="yes", object="",
                                                     parsed="yes", correct=True, pool_greedy_answer=frame["answer"]),
                                        5, [1, 5])
    np.testing.assert_array_equal(out["s_sc_expected"], consistency.expected_s_sc(q, 5))  # presence: the binomial itself
    np.testing.assert_array_equal(out["s_sc_limit"], consistency.limit_s_sc(q))


def test_counting_limit_is_at_most_one_when_class_probabilities_drift_above_one():
    frame = pd.DataFrame({"task": ["counting", "counting", "presence"]})
    probs = [{"2": 1.0000001, "3": 0.0}, {"1": 0.25, "4": 0.5, "none": 0.25}, {"yes": 0.7, "no": 0.3}]
    limit = consistency.limit_s_sc_by_task(frame, np.array([np.nan, np.nan, 0.7]), probs)
    assert (limit <= 1.0).all(), limit
    np.testing.assert_array_equal(limit, [1.0, 0.5, 0.7])


def test_counting_limit_is_the_multinomial_of_class_probabilities_that_match_the_samples(tiny_loaded, tiny_benchmark):
    images = [p for p in sorted((tiny_benchmark / "images").glob("eval_*.png"))]
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in images for _ in range(2)]
    questions = [f"How many {o} are there in the image?" for _ in images for o in ("bananas", "trees")]
    n = 300
    frame = _sampled_frame(tiny_loaded("count-llava"), pictures, questions, ["counting"] * len(questions), n, n)
    assert {d for ds in frame["nucleus_decision"] for d in ds} <= {"none", "open"}  # a count token never decides
    probs = consistency.class_probs(frame)
    classes = {c for p in probs for c in p}
    assert classes - {"none"} and classes <= {"none", *map(str, range(21))}, classes
    for p, sampled in zip(probs, frame["sample_parsed"]):
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-6)  # float32 softmax probabilities
        freq = pd.Series(sampled).value_counts(normalize=True)
        for name in set(p) | set(freq.index):
            expected, got = p.get(name, 0.0), freq.get(name, 0.0)
            # the sample frequency and the resolve rows are two independent draws of n each
            se = np.sqrt(2 * max(expected * (1 - expected), 1e-3) / n)
            assert abs(got - expected) < 4.5 * se, (name, got, expected)
    out = consistency.consistency_frame(frame.assign(distinct_id=range(len(frame)), image_file="", label="2", object="",
                                                     parsed="2", correct=False, pool_greedy_answer=frame["answer"]),
                                        10, [1, 10])
    matrix = consistency._as_matrix(probs)
    np.testing.assert_allclose(out["s_sc_expected"], consistency.expected_s_sc_multiclass(matrix, 10), atol=0)
    np.testing.assert_allclose(out["s_sc_limit"], [max(p.values()) / sum(p.values()) for p in probs])
    assert out["q"].isna().all() and (out["expected@1"] == 1.0).all()
