"""A model's features for POPE settings: each distinct (image, question) input extracted once.

Why: POPE's three settings share every image and every positive question (the embedded benchmark:
1,725 distinct inputs behind 3,240 rows), and a greedy pass gives a repeated input the same answer,
attention and hidden states. So the extraction runs over the distinct inputs only, and a
*membership* table maps each setting's rows onto them. Analyses read a :class:`Features` view and
never re-run the model; every later pass (masking, sampling) also costs 47% less.

Entry points: :func:`open_features` (read-only; extracts first when the store is absent, so a
directory or hub model passed as a notebook parameter works without a separate step) and
``python -m vrp_utils.extract.features`` (``make features``: the three zoo models side by side).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from vrp_utils.data.benchmark import SETTINGS
from vrp_utils.data.questions import (  # noqa: F401 - chapter_questions, question_splits: re-exported
    chapter_questions, file_state, question_splits,
)
from vrp_utils.extract.engine import (
    ExtractionSettings, Intervention, code_version, dataset_fingerprint, extract, store_settings,
)
from vrp_utils.extract.store import FeatureStore, StoreLockedError, store_path
from vrp_utils.paths import BENCHMARK_DIR, STORE_DIR

DISTINCT_SETTING = "distinct"
#: How long to wait for another process that is writing the same store before giving up.
LOCK_WAIT_SECONDS = 3600.0
#: The embedded zoo, in the order the book reports it.
ZOO_MODELS = ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Flattening the indices" bars from ``datasets`` (they filled every chapter's setup output)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def parse_settings(settings: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, one setting, a comma-separated string or a list -> a checked tuple in canonical order."""
    names = [s.strip() for s in settings.split(",")] if isinstance(settings, str) else list(settings)
    if names == ["all"]:
        return SETTINGS
    unknown = [name for name in names if name not in SETTINGS]
    if unknown or not names:
        raise ValueError(f"unknown setting(s) {unknown or names!r}; choose from {', '.join(SETTINGS)} or 'all'")
    return tuple(s for s in SETTINGS if s in names)


def parse_models(models: str | Sequence[str]) -> list[str]:
    """A comma-separated string (notebook parameter) or a list -> model names/paths, in order."""
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [str(m) for m in models]
    names = [name for name in names if name]
    if not names:
        raise ValueError("no model given: pass zoo names, directories or hub ids, comma-separated")
    return names


def check_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """A chapter's or caller's ``device`` and ``dtype``, checked by the extraction CLI's own rules.

    Returns the canonical device (``cuda:0``, ``cpu``, ...) and the dtype's name; an unknown value, or a device
    this machine lacks, is refused naming the choices (:func:`~vrp_utils.extract.placement.parse_device`,
    :func:`~vrp_utils.extract.placement.parse_dtype`), before any store is opened or model loaded.
    """
    from vrp_utils.extract.placement import parse_device, parse_dtype

    parse_dtype(dtype, "dtype")
    return parse_device(device, "device"), dtype


def distinct_inputs(splits: Mapping[str, Any]) -> tuple[Any, pd.DataFrame]:
    """The distinct (image, question) inputs of ``splits`` as one dataset, and each row's place in it.

    Returns ``(dataset, membership)``: the dataset holds each input once, in order of first
    appearance (settings in the order given), with ``setting = "distinct"`` and ``question_id`` =
    1..N; ``membership`` has one row per (setting, question): ``setting``, ``question_id``,
    ``position`` (row in its setting) and ``distinct_id`` (the distinct input's question_id).
    A repeated input with contradicting labels is refused. Where any split has a ``task`` column (a task
    file), the others get one too (presence, :func:`vrp_utils.data.questions.add_default_task`).
    """
    import datasets

    from vrp_utils.data.questions import add_default_task

    splits = add_default_task(splits)

    where: dict[tuple[str, str], int] = {}
    labels: dict[tuple[str, str], str] = {}
    records, parts = [], []
    for setting, split in splits.items():
        columns = split.select_columns(["image_file", "question", "label", "question_id"])
        first_rows = []
        for position, (image_file, question, label, question_id) in enumerate(
            zip(columns["image_file"], columns["question"], columns["label"], columns["question_id"])
        ):
            key = (image_file, question)
            if key not in where:
                where[key] = len(where) + 1
                labels[key] = label
                first_rows.append(position)
            elif labels[key] != label:
                raise ValueError(
                    f"{setting} question {question_id} ({question!r} on {image_file}) is labelled {label!r} "
                    f"but the same input is labelled {labels[key]!r} elsewhere"
                )
            records.append({"setting": setting, "question_id": question_id, "position": position, "distinct_id": where[key]})
        parts.append(split.select(first_rows))
    if not parts:
        raise ValueError("distinct_inputs needs at least one split")
    dataset = datasets.concatenate_datasets(parts)
    dataset = dataset.remove_columns(["question_id", "setting"])
    dataset = dataset.add_column("question_id", list(range(1, len(dataset) + 1)))
    dataset = dataset.add_column("setting", [DISTINCT_SETTING] * len(dataset))
    return dataset, pd.DataFrame.from_records(records)


@functools.lru_cache(maxsize=16)
def _load_setting(setting: str, benchmark_dir: Path, state: tuple) -> Any:
    from vrp_utils.data.pope import load_benchmark

    return load_benchmark(setting, benchmark_dir)


def benchmark_splits(settings: Sequence[str], limit: int | None = None, benchmark_dir: Path = BENCHMARK_DIR) -> dict[str, Any]:
    """The embedded benchmark's settings, each cut to its first ``limit`` questions.

    A setting is read once per process while its files are unchanged (a chapter opens three models over the
    same questions; a rebuilt benchmark changes the files' size or time and is read again).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None (all questions) or >= 1, got {limit}")
    splits = {}
    root = Path(benchmark_dir).resolve()
    for setting in settings:
        files = (root / f"pope_{setting}.jsonl", root / "boxes.jsonl", root / "images")
        split = _load_setting(setting, root, tuple(file_state(f) for f in files))
        splits[setting] = split.select(range(min(limit, len(split)))) if limit is not None else split
    return splits


@dataclass
class Features:
    """One model's extracted features for some settings, read-only.

    ``table``: one row per (setting, question) that extracted cleanly, with the store's columns and
    ``array_index`` (the row of every store array). ``errors``: the same for error rows (counted,
    reported, never silently dropped). ``distinct``: one row per distinct input that extracted
    cleanly (what pooled analyses count once).
    """

    model: str
    model_dir: Path
    model_type: str
    store: FeatureStore
    membership: pd.DataFrame
    settings: tuple[str, ...]
    #: The distinct inputs (a ``datasets.Dataset``; row ``distinct_id - 1``), for images and boxes.
    inputs: Any = field(repr=False, default=None)
    #: Where a missing store of a pass derived from these features (masked, ablated, sampled, untrained twin)
    #: is extracted; not part of any store's identity.
    device: str = "cpu"
    #: The precision of the store and of every derived pass (part of their identities: ``<weights>-<dtype>``).
    dtype: str = "float32"

    @cached_property
    def _joined(self) -> pd.DataFrame:
        store_rows = self.store.table(include_errors=True).drop(columns=["setting"])
        store_rows = store_rows.rename(columns={"question_id": "distinct_id"})
        joined = self.membership.merge(store_rows, on="distinct_id", how="left", validate="many_to_one")
        if joined["id"].isna().any():
            raise ValueError(f"feature store {self.store.path} lacks rows the membership table names")
        return joined

    @property
    def table(self) -> pd.DataFrame:
        joined = self._joined
        return joined[joined["error"].isna()].reset_index(drop=True)

    @property
    def errors(self) -> pd.DataFrame:
        joined = self._joined
        return joined[joined["error"].notna()].reset_index(drop=True)

    @property
    def distinct(self) -> pd.DataFrame:
        """OK rows of the store, one per distinct input (``array_index`` = its row)."""
        table = self.store.table().rename(columns={"question_id": "distinct_id"}).drop(columns=["setting"])
        return table.reset_index(drop=True)

    def error_counts(self) -> dict[str, int]:
        """Error rows per setting (and distinct inputs), for every report."""
        counts = {setting: int((self.errors["setting"] == setting).sum()) for setting in self.settings}
        counts["distinct"] = self.store.n_errors
        return counts

    @cached_property
    def adapter(self) -> Any:
        """The family adapter (token geometry) for this model, from its config alone."""
        from transformers import AutoConfig

        from vrp_utils.models.adapters import adapter_for

        return adapter_for(AutoConfig.from_pretrained(self.model_dir, local_files_only=True))

    def image(self, distinct_id: int) -> Any:
        """The (PIL) image of a distinct input."""
        return self.inputs[int(distinct_id) - 1]["image"].convert("RGB")

    def load(self) -> Any:
        """The model itself on the features' device in their dtype (for what runs outside a store: the logit
        lens, timings), as :func:`~vrp_utils.extract.placement.load_placed` gives it."""
        from vrp_utils.extract.placement import load_placed, parse_dtype

        return load_placed(self.model_dir, self.device, parse_dtype(self.dtype))

    @property
    def model_fingerprint(self) -> str:
        """The weights' fingerprint (``<weights>-<dtype>`` below float32) the store was extracted from."""
        return str(self.store.manifest["model_fingerprint"])

    @property
    def n_layers(self) -> int:
        return int(self.store.attention().shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.store.attention().shape[2])


def open_or_extract(
    model: str,
    dataset: Any,
    extraction: ExtractionSettings = ExtractionSettings(),
    *,
    intervention: Intervention | None = None,
    root: Path = STORE_DIR,
    extract_missing: bool = True,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> FeatureStore:
    """The finished store of ``model`` over ``dataset`` (opened without loading the model), or extract it first.

    ``dtype`` names the precision the store was extracted in (``python -m vrp_utils.extract --dtype``; part of
    its identity): a bfloat16 store extracted on GPUs is read with ``dtype="bfloat16"``. ``device`` is where a
    missing store is extracted (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``); it is not part of the
    store's identity. Both are checked first (:func:`check_device_dtype`).
    """
    from vrp_utils.extract.placement import dtype_fingerprint, load_placed, parse_dtype
    from vrp_utils.models.loading import fingerprint_files, resolve_model_dir

    device, dtype = check_device_dtype(device, dtype)
    model_fp = dtype_fingerprint(fingerprint_files(resolve_model_dir(model)), parse_dtype(dtype))
    with _quiet_datasets():
        dataset_fp = dataset_fingerprint(dataset)
    expect = {
        "model_fingerprint": model_fp,
        "dataset_fingerprint": dataset_fp,
        "settings": store_settings(extraction, intervention),
        "code_version": code_version(),
    }
    path = store_path(root, model_fp, dataset_fp, expect["settings"], expect["code_version"])
    if (path / "complete.json").is_file():
        return FeatureStore.open(path, expect=expect)
    if not extract_missing:
        raise FileNotFoundError(f"no finished feature store for {model} at {path}; run `make features` or open with extract_missing=True")
    loaded = load_placed(model, device, parse_dtype(dtype))
    waited = 0.0
    while True:
        try:
            return extract(loaded, dataset, extraction, root=root, progress=progress, intervention=intervention)
        except StoreLockedError:
            # Another process (a second notebook, `make features`) is writing this very store: wait for it
            # and read its result rather than fail or write twice.
            if waited == 0:
                print(f"waiting for another process writing {path} ...", file=sys.stderr, flush=True)
            if waited > LOCK_WAIT_SECONDS:
                raise
            time.sleep(2.0)
            waited += 2.0


def open_features(
    model: str,
    settings: str | Sequence[str] = "all",
    limit: int | None = None,
    *,
    splits: Mapping[str, Any] | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    root: Path = STORE_DIR,
    benchmark_dir: Path = BENCHMARK_DIR,
    extract_missing: bool = True,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> Features:
    """Open ``model``'s features for ``settings`` (extracting the distinct inputs first if absent).

    ``model`` is a zoo name, a directory or a cached hub id; ``splits`` (setting -> dataset) replaces
    the embedded benchmark, e.g. real POPE files loaded with ``load_pope``; ``dtype`` the precision the
    store was extracted in (``python -m vrp_utils.extract --dtype``); ``device`` where a missing store is
    extracted. The :class:`Features` record both: every pass derived from them (masking, ablation, sampling,
    the untrained twin) runs on that device in that dtype.
    """
    from vrp_utils.models.loading import check_if_released, read_model_type, resolve_model_dir

    device, dtype = check_device_dtype(device, dtype)
    check_if_released(resolve_model_dir(model))  # a changed release is refused even when its features are cached
    if splits is None:
        chosen = parse_settings(settings)
        splits = benchmark_splits(chosen, limit, benchmark_dir)
    else:
        chosen = tuple(splits)
        if limit is not None:
            splits = {name: split.select(range(min(limit, len(split)))) for name, split in splits.items()}
    with _quiet_datasets():
        dataset, membership = distinct_inputs(splits)
    model_dir = resolve_model_dir(model)
    model_type = read_model_type(model_dir)
    store = open_or_extract(model, dataset, extraction, root=root, extract_missing=extract_missing, progress=progress,
                            device=device, dtype=dtype)
    return Features(str(model), model_dir, model_type, store, membership, chosen, dataset, device, dtype)


def declared_inputs(features: Mapping[str, Features]) -> dict[str, dict[str, str]]:
    """What a chapter read, for :func:`vrp_utils.results.publish_inputs`: each model's weights fingerprint and
    feature store; the status page names the zoo (released or not) each model's numbers came from."""
    return {"models": {name: f.model_fingerprint for name, f in features.items()},
            "features": {name: f.store.path.name for name, f in features.items()}}


def language_model_shape(model: str) -> tuple[int, int]:
    """(layers, attention heads) of a model's language model, from its config alone (no weights loaded).

    Why: a layer or head parameter out of range must fail before any extraction starts.
    """
    from transformers import AutoConfig

    from vrp_utils.models.loading import read_model_type, resolve_model_dir

    model_dir = resolve_model_dir(model)
    read_model_type(model_dir)
    text = AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config()
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def model_type(model: str) -> str:
    """The ``config.model_type`` of a zoo name, directory or hub id with local weights (no weights loaded).

    Why: what a chapter publishes per model (e.g. the paper's layer for its family) keys on the architecture,
    never on the model's name.
    """
    from vrp_utils.models.loading import read_model_type, resolve_model_dir

    return read_model_type(resolve_model_dir(model))


def sample_pool_settings(pool: int, temperature: float, top_p: float, seed: int = 0, batch_size: int = 16) -> ExtractionSettings:
    """The engine settings of a sample pool over the distinct inputs (answers only: no attention, no states).

    One definition for `make features` and the self-consistency chapter, so the chapter finds the pool the
    build extracted. (Batch 64 gave the same 1,725 sample lists per zoo model and only ~10% less time.)
    """
    return ExtractionSettings(attention=False, hidden=False, samples=int(pool), temperature=float(temperature),
                              top_p=float(top_p), seed=int(seed), batch_size=batch_size)


def _build_one(model: str, settings: tuple[str, ...], root: Path, benchmark_dir: Path, progress: bool,
               sample_pool: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # one thread per model: bytes independent of the machine's cores
    started = time.time()
    features = open_features(model, settings, root=root, benchmark_dir=benchmark_dir, progress=progress)
    built = {"model": model, "store": str(features.store.path), "summary": features.store.summary(),
             "rows": len(features.membership), "seconds": round(time.time() - started, 1)}
    if sample_pool:
        # in the same worker: the pool reuses this process's imports instead of starting another one
        started = time.time()
        pool = open_or_extract(model, features.inputs, sample_pool_settings(**sample_pool), root=root, progress=progress)
        built["sample_pool"] = {"store": str(pool.path), "settings": dict(sample_pool), "summary": pool.summary(),
                                "seconds": round(time.time() - started, 1)}
    return built


def build_features(
    models: Sequence[str] = ZOO_MODELS,
    settings: Sequence[str] = SETTINGS,
    jobs: int = 1,
    root: Path = STORE_DIR,
    benchmark_dir: Path = BENCHMARK_DIR,
    progress: bool = True,
    sample_pool: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Extract (or keep) each model's distinct-input features; ``jobs`` models side by side.

    ``sample_pool`` (``{"pool", "temperature", "top_p", "seed"}``, see :func:`sample_pool_settings`) also
    extracts each model's sample pool after its greedy pass, in the same worker.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    settings = parse_settings(settings)
    if sample_pool:
        sample_pool_settings(**sample_pool)  # bad values fail here, before any worker starts
    if jobs == 1 or len(models) == 1:
        return [_build_one(m, settings, root, benchmark_dir, progress, sample_pool) for m in models]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per worker (forking a process that already ran torch can deadlock)
    with ProcessPoolExecutor(max_workers=min(jobs, len(models)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_build_one, m, settings, root, benchmark_dir, progress, sample_pool) for m in models]
        return [future.result() for future in futures]


def main(argv: list[str] | None = None) -> int:
    from vrp_utils.results import write_json_atomic

    parser = argparse.ArgumentParser(
        prog="python -m vrp_utils.extract.features",
        description="Extract each model's features once over the distinct inputs of the POPE settings.",
    )
    parser.add_argument("--models", default=",".join(ZOO_MODELS), help="comma-separated zoo names, directories or hub ids")
    parser.add_argument("--settings", default="all", help="comma-separated settings, or 'all'")
    parser.add_argument("--jobs", type=int, default=1, help="models extracted side by side (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=STORE_DIR)
    parser.add_argument("--index", type=Path, help="write a JSON summary of the stores here")
    parser.add_argument("--sample-pool", type=int, default=0, metavar="N",
                        help="also extract N sampled answers per distinct input (0: none), for self-consistency")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the pool")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus (top-p) of the pool")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the pool's draws")
    args = parser.parse_args(argv)
    if args.sample_pool < 0:
        parser.error(f"--sample-pool must be >= 0; got {args.sample_pool}")
    sample_pool = ({"pool": args.sample_pool, "temperature": args.temperature, "top_p": args.top_p, "seed": args.sample_seed}
                   if args.sample_pool else None)
    try:
        started = time.time()
        built = build_features(parse_models(args.models), parse_settings(args.settings), args.jobs, args.out,
                               sample_pool=sample_pool)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for entry in built:
        print(f"{entry['model']}: {entry['summary']['n_ok']} ok, {entry['summary']['n_error']} errors "
              f"({entry['rows']} setting rows) in {entry['seconds']} s -> {entry['store']}")
        if "sample_pool" in entry:
            pool = entry["sample_pool"]
            print(f"  sample pool of {pool['settings']['pool']}: {pool['summary']['n_ok']} ok in {pool['seconds']} s -> {pool['store']}")
    if args.index:
        write_json_atomic(args.index, {"stores": built, "seconds": round(time.time() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
