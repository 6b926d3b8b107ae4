"""Extraction at scale: several processes (or GPUs) through Hugging Face ``accelerate``, any device and dtype.

Why: all of POPE on a 7B checkpoint outgrows one CPU process, yet every analysis must read one store that is
the same however the work was split. So each process of an ``accelerate launch`` takes a contiguous shard of
the examples (``PartialState.split_between_processes``: deterministic, disjoint), extracts it with the
ordinary engine (:func:`vrp_utils.extract.engine.extract`) into a *shard store* of its own (chunked, atomic,
resumable: a killed process resumes its shard, a finished shard is never redone), and the main process merges
the shards, after ``wait_for_everyone``, into the store a one-process run writes: the same directory (same
identity), the same table and arrays. No scheduler of our own: ``accelerate`` starts the processes and says who
is who; the split is its own.

Launch (the one that really gives two ranks on a CPU-only machine: ``--cpu --num_processes 2`` starts one
process; ``--multi_gpu`` starts two through ``torch.distributed.run``, and ``--device cpu`` makes each a
``MULTI_CPU`` rank over gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m vrp_utils.extract --model zoo-llava --split all --distinct

On GPUs, ``--device cuda`` puts each rank on its own GPU (``PartialState().device``); ``--device auto`` (one
process only) spreads a model larger than one GPU over all visible GPUs with ``accelerate``'s
``infer_auto_device_map`` + ``dispatch_model`` (``device_map="auto"``).

Precision is part of a store's identity: a float16/bfloat16 pass gets the model fingerprint
``<weights>-<dtype>`` (float32 keeps the weights' fingerprint, so a float32 store is the one ``open_features``
and ``make features`` find), and a merge refuses shards of different identities.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from vrp_utils.extract.engine import (
    ExtractionSettings, _store_manifest, code_version, dataset_fingerprint, example_id, extract, load_split,
    store_settings,
)
from vrp_utils.extract.placement import (  # noqa: F401 - re-exported: the CLI's and callers' names
    DTYPES, dtype_fingerprint, load_placed, parse_device, parse_dtype,
)
from vrp_utils.extract.store import (
    ARRAY_INDEX_COLUMN, CHUNKS_DIR, COMPLETE_FILE, DEFAULT_CHUNK_SIZE, ERROR_COLUMN, EXPECTED_IDS_FILE, ID_COLUMN,
    TABLE_FILE, FeatureStore, StoreError, store_path,
)
from vrp_utils.paths import STORE_DIR

#: How long ranks wait for each other at a barrier (a shard of a 7B model on all of POPE takes hours).
BARRIER_TIMEOUT = timedelta(hours=48)
#: Manifest keys a shard must share with the merged store (the dataset is checked shard by shard).
SHARED_IDENTITY = ("model", "model_fingerprint", "model_type", "settings", "code_version")


class ShardMismatchError(StoreError):
    """Shards that cannot be merged into one store: other identities, overlapping or missing examples."""


# ------------------------------------------------------------------------------------------------- shards
def shards_root(store_dir: Path) -> Path:
    """Where the shard stores of the merged store ``store_dir`` live (beside it, never inside it)."""
    return store_dir.parent / f"{store_dir.name}.shards"


def shard_dir(store_dir: Path, rank: int, world_size: int) -> Path:
    """The root under which rank ``rank`` of ``world_size`` writes its shard store."""
    return shards_root(store_dir) / f"rank-{rank:03d}-of-{world_size:03d}"


def _committed(store_root: Path) -> int:
    """Examples committed so far under a shard root (read from the store's files; 0 where none yet)."""
    total = 0
    for store in store_root.glob("*/"):
        try:
            if (store / COMPLETE_FILE).is_file():
                total += len(json.loads((store / EXPECTED_IDS_FILE).read_text()))
                continue
            for commit in (store / CHUNKS_DIR).glob("c*.commit.json"):
                total += len(json.loads(commit.read_text())["ids"])
        except (OSError, ValueError, KeyError):  # a file replaced or removed while read: count it next time
            continue
    return total


class _WholeRunBar:
    """One progress bar for every rank's work, on the main process: it polls the shards' committed chunks."""

    def __init__(self, roots: Sequence[Path], total: int, desc: str, enabled: bool, interval: float = 0.5) -> None:
        self._roots, self._interval = list(roots), interval
        self._stop = threading.Event()
        self._bar = tqdm(total=total, initial=self._done() if enabled else 0, unit="ex", desc=desc, disable=not enabled)
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def _done(self) -> int:
        return sum(_committed(root) for root in self._roots)

    def _refresh(self) -> None:
        done = self._done()
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._refresh()

    def __enter__(self) -> _WholeRunBar:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._refresh()
        self._bar.close()


def _describe(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)[:200]


def check_shards(shards: Sequence[FeatureStore], manifest: dict[str, Any], expected_ids: Sequence[str],
                 dataset_fingerprints: Sequence[str] | None = None) -> None:
    """Refuse shards that are not one store cut in pieces: raise :class:`ShardMismatchError` naming why.

    Each shard must be complete, share ``manifest``'s model, settings and code (:data:`SHARED_IDENTITY`), hold
    the next contiguous run of ``expected_ids`` (disjoint, in order, none missing), have been written under the
    same library versions as the others, and (if given) have the dataset fingerprint of its slice.
    """
    if not shards:
        raise ShardMismatchError("no shards to merge")
    start = 0
    versions = shards[0].manifest["store"]["library_versions"]
    for index, shard in enumerate(shards):
        if not shard.complete:
            raise ShardMismatchError(f"shard {index} ({shard.path}) is not finished; resume its extraction first")
        for key in SHARED_IDENTITY:
            if _describe(shard.manifest.get(key)) != _describe(manifest.get(key)):
                raise ShardMismatchError(f"shard {index} ({shard.path}) has another {key}: {_describe(shard.manifest.get(key))}, "
                                         f"the merged store's is {_describe(manifest.get(key))}")
        ids = list(shard.expected_ids)
        if ids != list(expected_ids[start : start + len(ids)]):
            seen = set(expected_ids[:start])
            overlap = sorted(set(ids) & seen)
            reason = f"examples already in an earlier shard: {overlap[:5]}" if overlap else "not the next examples in order"
            raise ShardMismatchError(f"shard {index} ({shard.path}) holds {len(ids)} examples, {reason}")
        if dataset_fingerprints is not None and shard.manifest["dataset_fingerprint"] != dataset_fingerprints[index]:
            raise ShardMismatchError(f"shard {index} ({shard.path}) has another dataset_fingerprint: "
                                     f"{shard.manifest['dataset_fingerprint']}, its slice's is {dataset_fingerprints[index]}")
        if shard.manifest["store"]["library_versions"] != versions:
            raise ShardMismatchError(f"shard {index} ({shard.path}) has other library_versions: "
                                     f"{_describe(shard.manifest['store']['library_versions'])} vs shard 0's {_describe(versions)}")
        start += len(ids)
    if start != len(expected_ids):
        raise ShardMismatchError(f"the shards hold {start} of {len(expected_ids)} examples: first missing "
                                 f"{list(expected_ids[start : start + 5])}")


def merge_shards(shards: Sequence[FeatureStore], path: Path, manifest: dict[str, Any], expected_ids: Sequence[str],
                 dataset_fingerprints: Sequence[str] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FeatureStore:
    """Merge finished shard stores into the store at ``path`` that a one-process run would write.

    Rows go through the ordinary writer (:meth:`FeatureStore.create_or_resume`), so the merged store is
    chunked, atomic and resumable like any other, and its final files are those a one-process run writes from
    the same rows. Shards are checked first (:func:`check_shards`).
    """
    check_shards(shards, manifest, expected_ids, dataset_fingerprints)
    if (Path(path) / COMPLETE_FILE).is_file():
        return FeatureStore.open(path, expect=manifest)
    writer = FeatureStore.create_or_resume(path, manifest, expected_ids, chunk_size=chunk_size,
                                           ragged_arrays=shards[0].manifest["store"]["ragged_arrays"])
    ragged = writer.manifest["store"]["ragged_arrays"]
    with writer:
        done = writer.done_ids()
        for shard in shards:
            arrays = {name: shard.array(name) for name in shard.array_names}
            for row in pq.read_table(shard.path / TABLE_FILE).to_pylist():
                if row[ID_COLUMN] in done:
                    continue
                index, error = row.pop(ARRAY_INDEX_COLUMN), row.pop(ERROR_COLUMN)
                if error is not None:
                    writer.add_error(row.pop(ID_COLUMN), error, row)
                    continue
                kept = {}
                for name, array in arrays.items():
                    value = np.asarray(array[index])
                    kept[name] = value[..., : row[ragged[name]]] if name in ragged else value
                writer.add(row, kept)
        return writer.finalize()


# ------------------------------------------------------------------------------------------ the whole run
@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one run extracts, known before any model is loaded: the merged store's place and identity."""

    dataset: Any
    ids: list[str]
    dataset_fp: str
    path: Path


def plan(model: str | Path, dataset: Any, settings: ExtractionSettings, root: Path, dtype: torch.dtype) -> RunPlan:
    """The merged store ``model`` over ``dataset`` gets (its path from the weights, dtype, inputs, settings, code)."""
    from vrp_utils.models.loading import fingerprint_files, resolve_model_dir

    model_fp = dtype_fingerprint(fingerprint_files(resolve_model_dir(model)), dtype)
    dataset_fp = dataset_fingerprint(dataset)
    ids = [example_id(row) for row in dataset.select_columns(["question_id", "setting"])]
    path = store_path(root, model_fp, dataset_fp, store_settings(settings), code_version())
    return RunPlan(dataset, ids, dataset_fp, path)


def extract_distributed(
    model: str | Path,
    dataset: Any,
    settings: ExtractionSettings = ExtractionSettings(),
    *,
    root: Path = STORE_DIR,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep_shards: bool = False,
    progress: bool = True,
    loader: Callable[..., Any] = load_placed,
) -> FeatureStore:
    """Run (or resume) one extraction pass over ``dataset``, split over the processes ``accelerate`` started.

    Call it in every process (``accelerate launch``, or plain ``python`` for one process: then it is
    :func:`~vrp_utils.extract.engine.extract` on ``device`` in ``dtype``). Returns the merged store in every
    process. A finished merged store is returned without loading the model; a finished shard is not redone.
    """
    from accelerate import PartialState

    device = parse_device(device)
    state = PartialState(cpu=device == "cpu", timeout=BARRIER_TIMEOUT)
    run = plan(model, dataset, settings, root, dtype)
    if (run.path / COMPLETE_FILE).is_file():
        return FeatureStore.open(run.path)
    if state.num_processes > 1 and device == "auto":
        raise ValueError("--device auto spreads one model over all GPUs: run it in one process, not under "
                         f"{state.num_processes} processes (use --device cuda to give each process its own GPU)")
    # Under several processes each takes the accelerator accelerate gave it (cuda -> cuda:<local rank>).
    placed = str(state.device) if state.num_processes > 1 and device != "cpu" else device
    loaded = loader(model, placed, dtype)
    if state.num_processes == 1:
        return extract(loaded, dataset, settings, root=root, progress=progress, chunk_size=chunk_size)

    ranks = [shard_dir(run.path, rank, state.num_processes) for rank in range(state.num_processes)]
    with state.split_between_processes(dataset) as mine, \
            _WholeRunBar(ranks, len(run.ids), f"extract {loaded.name} ({state.num_processes} processes)",
                         progress and state.is_main_process):
        extract(loaded, mine, settings, root=ranks[state.process_index], progress=False, chunk_size=chunk_size)
    state.wait_for_everyone()
    if state.is_main_process:
        started = time.time()
        shards = [FeatureStore.open(_only_store(root_dir)) for root_dir in ranks]
        fingerprints = [_slice_fingerprint(dataset, run.ids, shard.expected_ids) for shard in shards]
        merged = merge_shards(shards, run.path, _store_manifest(loaded, run.dataset_fp, settings), run.ids,
                              fingerprints, chunk_size=max(chunk_size, 256))
        if not keep_shards:
            shutil.rmtree(shards_root(run.path))
        if progress:
            print(f"merged {len(shards)} shards into {merged.path} in {time.time() - started:.1f} s", file=sys.stderr)
    state.wait_for_everyone()
    return FeatureStore.open(run.path)


def _only_store(root: Path) -> Path:
    stores = sorted(path for path in root.glob("*/") if (path / "manifest.json").is_file())
    if len(stores) != 1:
        raise ShardMismatchError(f"{root} should hold exactly one shard store, found {[p.name for p in stores]}")
    return stores[0]


def _slice_fingerprint(dataset: Any, ids: list[str], shard_ids: Sequence[str]) -> str:
    """Fingerprint of the contiguous slice of ``dataset`` holding ``shard_ids`` (what the shard should have seen)."""
    start = ids.index(shard_ids[0]) if shard_ids else 0
    return dataset_fingerprint(dataset.select(range(start, start + len(shard_ids))))


# ---------------------------------------------------------------------------------------------------- CLI
def _dataset(args: argparse.Namespace):
    """The examples the CLI was asked for: benchmark settings, or POPE and task question files
    (:func:`vrp_utils.data.questions.question_splits`), optionally as distinct inputs."""
    from vrp_utils.data.questions import question_splits
    from vrp_utils.extract.features import benchmark_splits, distinct_inputs, parse_settings

    if args.questions:
        if not args.image_dir:
            raise ValueError("--questions needs --image-dir")
        splits = question_splits(args.questions, args.image_dir, args.limit)
    elif args.distinct:
        splits = benchmark_splits(parse_settings(args.split), args.limit)
    else:
        dataset = load_split(args.split)
        return dataset.select(range(min(args.limit, len(dataset)))) if args.limit is not None else dataset
    if args.distinct:
        return distinct_inputs(splits)[0]
    import datasets

    return datasets.concatenate_datasets(list(splits.values()))


def main(argv: list[str] | None = None) -> int:
    """``python -m vrp_utils.extract``: one pass into a store, in one process or under ``accelerate launch``."""
    parser = argparse.ArgumentParser(
        prog="python -m vrp_utils.extract",
        description="Run one extraction pass into a feature store (under `accelerate launch`: split over the processes).",
        epilog="Two processes on a CPU-only machine: accelerate launch --multi_gpu --num_processes 2 -m vrp_utils.extract ...",
    )
    parser.add_argument("--model", required=True, help="zoo name, local directory, or hub id with local weights")
    parser.add_argument("--split", default="adversarial",
                        help="benchmark setting: random, popular, adversarial, or 'all' (with --distinct: comma-separated)")
    parser.add_argument("--questions", type=Path, action="append",
                        help="a question file (repeatable) instead of the embedded benchmark: POPE's format, or a task "
                        "file (JSON Lines of question, image, answer, task [presence|counting], optional question_id; "
                        "see data/README.md), told apart by a 'task' key in the first row")
    parser.add_argument("--image-dir", type=Path, help="with --questions: the image folder")
    parser.add_argument("--distinct", action="store_true",
                        help="extract each distinct (image, question) input once: the store open_features and `make features` read")
    parser.add_argument("--limit", type=int, help="only the first N examples (per setting with --distinct or --questions)")
    parser.add_argument("--max-new-tokens", type=int, default=ExtractionSettings.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=ExtractionSettings.batch_size)
    parser.add_argument("--device", default="cpu", help="cpu, cuda (each process its own GPU), cuda:N, mps, or auto "
                        "(one process; a model larger than one GPU spread over all of them)")
    parser.add_argument("--dtype", default="float32", help=f"{', '.join(DTYPES)} (part of the store's identity)")
    parser.add_argument("--out", type=Path, default=STORE_DIR)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="examples per committed chunk (not part of the store identity)")
    parser.add_argument("--keep-shards", action="store_true", help="keep each process's shard store after the merge")
    args = parser.parse_args(argv)
    try:
        dtype = parse_dtype(args.dtype)
        parse_device(args.device)
        settings = ExtractionSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        dataset = _dataset(args)
        started = time.time()
        store = extract_distributed(args.model, dataset, settings, root=args.out, device=args.device, dtype=dtype,
                                    chunk_size=args.chunk_size, keep_shards=args.keep_shards)
    except (ValueError, FileNotFoundError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"{store.path}: {store.summary()} in {time.time() - started:.1f} s")
    return 0
