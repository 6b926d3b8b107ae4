"""Tokenizers, processors and configs for the three VLM families, built locally.

Nothing here touches the Hugging Face Hub: the tokenizer is a word-level
``tokenizers`` model built from the benchmark's own words, wrapped in the real
processor class of each family (``LlavaProcessor``, ``PaliGemmaProcessor``,
``Qwen2VLProcessor``), so the models see exactly the input layout the real
checkpoints see (image-token expansion, BOS placement, chat template, M-RoPE
grid), only with a tiny vocabulary.

Two geometries are provided:

* ``"zoo"`` -- the trained zoo: small square images (default 64 px, patch 8).
  LLaVA and PaliGemma give ``(image_size / patch_size)**2`` image tokens
  (64 at 64/8); Qwen2-VL resizes every image to about ``image_size**2`` pixels
  (``min_pixels = max_pixels = image_size**2``), a multiple of
  ``patch_size * merge_size``, then merges 2x2 patches (16 tokens at 64/8/2).
* ``"paper"`` -- the image geometry of the real checkpoints with a tiny
  width/depth: LLaVA-1.5 (336 px, patch 14, 576 tokens, CLS dropped),
  PaliGemma-224 (224 px, patch 14, 256 tokens), Qwen2-VL (dynamic resolution,
  patch 14, 2x2 merge, the checkpoint's min/max pixels).

Special tokens sit at fixed ids at the start of each vocabulary
(:data:`SPECIAL_TOKENS`), so a config built from ``vocab_size`` alone agrees
with the processor on every token id. Use ``len(processor.tokenizer)`` as the
vocabulary size: PaliGemma's processor adds 1,152 ``<loc>``/``<seg>`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llava", "paligemma", "qwen2_vl")

#: Punctuation kept as separate tokens; the POPE answer parser splits on "." and ",".
PUNCTUATION: tuple[str, ...] = (".", ",", "?", ":")

#: Special tokens per family, in id order (id = position). Roles: the tokenizer
#: attribute each one fills ("image" is the image placeholder).
SPECIAL_TOKENS: dict[str, tuple[tuple[str, str], ...]] = {
    # Llama-style, as llava-hf/llava-1.5: <unk>=0, <s>=1, </s>=2, then <image>, <pad>.
    "llava": (("unk", "<unk>"), ("bos", "<s>"), ("eos", "</s>"), ("image", "<image>"), ("pad", "<pad>")),
    # Gemma-style, as google/paligemma: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then <image>.
    "paligemma": (("pad", "<pad>"), ("eos", "<eos>"), ("bos", "<bos>"), ("unk", "<unk>"), ("image", "<image>")),
    # Qwen2-VL-Instruct: pad <|endoftext|>, eos <|im_end|>; <unk> only for out-of-vocabulary words.
    "qwen2_vl": (
        ("pad", "<|endoftext|>"),
        ("im_start", "<|im_start|>"),
        ("eos", "<|im_end|>"),
        ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"),
        ("image", "<|image_pad|>"),
        ("video", "<|video_pad|>"),
        ("unk", "<unk>"),
    ),
}

#: Words each family's prompt format needs on top of the benchmark's words.
TEMPLATE_WORDS: dict[str, tuple[str, ...]] = {
    "llava": ("user", "assistant"),
    "paligemma": (),
    "qwen2_vl": ("system", "you", "are", "a", "helpful", "assistant", "user"),
}

#: The official Qwen2-VL-Instruct chat template (system prompt, image as
#: <|vision_start|><|image_pad|><|vision_end|>, generation prompt).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Geometry:
    """Image geometry shared by a processor and its model config."""

    image_size: int  # square side (llava/paligemma); qwen2_vl resizes within min/max_pixels instead
    patch_size: int
    merge_size: int = 2  # qwen2_vl only
    min_pixels: int | None = None  # qwen2_vl only
    max_pixels: int | None = None  # qwen2_vl only


#: The real checkpoints' image geometry (llava-1.5-7b-hf, paligemma-3b-224, Qwen2-VL-Instruct).
PAPER_GEOMETRY: dict[str, Geometry] = {
    "llava": Geometry(image_size=336, patch_size=14),
    "paligemma": Geometry(image_size=224, patch_size=14),
    "qwen2_vl": Geometry(image_size=336, patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
}

#: The real checkpoints' language-model depth (``num_hidden_layers`` of llava-hf/llava-1.5-7b-hf,
#: google/paligemma-3b-pt-224 and Qwen/Qwen2-VL-7B-Instruct; the paper's released README, PAPER.md [R]).
#: Paper-geometry models get this depth by default, with a tiny width.
PAPER_LAYERS: dict[str, int] = {"llava": 32, "paligemma": 18, "qwen2_vl": 28}

#: The real checkpoints' rotary base of the language model (Qwen2-VL's is set for 32k-token contexts).
CHECKPOINT_ROPE_THETA: dict[str, float] = {"llava": 10_000.0, "paligemma": 10_000.0, "qwen2_vl": 1_000_000.0}


def check_model_type(model_type: str) -> str:
    """Return ``model_type`` or raise naming the supported families."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def special_token_ids(model_type: str) -> dict[str, int]:
    """Fixed ids of each family's special tokens, by role (e.g. ``{"image": 3, ...}``)."""
    check_model_type(model_type)
    return {role: i for i, (role, _) in enumerate(SPECIAL_TOKENS[model_type])}


def zoo_geometry(model_type: str, image_size: int = 64, patch_size: int = 8, merge_size: int = 2) -> Geometry:
    """The zoo's geometry; Qwen2-VL gets a fixed pixel budget of ``image_size**2``."""
    check_model_type(model_type)
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if model_type == "qwen2_vl":
        if image_size % (patch_size * merge_size):
            raise ValueError(
                f"qwen2_vl: image_size {image_size} is not a multiple of patch_size*merge_size "
                f"{patch_size * merge_size}"
            )
        return Geometry(image_size, patch_size, merge_size, min_pixels=image_size**2, max_pixels=image_size**2)
    return Geometry(image_size, patch_size)


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _normalize_words(words: list[str], model_type: str) -> list[str]:
    """Lowercased, de-duplicated, sorted vocabulary; rejects entries that are not single word tokens."""
    pre = _word_pre_tokenizer()
    clean: set[str] = set()
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise TypeError(f"words[{i}] is {type(word).__name__}, expected str")
        w = word.lower()
        pieces = [p for p, _ in pre.pre_tokenize_str(w)]
        if pieces != [w]:
            raise ValueError(
                f"words[{i}] = {word!r} is not a single word token (it splits into {pieces}); "
                "pass plain words, punctuation is added automatically"
            )
        clean.add(w)
    clean.update(TEMPLATE_WORDS[model_type])
    clean.update(PUNCTUATION)
    return sorted(clean)


def build_tokenizer(model_type: str, words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level, lowercasing tokenizer over ``words`` plus the family's special tokens.

    Special tokens come first at fixed ids (:data:`SPECIAL_TOKENS`). Decoding joins
    words with spaces and glues punctuation back ("yes, there is.").
    """
    check_model_type(model_type)
    specials = SPECIAL_TOKENS[model_type]
    vocab_tokens = [tok for _, tok in specials] + _normalize_words(words, model_type)
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab_tokens)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _word_pre_tokenizer()
    # WordPiece's decoder with cleanup joins tokens with spaces and removes the space before . , ? !
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)

    roles = dict((role, tok) for role, tok in specials)
    if model_type == "qwen2_vl":
        extra = {
            "image_token": roles["image"],
            "video_token": roles["video"],
            "vision_bos_token": roles["vision_start"],
            "vision_eos_token": roles["vision_end"],
        }
        others = [roles["im_start"]]
    else:
        extra = {"image_token": roles["image"]}
        others = []
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=roles.get("bos"),
        eos_token=roles["eos"],
        pad_token=roles["pad"],
        unk_token=roles["unk"],
        extra_special_tokens=extra,
        # Llama/Gemma prepend BOS; PaliGemmaProcessor turns it off and places BOS itself.
        add_bos_token="bos" in roles,
        add_eos_token=False,
        padding_side="left",
        model_max_length=32768,
    )
    if others:
        tokenizer.add_special_tokens({"additional_special_tokens": others})
    expected = special_token_ids(model_type)
    got = {role: tokenizer.convert_tokens_to_ids(tok) for role, tok in specials}
    if got != expected:  # guards the fixed-id contract the configs rely on
        raise RuntimeError(f"{model_type}: special token ids {got} differ from the fixed layout {expected}")
    return tokenizer


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only.

    The stock class requires a video processor, whose only implementation needs
    torchvision (not installed here); its constructor fails on ``None``. This
    subclass drops the ``video_processor`` attribute and is otherwise the stock
    class: same placeholder expansion, M-RoPE ``mm_token_type_ids`` and chat
    template. ``save_pretrained``/``from_pretrained`` round-trip through this class
    (``AutoProcessor`` does not know it; use :func:`vrp_utils.models.loading.load_model`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        # Skip Qwen2VLProcessor.__init__ (it passes video_processor on); the attributes it sets are set above.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_processor(
    model_type: str,
    words: list[str],
    image_size: int = 64,
    patch_size: int = 8,
    *,
    geometry: Literal["zoo", "paper"] = "zoo",
    merge_size: int = 2,
) -> ProcessorMixin:
    """The family's real processor around a tokenizer built from ``words``.

    ``geometry="zoo"`` uses ``image_size``/``patch_size`` (and ``merge_size`` for
    Qwen2-VL); ``geometry="paper"`` ignores them and uses :data:`PAPER_GEOMETRY`.
    The tokenizer pads on the left (generation-ready).
    """
    check_model_type(model_type)
    if geometry == "zoo":
        geo = zoo_geometry(model_type, image_size, patch_size, merge_size)
    elif geometry == "paper":
        geo = PAPER_GEOMETRY[model_type]
    else:
        raise ValueError(f"geometry must be 'zoo' or 'paper', got {geometry!r}")
    tokenizer = build_tokenizer(model_type, words)

    if model_type == "llava":
        # llava-hf/llava-1.5: resize the shortest edge, center-crop a square, CLIP normalisation.
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": geo.image_size},
            crop_size={"height": geo.image_size, "width": geo.image_size},
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=geo.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        )
    if model_type == "paligemma":
        # google/paligemma-*-224: squash to a square, SigLIP normalisation.
        image_processor = SiglipImageProcessorPil(
            size={"height": geo.image_size, "width": geo.image_size},
            image_seq_length=(geo.image_size // geo.patch_size) ** 2,
        )
        return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=geo.patch_size,
        merge_size=geo.merge_size,
        temporal_patch_size=2,
        min_pixels=geo.min_pixels,
        max_pixels=geo.max_pixels,
    )
    return Qwen2VLImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's temporal/height/width split of the rotary half-dimension (1:1.5:1.5, as 16/24/24 at 128)."""
    half = head_dim // 2
    if head_dim % 2 or half % 8:
        raise ValueError(f"qwen2_vl: head_dim {head_dim} must be a multiple of 16 for the M-RoPE split")
    return [half // 4, 3 * half // 8, 3 * half // 8]


def _family_config(
    model_type: str,
    vocab_size: int,
    geo: Geometry,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    vision_intermediate: int,
    max_positions: int,
    rope_theta: float,
    initializer_range: float = 0.02,
) -> PretrainedConfig:
    check_model_type(model_type)
    ids = special_token_ids(model_type)
    if vocab_size < len(ids):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(ids)} special tokens")
    if hidden % heads or vision_hidden % vision_heads:
        raise ValueError(f"hidden {hidden} / vision_hidden {vision_hidden} must divide by heads {heads}/{vision_heads}")
    head_dim = hidden // heads
    if model_type == "llava":
        n_tokens = (geo.image_size // geo.patch_size) ** 2
        return LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=vision_hidden,
                intermediate_size=vision_intermediate,
                num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads,
                image_size=geo.image_size,
                patch_size=geo.patch_size,
                projection_dim=hidden,
            ),
            text_config=LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                initializer_range=initializer_range,
                bos_token_id=ids["bos"],
                eos_token_id=ids["eos"],
                pad_token_id=ids["pad"],
            ),
            image_token_index=ids["image"],
            image_seq_length=n_tokens,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            attn_implementation="sdpa",
        )
    if model_type == "paligemma":
        return PaliGemmaConfig(
            vision_config=SiglipVisionConfig(
                hidden_size=vision_hidden,
                intermediate_size=vision_intermediate,
                num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads,
                image_size=geo.image_size,
                patch_size=geo.patch_size,
                vision_use_head=False,
            ),
            text_config=GemmaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                head_dim=head_dim,
                max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                initializer_range=initializer_range,
                bos_token_id=ids["bos"],
                eos_token_id=ids["eos"],
                pad_token_id=ids["pad"],
            ),
            image_token_index=ids["image"],
            vocab_size=vocab_size,
            projection_dim=hidden,
            hidden_size=hidden,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
            attn_implementation="sdpa",
        )
    return Qwen2VLConfig(
        vision_config={
            "depth": vision_layers,
            "embed_dim": vision_hidden,
            "hidden_size": hidden,
            "mlp_ratio": max(1, vision_intermediate // vision_hidden),
            "num_heads": vision_heads,
            "patch_size": geo.patch_size,
            "spatial_merge_size": geo.merge_size,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": max_positions,
            "initializer_range": initializer_range,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": _mrope_section(head_dim)},
            "bos_token_id": None,
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
        },
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        attn_implementation="sdpa",
    )


def zoo_config(
    model_type: str,
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    *,
    intermediate: int = 256,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int = 128,
    merge_size: int = 2,
    max_positions: int = 512,
    initializer_range: float = 0.02,
    rope_theta: float = 10_000.0,
) -> PretrainedConfig:
    """Config of a trained-zoo model (about 0.8-0.9M parameters at the defaults).

    ``initializer_range`` is the language model's initial weight std (the library's default, 0.02, is
    set for widths in the thousands); LLaVA's and PaliGemma's projectors read it too, Qwen2-VL's merger
    and all three vision towers do not. ``rope_theta`` is the language model's rotary base for all three
    families (Qwen2-VL's checkpoints use 1e6, for 32k-token contexts; over the zoo's few hundred tokens it
    leaves almost no rotation between nearby tokens).

    ``vocab_size`` must be ``len(processor.tokenizer)`` of the matching
    :func:`build_processor`; token ids follow :data:`SPECIAL_TOKENS`.
    """
    geo = zoo_geometry(model_type, image_size, patch_size, merge_size)
    return _family_config(
        model_type,
        vocab_size,
        geo,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
        max_positions=max_positions,
        rope_theta=rope_theta,
        initializer_range=initializer_range,
    )


def paper_geometry_config(
    model_type: str,
    vocab_size: int,
    hidden: int = 32,
    layers: int | None = None,
    heads: int = 2,
    *,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    max_positions: int = 4096,
) -> PretrainedConfig:
    """Tiny-width config with the real checkpoint's image geometry (:data:`PAPER_GEOMETRY`), rotary base and,
    unless ``layers`` says otherwise, language-model depth (:data:`PAPER_LAYERS`).

    Pair with ``build_processor(model_type, words, geometry="paper")``: LLaVA gives
    576 image tokens (24x24), PaliGemma 256 (16x16), Qwen2-VL a per-image grid.
    """
    check_model_type(model_type)
    return _family_config(
        model_type,
        vocab_size,
        PAPER_GEOMETRY[model_type],
        hidden=hidden,
        layers=PAPER_LAYERS[model_type] if layers is None else layers,
        heads=heads,
        intermediate=2 * hidden,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        vision_intermediate=2 * vision_hidden,
        max_positions=max_positions,
        rope_theta=CHECKPOINT_ROPE_THETA[model_type],
    )


def build_family(
    model_type: str,
    words: list[str],
    *,
    geometry: Literal["zoo", "paper"] = "zoo",
    image_size: int = 64,
    patch_size: int = 8,
    merge_size: int = 2,
    **config_kwargs,
) -> tuple[PretrainedConfig, ProcessorMixin]:
    """Processor and matching config, in the right order (vocabulary sized after the processor is built).

    ``image_size``/``patch_size``/``merge_size`` apply to the zoo geometry only;
    ``config_kwargs`` go to :func:`zoo_config` or :func:`paper_geometry_config`.
    """
    processor = build_processor(
        model_type, words, image_size, patch_size, geometry=geometry, merge_size=merge_size
    )
    vocab_size = len(processor.tokenizer)
    if geometry == "paper":
        config = paper_geometry_config(model_type, vocab_size, **config_kwargs)
    else:
        config = zoo_config(
            model_type, vocab_size, image_size, patch_size, merge_size=merge_size, **config_kwargs
        )
    return config, processor
