"""Examples to look at: which inputs a chapter's gallery shows, and what each panel needs to draw them.

Declared before any gallery was drawn. Per model, the distinct inputs fall into four strata, right or
wrong (greedy answer against the label) by confident or unsure: confident when the absolute yes-no
margin (``yes_no_margin``, the logit of "yes" minus that of "no" at the answer's first step) is at
least the median of that model's absolute margins. From each stratum ``per_stratum`` inputs are
drawn without replacement by a generator seeded with ``seed`` (candidates in distinct-id order), so
the same seed and store give the same examples. An input without a margin is in no stratum.

The geometry comes from the family adapter through :mod:`vrp_utils.analysis.geometry` (nothing here
knows the family): a token's rectangle is its patch in the original image, so Qwen2-VL's merged 2x2
tokens cover their real pixels; masked images are built by the same plan, pixel mask and fill as the
masking pass (:mod:`vrp_utils.analysis.masking`), so they are what the model received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from vrp_utils.analysis.concentration import attention_maps
from vrp_utils.analysis.geometry import object_boxes, pixel_mask, token_boxes

STRATA = ("right, confident", "right, unsure", "wrong, confident", "wrong, unsure")


def strata(table: pd.DataFrame, confidence: str = "yes_no_margin") -> pd.Series:
    """Each row's stratum (:data:`STRATA`; ``None`` without a margin), the confidence split at the median |margin|."""
    margin = table[confidence].astype(float).abs()
    confident = margin >= margin.median()
    names = np.where(table["correct"].astype(bool), "right", "wrong")
    out = pd.Series([f"{n}, {'confident' if c else 'unsure'}" for n, c in zip(names, confident)], index=table.index, dtype=object)
    out[margin.isna()] = None
    return out


def pick_examples(table: pd.DataFrame, per_stratum: int = 1, seed: int = 0, confidence: str = "yes_no_margin") -> pd.DataFrame:
    """``per_stratum`` rows of each stratum drawn with ``seed`` (fewer where a stratum is smaller), in :data:`STRATA`
    order, with columns ``stratum`` and ``confidence`` (the absolute margin) added."""
    if per_stratum < 1:
        raise ValueError(f"per_stratum must be >= 1; got {per_stratum!r}")
    frame = table.assign(stratum=strata(table, confidence), confidence=table[confidence].astype(float).abs())
    frame = frame.sort_values("distinct_id", kind="stable")
    rng = np.random.default_rng(seed)
    parts = []
    for name in STRATA:
        candidates = frame[frame["stratum"] == name]
        if len(candidates):
            chosen = np.sort(rng.choice(len(candidates), size=min(per_stratum, len(candidates)), replace=False))
            parts.append(candidates.iloc[chosen])
    return pd.concat(parts).reset_index(drop=True) if parts else frame.iloc[:0]


def _describe(row: Any) -> dict[str, Any]:
    return {"distinct_id": int(row.distinct_id), "question": row.question, "answer": str(row.answer).strip(),
            "label": row.label, "correct": bool(row.correct), "stratum": row.stratum, "confidence": float(row.confidence)}


def attention_examples(features: Any, picked: pd.DataFrame, aggregate: str = "step0", head: int | None = None,
                       layer: int = -1) -> list[dict[str, Any]]:
    """What :func:`vrp_utils.plots.attention_gallery` draws for each picked row: the image, the map at ``layer`` over
    the image tokens, each token's patch box (the adapter's), the queried object's boxes (none for a negative)."""
    out = []
    attention = features.store.attention()
    for row in picked.itertuples(index=False):
        grid = (int(row.grid_rows), int(row.grid_cols))
        maps = attention_maps(attention[[int(row.array_index)]], np.array([row.n_image_tokens]), aggregate, head,
                              np.array([row.answer_length])).maps
        out.append({**_describe(row), "image": features.image(row.distinct_id), "weights": maps[0, layer, : grid[0] * grid[1]],
                    "token_boxes": token_boxes(features.adapter, (row.image_width, row.image_height), grid),
                    "object_boxes": object_boxes(row.boxes, row.object)})
    return out


def masked_examples(features: Any, picked: pd.DataFrame, plans: Mapping[str, Any],
                    answers: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """What :func:`vrp_utils.plots.masked_gallery` draws for each picked row: the image and the model's answer
    unmasked, then under each condition of ``plans`` (a :class:`~vrp_utils.analysis.masking.MaskPlan` each) the
    masked image as the masking pass built it and the answer from ``answers[condition]`` (a masked pass's table:
    ``distinct_id``, ``answer_masked``, ``correct_masked``). A condition that planned nothing for an input (the box
    condition on a negative question) is left out of its row."""
    from vrp_utils.analysis.masking import mask_image

    out = []
    for row in picked.itertuples(index=False):
        key = int(row.distinct_id)
        image = features.image(key)
        views = [{"condition": "unmasked", "image": image, "answer": str(row.answer).strip(), "correct": bool(row.correct)}]
        for condition, plan in plans.items():
            if key not in plan.tokens:
                continue
            mask = pixel_mask(features.adapter, image.size, plan.grids[key], plan.tokens[key])
            answer = answers[condition].set_index("distinct_id").loc[key]
            label = condition if condition == "box" else f"{condition} {plan.fraction:.0%}"
            views.append({"condition": label, "image": mask_image(image, mask, plan.fill), "tokens": plan.tokens[key],
                          "answer": str(answer["answer_masked"]).strip(), "correct": bool(answer["correct_masked"])})
        out.append({**_describe(row), "views": views})
    return out
