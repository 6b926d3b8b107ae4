"""Task rules and the signals for any short answer (issue 25), on real tiny models of all three families.

- each task's rule: presence is POPE's parse, counting is ``count_correct``; a sampled answer's class is the
  normalised one ("2" = "two"), so S_SC is a majority over normalised answers;
- what a first token decides under the counting rule (``"none"`` or open), by a table of cases;
- the answer margin (top-1 minus top-2 logit at the first answer token) equals |yes-no margin| when yes and no
  are the top two tokens (lifted there by a hook on the output layer) and differs where they are not;
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from vrp_utils.analysis import consistency
from vrp_utils.data.counts import can_become_count, count_correct, first_token_count
from vrp_utils.data.pope import load_benchmark, parse_answer
from vrp_utils.data.tasks import TASKS, get_task, task_rules
from vrp_utils.extract.engine import ExtractionSettings, Intervention, extract

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
