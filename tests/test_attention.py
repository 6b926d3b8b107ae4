"""AttentionRecorder against eager attention on real tiny random-weight LLaVA, PaliGemma and Qwen2-VL models."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

from vrp_utils.extract import attention
from vrp_utils.extract.attention import (
    CAPTURE_IMPLEMENTATIONS,
    AttentionCaptureError,
    AttentionRecorder,
    pad_key_positions,
)

torch.set_num_threads(1)

VOCAB = 100
IMAGE_TOKEN = 99
PAD = 0
TEXT_LAYERS = 2
TEXT_HEADS = 4
ROW_TOL = 1e-5
FAMILIES = ["llava", "paligemma", "qwen2_vl"]
#: Special ids the random models must not generate (an image token would change the reference forward).
SUPPRESS = [PAD, IMAGE_TOKEN, 98, 97, 96]
MEASURED: dict[str, float] = {}


def _note(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), value)


def _assert_rows_match(rows: torch.Tensor, reference: torch.Tensor, keys: list[torch.Tensor], label: str) -> None:
    """Each example's rows over its own image keys (the rest is padding) within ROW_TOL of the reference."""
    for b, positions in enumerate(keys):
        k = len(positions)
        diff = (rows[b, ..., :k] - reference[b, ..., :k]).abs().max().item()
        _note(label, diff)
        assert diff < ROW_TOL, f"{label}, example {b}: {diff}"


def _text_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        # Larger than the 0.02 default so random attention is peaked, not near-uniform: errors show up clearly.
        initializer_range=0.2,
    )


def _config(family: str, gemma2: bool = False):
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**_text_kwargs()),
            image_token_index=IMAGE_TOKEN, image_seq_length=16,
        )
    if family == "paligemma":
        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        )
        if gemma2:  # PaliGemma-2 style: Gemma-2 text with logit softcapping (sdpa unsupported -> eager base)
            text = Gemma2Config(
                **_text_kwargs(), head_dim=16, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            )
        else:
            text = GemmaConfig(**_text_kwargs(), head_dim=16)
        return PaliGemmaConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vocab_size=VOCAB,
            projection_dim=64, hidden_size=64,
        )
    if family == "qwen2_vl":
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3,
        )
        text = dict(_text_kwargs(), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
        return Qwen2VLConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=98,
            vision_start_token_id=97, vision_end_token_id=96,
        )
    raise ValueError(family)


_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "paligemma": PaliGemmaForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


@dataclass
class Pair:
    """The same random weights under the default implementation (tested) and eager (reference)."""

    model: torch.nn.Module
    eager: torch.nn.Module


def _build(family: str, seed: int = 0, gemma2: bool = False) -> Pair:
    torch.manual_seed(seed)
    cls = _MODEL_CLASSES[family]
    config = _config(family, gemma2=gemma2)
    model = cls._from_config(copy.deepcopy(config)).eval()
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return Pair(model, eager)


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    """Print the max abs differences measured by this module's tests at its end (visible with ``pytest -s``)."""
    yield
    for key, value in sorted(MEASURED.items()):
        print(f"max |diff| {key}: {value:.3e}")


@pytest.fixture(autouse=True)
def _fresh_capturing_functions(monkeypatch):
    """Every test runs capturing functions built now by ``_capturing_forward``, not the ones registered at import.

    Why: the module registers its two capturing functions once, when it is imported, so a test run that swaps
    ``_capturing_forward``'s code afterwards (mutation testing) would otherwise never exercise it. Rebuilt and
    registered under the same names for the test's duration, they are what the recorder's models call.
    """
    from transformers import AttentionInterface

    for base, name in CAPTURE_IMPLEMENTATIONS.items():
        monkeypatch.setitem(AttentionInterface._global_mapping, name, attention._capturing_forward(base))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request) -> tuple[str, Pair]:
    return request.param, _build(request.param)


# ------------------------------------------------------------------------------------------------- inputs
def _example(family: str, prompt_length: int, seed: int, grid: tuple[int, int] = (4, 4), suffix: int = 0) -> dict:
    """One unpadded example built by hand: image tokens + random text, with the family's extra inputs."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 90, (prompt_length + suffix,), generator=g)
    if family == "llava":
        ids = torch.cat([torch.tensor([1]), torch.full((16,), IMAGE_TOKEN), text])
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    if family == "paligemma":
        ids = torch.cat([torch.full((16,), IMAGE_TOKEN), torch.tensor([1]), text])
        token_type = torch.zeros_like(ids)
        if suffix:
            token_type[-suffix:] = 1
        return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g), "token_type_ids": token_type}
    gh, gw = grid
    n_image = gh * gw // 4
    ids = torch.cat([text[:2], torch.tensor([97]), torch.full((n_image,), IMAGE_TOKEN), torch.tensor([96]), text[2:]])
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(gh * gw, 3 * 2 * 4 * 4, generator=g),
        "image_grid_thw": torch.tensor([[1, gh, gw]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def _batch(family: str, examples: list[dict]) -> dict:
    """Left-pad a list of examples into model inputs."""
    width = max(len(e["input_ids"]) for e in examples)
    out: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        out["input_ids"].append(torch.cat([torch.full((pad,), PAD), e["input_ids"]]))
        out["attention_mask"].append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(e["input_ids"]), dtype=torch.long)]))
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in e:
                out.setdefault(key, []).append(torch.cat([torch.zeros(pad, dtype=torch.long), e[key]]))
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
    if family == "qwen2_vl":
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in examples])
    return batch


def _image_positions(batch: dict) -> list[torch.Tensor]:
    return [(row == IMAGE_TOKEN).nonzero().flatten() for row in batch["input_ids"]]


def _eager_rows(eager, batch: dict, query_positions: list[int], key_positions: list[torch.Tensor]) -> torch.Tensor:
    """Eager attention rows [B, len(query_positions), layers, heads, K] from one full forward (NaN-padded K)."""
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    attentions = out.attentions  # LM layers only
    assert len(attentions) == TEXT_LAYERS
    per_example = []
    for b, keys in enumerate(key_positions):
        steps = [torch.stack([a[b, :, q, keys] for a in attentions]) for q in query_positions]
        per_example.append(torch.stack(steps).float())
    width = max(r.shape[-1] for r in per_example)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=float("nan")) for r in per_example])


def _extend(family: str, batch: dict, sequences: torch.Tensor) -> dict:
    """Inputs for a full forward over prompt + generated tokens (generated tokens are text, causal suffix)."""
    new = sequences.shape[1] - batch["input_ids"].shape[1]
    full = dict(batch, input_ids=sequences)
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(len(sequences), new, dtype=torch.long)], 1)
    if "token_type_ids" in batch:
        full["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.ones(len(sequences), new, dtype=torch.long)], 1)
    if "mm_token_type_ids" in batch:
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(len(sequences), new, dtype=torch.long)], 1)
    return full


# -------------------------------------------------------------------------------------------------- tests
def test_prefill_rows_match_eager_and_logits_unchanged(pair):
    family, p = pair
    batch = _batch(family, [_example(family, 6, seed=1)])
    keys = _image_positions(batch)
    with torch.no_grad():
        plain = p.model(**batch).logits
        with AttentionRecorder(p.model, keys) as recorder:
            captured = p.model(**batch).logits
    rows = recorder.rows()
    assert rows.shape == (1, 1, TEXT_LAYERS, TEXT_HEADS, len(keys[0]))
    reference = _eager_rows(p.eager, batch, [batch["input_ids"].shape[1] - 1], keys)
    row_diff = (rows - reference).abs().max().item()
    logit_diff = (captured - plain).abs().max().item()
    _note(f"{family} prefill rows vs eager", row_diff)
    _note(f"{family} logits recorder vs sdpa", logit_diff)
    assert row_diff < ROW_TOL
    assert torch.equal(captured, plain)  # outputs come from the library's own sdpa forward, bit for bit
    assert rows.sum(-1).max() <= 1 + 1e-6 and (rows > 0).all()


def test_left_padded_batch_matches_unbatched(pair):
    family, p = pair
    examples = [_example(family, 3, seed=2, grid=(4, 4)), _example(family, 9, seed=3, grid=(4, 8))]
    batch = _batch(family, examples)
    keys = _image_positions(batch)
    if family == "qwen2_vl":
        assert len(keys[0]) != len(keys[1])  # ragged image tokens
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        p.model(**batch)
    batched = recorder.rows()
    positions, valid = pad_key_positions(keys)
    assert torch.equal(recorder.key_mask, valid)
    for b, example in enumerate(examples):
        single = _batch(family, [example])
        with torch.no_grad(), AttentionRecorder(p.model, _image_positions(single)) as alone:
            p.model(**single)
        k = int(valid[b].sum())
        diff = (batched[b, :, :, :, :k] - alone.rows()[0]).abs().max().item()
        _note(f"{family} left-padded batch vs unbatched", diff)
        assert diff < ROW_TOL
        assert torch.isnan(batched[b, :, :, :, k:]).all()


def test_greedy_decoding_rows_match_eager_full_forward(pair):
    family, p = pair
    examples = [_example(family, 4, seed=4, grid=(4, 8)), _example(family, 7, seed=5, grid=(4, 4))]
    batch = _batch(family, examples)
    keys = _image_positions(batch)
    new_tokens = 3
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        sequences = p.model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=SUPPRESS, pad_token_id=PAD,
        )
    with torch.no_grad():
        plain = p.model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=SUPPRESS, pad_token_id=PAD,
        )
    assert torch.equal(sequences, plain)
    rows = recorder.rows()
    assert recorder.num_steps == new_tokens and rows.shape[1] == new_tokens
    prompt = batch["input_ids"].shape[1]
    full = _extend(family, batch, sequences)
    reference = _eager_rows(p.eager, full, [prompt - 1 + s for s in range(new_tokens)], keys)
    _assert_rows_match(rows, reference, keys, f"{family} decode rows vs eager full forward")


def test_vision_tower_not_captured_and_sdpa_restored(pair):
    family, p = pair
    batch = _batch(family, [_example(family, 5, seed=6)])
    language_model = p.model.get_decoder()
    vision_config = p.model.config.vision_config
    with torch.no_grad():
        before = p.model(**batch).logits
        with AttentionRecorder(p.model, _image_positions(batch)) as recorder:
            assert language_model.config._attn_implementation == CAPTURE_IMPLEMENTATIONS["sdpa"]
            assert vision_config._attn_implementation == "sdpa"
            p.model(**batch)
        assert recorder.rows().shape[2] == p.model.config.get_text_config().num_hidden_layers == TEXT_LAYERS
        assert language_model.config._attn_implementation == "sdpa"
        assert all(m.config._attn_implementation == "sdpa" for m in recorder.attention_modules)
        after = p.model(**batch).logits
    assert torch.equal(before, after)


def test_paligemma_bidirectional_prefix_respected():
    """Prefix (image + prompt) bidirectional, suffix causal: layer>0 rows depend on it, so a causal mask fails."""
    p = _build("paligemma", seed=7)
    batch = _batch("paligemma", [_example("paligemma", 4, seed=8, suffix=3), _example("paligemma", 7, seed=9, suffix=2)])
    keys = _image_positions(batch)
    last = batch["input_ids"].shape[1] - 1
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        p.model(**batch)
    rows = recorder.rows()
    reference = _eager_rows(p.eager, batch, [last], keys)
    causal = _eager_rows(p.eager, dict(batch, token_type_ids=torch.ones_like(batch["token_type_ids"])), [last], keys)
    diff = (rows - reference).abs().max().item()
    _note("paligemma prefix-LM rows vs eager (token_type_ids with suffix)", diff)
    assert diff < ROW_TOL
    # The test can fail: a pure causal mask gives visibly different rows from layer 1 on.
    assert (causal[:, :, 1:] - reference[:, :, 1:]).abs().max() > 100 * ROW_TOL

    # transformers quirk, mirrored on purpose: without token_type_ids (and no padding) sdpa gets no mask and
    # PaliGemma's Gemma layers have is_causal=False, so the whole prompt is bidirectional -- unlike eager, which
    # builds a causal mask. The recorder follows sdpa (the model actually run): it equals eager with an all-prefix
    # token_type_ids, not eager without token_type_ids.
    single = _batch("paligemma", [_example("paligemma", 5, seed=10)])
    without = {k: v for k, v in single.items() if k != "token_type_ids"}
    keys = _image_positions(single)
    last = single["input_ids"].shape[1] - 1
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        p.model(**without)
    all_prefix = _eager_rows(p.eager, single, [last], keys)
    eager_causal = _eager_rows(p.eager, without, [last], keys)
    diff = (recorder.rows() - all_prefix).abs().max().item()
    _note("paligemma no token_type_ids rows vs eager all-prefix", diff)
    assert diff < ROW_TOL
    assert (recorder.rows() - eager_causal).abs().max() > 100 * ROW_TOL


def test_paligemma2_softcapping_sliding_window_eager_base():
    """Gemma-2 text (softcapping, a sliding-window layer) cannot run sdpa: the recorder wraps eager instead."""
    p = _build("paligemma", seed=10, gemma2=True)
    assert p.model.get_decoder().config._attn_implementation == "eager"
    batch = _batch("paligemma", [_example("paligemma", 3, seed=11, suffix=3), _example("paligemma", 6, seed=12, suffix=2)])
    keys = _image_positions(batch)
    with torch.no_grad():
        plain = p.model(**batch).logits
        with AttentionRecorder(p.model, keys) as recorder:
            captured = p.model(**batch).logits
    reference = _eager_rows(p.eager, batch, [batch["input_ids"].shape[1] - 1], keys)
    diff = (recorder.rows() - reference).abs().max().item()
    _note("paligemma2 (softcap, sliding window) rows vs eager", diff)
    assert diff < ROW_TOL
    assert torch.equal(captured, plain)  # the library's own eager forward (softcapping, window) ran
    # The last query is in the causal suffix: layer 0's window (8 keys) hides the image tokens more than 7 positions
    # back (exactly zero), the full-attention layer 1 sees them all.
    rows, last = recorder.rows(), batch["input_ids"].shape[1] - 1
    for b, positions in enumerate(keys):
        hidden = positions <= last - 8
        assert hidden.sum() >= 10
        assert (rows[b, 0, 0][:, hidden] == 0).all() and (rows[b, 0, 0][:, ~hidden] > 0).all()
        assert (rows[b, 0, 1] > 0).all()
    assert p.model.get_decoder().config._attn_implementation == "eager"


def test_clear_errors():
    family = "llava"
    p = _build(family, seed=13)
    batch = _batch(family, [_example(family, 4, seed=14)])
    keys = _image_positions(batch)

    # Key positions outside the sequence.
    with pytest.raises(AttentionCaptureError, match="beyond"), torch.no_grad():
        with AttentionRecorder(p.model, [torch.tensor([500])]):
            p.model(**batch)
    # Batch mismatch.
    with pytest.raises(AttentionCaptureError, match="batch of 1"), torch.no_grad():
        with AttentionRecorder(p.model, keys + keys):
            p.model(**batch)
    # Right padding: the captured last position would be a pad token.
    right = dict(batch)
    right["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, 2), PAD)], 1)
    right["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(1, 2, dtype=torch.long)], 1)
    with pytest.raises(AttentionCaptureError, match="right padding"), torch.no_grad():
        with AttentionRecorder(p.model, keys):
            p.model(**right)
    # Eager attention is a supported base, but flash/flex or unknown implementations are not.
    p.model.get_decoder().config._attn_implementation_internal = "flex_attention"
    with pytest.raises(AttentionCaptureError, match="flex_attention"):
        with AttentionRecorder(p.model, keys):
            pass
    p.model.get_decoder().config._attn_implementation_internal = "sdpa"
    # Training mode (dropout) is refused.
    p.model.train()
    with pytest.raises(AttentionCaptureError, match="training"):
        with AttentionRecorder(p.model, keys):
            pass
    p.model.eval()
    # No forward recorded.
    with AttentionRecorder(p.model, keys) as empty:
        pass
    with pytest.raises(AttentionCaptureError, match="no language-model forward"):
        empty.rows()
    # A layer whose attention bypasses AttentionInterface is reported, never filled in.
    layer = p.model.get_decoder().layers[1].self_attn
    original_forward = layer.forward
    layer.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    try:
        with pytest.raises(AttentionCaptureError, match=r"layers \[1\] never called"), torch.no_grad():
            with AttentionRecorder(p.model, keys):
                p.model(**batch)
    finally:
        layer.forward = original_forward
    # Capturing function left switched outside a recorder.
    p.model.get_decoder().config._attn_implementation_internal = CAPTURE_IMPLEMENTATIONS["sdpa"]
    with pytest.raises(AttentionCaptureError, match="outside an active AttentionRecorder"), torch.no_grad():
        p.model(**batch)
    p.model.get_decoder().config._attn_implementation_internal = "sdpa"
    # The model was restored after every failure.
    assert p.model.get_decoder().config._attn_implementation == "sdpa"
    # Bad key_positions inputs.
    with pytest.raises(ValueError, match="no key positions"):
        AttentionRecorder(p.model, [torch.tensor([3]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="integer tensor"):
        AttentionRecorder(p.model, torch.ones(1, 3))
    with pytest.raises(ValueError, match="non-negative"):
        AttentionRecorder(p.model, [torch.tensor([-1])])


# ------------------------------------------------------------------------- bases, scaling, key positions
def test_eager_base_rows_outputs_and_restored(pair):
    """A model loaded with eager attention is captured through its own eager forward, and is eager again after."""
    family, p = pair
    batch = _batch(family, [_example(family, 3, seed=15), _example(family, 8, seed=16, grid=(4, 8))])
    keys = _image_positions(batch)
    decoder = p.eager.get_decoder()
    with torch.no_grad():
        plain = p.eager(**batch).logits
        with AttentionRecorder(p.eager, keys) as recorder:
            assert decoder.config._attn_implementation == CAPTURE_IMPLEMENTATIONS["eager"]
            captured = p.eager(**batch).logits
    assert decoder.config._attn_implementation == "eager"
    assert torch.equal(captured, plain)  # the library's own eager forward produced the outputs
    reference = _eager_rows(p.eager, batch, [batch["input_ids"].shape[1] - 1], keys)
    rows = recorder.rows()
    _assert_rows_match(rows, reference, keys, f"{family} eager-base rows vs eager")


def test_unpadded_greedy_decoding_rows_match_eager(pair):
    """One example without padding: sdpa runs without a mask (``is_causal``); prefill and decode rows match eager."""
    family, p = pair
    batch = _batch(family, [_example(family, 5, seed=17)])
    keys = _image_positions(batch)
    new_tokens = 3
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        sequences = p.model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            suppress_tokens=SUPPRESS, pad_token_id=PAD,
        )
    prompt = batch["input_ids"].shape[1]
    reference = _eager_rows(p.eager, _extend(family, batch, sequences), [prompt - 1 + s for s in range(new_tokens)], keys)
    diff = (recorder.rows() - reference).abs().max().item()
    _note(f"{family} unpadded decode rows vs eager full forward", diff)
    assert diff < ROW_TOL


def test_sdpa_with_non_default_scaling_and_sliding_window():
    """Gemma-3 text under sdpa: its scaling (query_pre_attn_scalar 64 -> 1/8, not 1/sqrt(head_dim) = 1/4) and
    the sliding window of layer 0 reach both the output (bit-identical) and the rows (equal to eager's)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **dict(_text_kwargs(), hidden_size=32, num_hidden_layers=2), head_dim=16, query_pre_attn_scalar=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(25)
    model = Gemma3ForCausalLM._from_config(copy.deepcopy(config)).eval()
    eager = Gemma3ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    assert model.get_decoder().layers[0].self_attn.scaling == 1 / 8
    ids = torch.randint(2, 90, (1, 10), generator=torch.Generator().manual_seed(26))
    keys = torch.tensor([[0, 2, 5, 7, 9]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with AttentionRecorder(model, keys) as recorder:
            captured = model(input_ids=ids).logits
        reference = eager(input_ids=ids, output_attentions=True).attentions
    assert torch.equal(captured, plain)
    expected = torch.stack([a[0, :, -1, keys[0]] for a in reference]).float()
    rows = recorder.rows()[0, 0]
    diff = (rows - expected).abs().max().item()
    _note("gemma3 text (scaling 1/8, sliding window) rows vs eager", diff)
    assert diff < ROW_TOL
    assert (rows[0, :, :3] == 0).all() and (rows[0, :, 3:] > 0).all()  # window of 4 hides keys 0, 2, 5 from 9


def test_key_positions_as_padded_tensor_with_mask():
    """A ``[B, K]`` integer tensor (int32 too) with ``key_mask``: masked slots may hold anything, rows there are NaN."""
    p = _build("llava", seed=17)
    batch = _batch("llava", [_example("llava", 3, seed=18), _example("llava", 6, seed=19)])
    keys = _image_positions(batch)
    positions = torch.stack(keys).to(torch.int32)
    mask = torch.ones_like(positions, dtype=torch.bool)
    mask[1, 5:] = False
    positions[1, 5] = -1  # garbage in masked slots: never read, never an error
    positions[1, 6] = 10**6
    with torch.no_grad(), AttentionRecorder(p.model, positions, key_mask=mask) as recorder:
        p.model(**batch)
    assert recorder.key_positions.dtype == torch.long
    assert torch.equal(recorder.key_mask, mask)
    assert (recorder.key_positions[1, 5:] == 0).all() and torch.equal(recorder.key_positions[0], keys[0])
    rows = recorder.rows()
    reference = _eager_rows(p.eager, batch, [batch["input_ids"].shape[1] - 1], [keys[0], keys[1][:5]])
    assert (rows[0] - reference[0]).abs().max() < ROW_TOL
    assert (rows[1, ..., :5] - reference[1, ..., :5]).abs().max() < ROW_TOL
    assert torch.isnan(rows[1, ..., 5:]).all()
    # Without a mask every slot of the tensor is valid.
    with torch.no_grad(), AttentionRecorder(p.model, torch.stack(keys)) as full:
        p.model(**batch)
    assert full.key_mask.all() and full.key_mask.shape == (2, 16)
    assert (full.rows() - _eager_rows(p.eager, batch, [batch["input_ids"].shape[1] - 1], keys)).abs().max() < ROW_TOL


def test_key_positions_errors_name_the_examples():
    p = _build("llava", seed=20)
    with pytest.raises(ValueError, match=r"integer tensor \[batch, keys\]; got dtype torch.int64, shape \(16,\)"):
        AttentionRecorder(p.model, torch.arange(16))
    with pytest.raises(ValueError, match=r"shape \(2, 1, 16\)"):
        AttentionRecorder(p.model, torch.zeros(2, 1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_mask shape \(2, 4\) != key_positions shape \(2, 16\)"):
        AttentionRecorder(p.model, torch.zeros(2, 16, dtype=torch.long), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only for a padded key_positions tensor"):
        AttentionRecorder(p.model, [torch.tensor([3])], key_mask=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"examples all have no key positions"):
        AttentionRecorder(p.model, torch.zeros(2, 0, dtype=torch.long))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"examples \[1\] have no key positions"):
        AttentionRecorder(p.model, torch.zeros(3, 4, dtype=torch.long), key_mask=mask)
    with pytest.raises(ValueError, match=r"examples \[0, 2\] have no key positions"):
        AttentionRecorder(p.model, [[], [3], []])


# ------------------------------------------------------------------------------------ refusals (errors)
def _right_padded_second_example(batch: dict) -> dict:
    """Append one real token to example 0 and one pad to example 1: only example 1 ends on padding."""
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[5], [PAD]])], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.tensor([[1], [0]])], 1)
    return out


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_one_right_pad_refused_naming_the_example(base):
    """Bool (sdpa) and additive (eager) masks: a last position that is padding is refused, for that example."""
    p = _build("llava", seed=21)
    model = p.model if base == "sdpa" else p.eager
    batch = _batch("llava", [_example("llava", 4, seed=22), _example("llava", 4, seed=23)])
    right = _right_padded_second_example(batch)
    with pytest.raises(AttentionCaptureError, match=r"layer 0: the last position of examples \[1\] is padding"):
        with torch.no_grad(), AttentionRecorder(model, _image_positions(batch)):
            model(**right)
    assert model.get_decoder().config._attn_implementation == base


def test_recorder_records_one_sequence_once():
    p = _build("llava", seed=24)
    batch = _batch("llava", [_example("llava", 4, seed=25)])
    keys = _image_positions(batch)
    recorder = AttentionRecorder(p.model, keys)
    with torch.no_grad(), recorder:
        with pytest.raises(AttentionCaptureError, match="records one sequence once"):
            with recorder:
                pass
        with pytest.raises(AttentionCaptureError, match=r"runs attn_implementation='vrp_rows_sdpa'"):
            with AttentionRecorder(p.model, keys):  # a second recorder on a model being recorded
                pass
        p.model(**batch)
    with pytest.raises(AttentionCaptureError, match="records one sequence once"):
        with recorder:
            pass
    assert recorder.num_steps == 1
    assert p.model.get_decoder().config._attn_implementation == "sdpa"


def test_generation_without_cache_refused():
    """``use_cache=False`` re-runs the whole sequence each step: key indices stop growing by the new queries."""
    p = _build("llava", seed=26)
    batch = _batch("llava", [_example("llava", 4, seed=27)])
    n = batch["input_ids"].shape[1]
    with pytest.raises(AttentionCaptureError, match=rf"layer 0: the keys grew from {n} to {n + 1} positions for {n + 1} new"):
        with torch.no_grad(), AttentionRecorder(p.model, _image_positions(batch)):
            p.model.generate(**batch, max_new_tokens=2, do_sample=False, use_cache=False, suppress_tokens=SUPPRESS,
                             pad_token_id=PAD)
    assert p.model.get_decoder().config._attn_implementation == "sdpa"


def test_key_position_equal_to_sequence_length_refused():
    p = _build("llava", seed=28)
    batch = _batch("llava", [_example("llava", 4, seed=29)])
    n = batch["input_ids"].shape[1]
    with torch.no_grad(), AttentionRecorder(p.model, [torch.tensor([0, n - 1])]) as last_key:
        p.model(**batch)
    assert last_key.rows().shape == (1, 1, TEXT_LAYERS, TEXT_HEADS, 2)
    with pytest.raises(AttentionCaptureError, match=rf"key position {n} is beyond the {n} keys of layer 0"):
        with torch.no_grad(), AttentionRecorder(p.model, [torch.tensor([0, n])]):
            p.model(**batch)


def test_attention_called_outside_the_language_model_forward_refused():
    """Inside a recorder, an attention module run on its own (not by the language model's forward) is refused."""
    p = _build("llava", seed=30)
    decoder = p.model.get_decoder()
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(31))
    cos_sin = decoder.rotary_emb(hidden, torch.arange(5)[None])
    with torch.no_grad(), AttentionRecorder(p.model, [torch.tensor([0, 1])]) as recorder:
        with pytest.raises(AttentionCaptureError, match="LlamaAttention outside the recorded language model's forward"):
            decoder.layers[0].self_attn(hidden, position_embeddings=cos_sin, attention_mask=None)
    assert recorder.num_steps == 0


@pytest.mark.parametrize("config", ["own", "none"])
def test_attention_module_with_its_own_config_refused(config):
    """A layer with its own config, or none (XGLM's attention keeps none), is refused by name, not an AttributeError."""
    p = _build("llava", seed=32)
    attn = p.model.get_decoder().layers[1].self_attn
    if config == "own":
        attn.config = copy.deepcopy(attn.config)  # switching the language model's config would not reach this layer
    else:
        del attn.config
    with pytest.raises(AttentionCaptureError, match=r"LlamaAttention \(layer 1\) does not share the language model's"):
        with AttentionRecorder(p.model, [torch.tensor([0])]):
            pass
    assert p.model.get_decoder().config._attn_implementation == "sdpa"


def test_attention_class_outside_its_modeling_file_refused_for_eager():
    """The eager base runs the modeling file's ``eager_attention_forward``; a class from elsewhere is refused."""
    p = _build("llava", seed=33)
    attn = p.eager.get_decoder().layers[1].self_attn
    attn.__class__ = type("CustomLlamaAttention", (type(attn),), {"__module__": __name__})  # no eager forward here
    batch = _batch("llava", [_example("llava", 4, seed=34)])
    with pytest.raises(
        AttentionCaptureError,
        match=rf"{__name__} defines no `eager_attention_forward`; cannot run CustomLlamaAttention eagerly",
    ), torch.no_grad():
        with AttentionRecorder(p.eager, _image_positions(batch)):
            p.eager(**batch)
    assert p.eager.get_decoder().config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", ["gpt2", "mamba"])
def test_decoder_without_a_layers_self_attn_stack_refused(kind):
    """GPT-2 (``h[i].attn``: no ``layers``) and Mamba (``layers[i].mixer``: no attention) cannot be located."""
    from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                           bos_token_id=1, eos_token_id=None))
    else:
        model = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2))
    name = type(model.eval().get_decoder()).__name__
    with pytest.raises(AttentionCaptureError, match=rf"{name} has no `layers\[i\].self_attn` decoder stack"):
        AttentionRecorder(model, [torch.tensor([0])])


def test_attention_sinks_refused():
    """GPT-OSS passes learned attention sinks (``s_aux``) to its eager attention: rows without them would be wrong."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, max_position_embeddings=64,
    )
    torch.manual_seed(35)
    model = GptOssForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    with pytest.raises(AttentionCaptureError, match="GptOssAttention passes `s_aux`, which the row capture does not"):
        with torch.no_grad(), AttentionRecorder(model, [torch.tensor([0, 1])]):
            model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_into_a_static_cache_matches_eager(family):
    """A static cache holds more key slots than the prompt; sdpa then runs mask-free with ``is_causal`` and crops
    the keys to the query length (upper-left causal), and the recorded row must leave the empty slots out too.
    (Decoding on from such a cache is refused: the keys stop growing with the positions.)"""
    from transformers import StaticCache

    p = _build(family, seed=36)
    batch = _batch(family, [_example(family, 5, seed=37)])
    keys = _image_positions(batch)
    n = batch["input_ids"].shape[1]
    cache = StaticCache(config=p.model.config, max_cache_len=n + 6)
    with torch.no_grad(), AttentionRecorder(p.model, keys) as recorder:
        p.model(**batch, cache=cache, use_cache=True)
    diff = (recorder.rows() - _eager_rows(p.eager, batch, [n - 1], keys)).abs().max().item()
    _note(f"{family} prefill into a static cache rows vs eager", diff)
    assert diff < ROW_TOL
