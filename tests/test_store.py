"""Feature store: round trip, chunking, crash/resume (kill -9 in a subprocess), errors, staleness."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vrp_utils.extract.store import (
    COMPLETE_FILE,
    CorruptStoreError,
    DuplicateExampleError,
    FeatureStore,
    IncompleteStoreError,
    StaleStoreError,
    StoreError,
    StoreLockedError,
    store_identity,
    store_path,
)

# A deterministic stand-in for one extraction pass; the same file is imported here for the
# reference run and executed as a subprocess that gets SIGKILLed.
WORKER_SOURCE = r'''
import json, os, signal, sys, time
import numpy as np
from vrp_utils.extract.store import FeatureStore, store_identity

N = 12
IDS = [f"ex{i:03d}" for i in range(N)]
ERRORS = {4: "parse_failed", 9: "parse_failed", 10: "empty_generation"}
MANIFEST = store_identity("tiny-llava@abc123", "pope-synth@def456", {"positions": "mean", "dtype": "float16"}, "extract-v1")


def example(i):
    rng = np.random.default_rng(1000 + i)
    n_image_tokens = 4 + (i * 5) % 7  # ragged, as for Qwen2-VL
    n_answer = 1 + i % 3
    record = {
        "id": IDS[i],
        "question_id": i,
        "question": f"Is there a {['cat', 'dog', 'car'][i % 3]} in the image?",
        "label": "yes" if i % 2 else "no",
        "generated_text": "Yes" if i % 3 else "No.",
        "parsed_answer": "yes" if i % 3 else "no",
        "correct": bool(i % 2 == bool(i % 3)),
        "logit_margin": float(rng.normal()),
        "answer_length": n_answer,
        "token_logprobs": rng.normal(size=n_answer).astype(np.float32),
        "token_entropies": [float(x) for x in rng.random(n_answer)],
        "token_margins": rng.random(n_answer).tolist(),
        "grid_rows": 2,
        "grid_cols": n_image_tokens // 2,
        "boxes": json.dumps([[0.1 * i, 0.2, 0.5, 0.9]]),
        "error": None,
    }
    arrays = {
        "attention": rng.random((3, 2, 1, n_image_tokens)).astype(np.float16),
        "hidden_last_prompt": rng.normal(size=(3, 8)).astype(np.float32),
        "hidden_answer_mean": rng.normal(size=(3, 8)).astype(np.float32),
    }
    return record, arrays


def run(path, chunk_size, sleep=0.0):
    writer = FeatureStore.create_or_resume(path, MANIFEST, IDS, chunk_size=chunk_size)
    done = writer.done_ids()
    for i, example_id in enumerate(IDS):
        if example_id in done:
            continue
        if i in ERRORS:
            writer.add_error(example_id, ERRORS[i], {"question_id": i, "question": f"question {i}"})
        else:
            writer.add(*example(i))
        if sleep:
            time.sleep(sleep)
    return writer.finalize()


def die_at_event(kill_at):
    """SIGKILL this process at the kill_at-th fsync/replace: every intermediate state of a write."""
    count = [0]
    real_replace, real_fsync = os.replace, os.fsync

    def maybe_die():
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def replace(*args, **kwargs):
        maybe_die()
        return real_replace(*args, **kwargs)

    def fsync(fd):
        maybe_die()
        return real_fsync(fd)

    os.replace, os.fsync = replace, fsync


if __name__ == "__main__":
    path, chunk_size, kill_at, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if kill_at > 0:
        die_at_event(kill_at)
    run(path, chunk_size, sleep)
'''

FINAL_FILES = (
    "manifest.json",
    "expected_ids.json",
    "table.parquet",
    "attention.npy",
    "hidden_last_prompt.npy",
    "hidden_answer_mean.npy",
    COMPLETE_FILE,
)


@pytest.fixture
def worker(tmp_path: Path) -> tuple[ModuleType, Path]:
    source = tmp_path / "store_worker.py"
    source.write_text(WORKER_SOURCE)
    spec = importlib.util.spec_from_file_location("store_worker", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, source


def run_worker(source: Path, store: Path, chunk_size: int = 3, kill_at: int = 0, sleep: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(source), str(store), str(chunk_size), str(kill_at), str(sleep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> int:
    _, stderr = process.communicate(timeout=120)
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed with {process.returncode}:\n{stderr}")
    return process.returncode


def assert_same_store(store: Path, reference: Path) -> None:
    """Byte-for-byte equal final files and nothing else left behind (no chunks, no temporaries)."""
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in reference.iterdir())
    for name in FINAL_FILES:
        assert (store / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = FeatureStore.open(store), FeatureStore.open(reference)
    pd.testing.assert_frame_equal(ours.table(include_errors=True), theirs.table(include_errors=True))
    for name in theirs.array_names:
        np.testing.assert_array_equal(ours.array(name), theirs.array(name))


def reference_store(worker_module: ModuleType, root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """Uninterrupted run in this process; also counts its fsync/replace events (the kill points)."""
    count = [0]
    real_replace, real_fsync = os.replace, os.fsync

    def replace(*args: object, **kwargs: object) -> None:
        count[0] += 1
        real_replace(*args, **kwargs)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        count[0] += 1
        real_fsync(fd)

    path = root / "reference"
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(os, "fsync", fsync)
        worker_module.run(path, 3)
    return path, count[0]


def make_example(i: int, n_image_tokens: int, width: int = 8) -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(i)
    record = {"id": f"e{i}", "question": f"q{i}", "correct": bool(i % 2), "token_logprobs": rng.normal(size=2).tolist()}
    arrays = {
        "attention": rng.random((2, 3, 1, n_image_tokens)).astype(np.float16),
        "hidden_last_prompt": rng.normal(size=(2, width)).astype(np.float32),
        "hidden_answer_mean": rng.normal(size=(2, width)).astype(np.float32),
    }
    return record, arrays


MANIFEST = store_identity("m", "d", {"layers": [0, 1]}, "v1")


# ------------------------------------------------------------------------------------------ tests


def test_store_path_is_deterministic_and_depends_on_every_part(tmp_path: Path) -> None:
    base = store_path(tmp_path, "tiny llava/v1", "pope:adv", {"a": 1, "b": [1, 2]}, "c1")
    assert base == store_path(tmp_path, "tiny llava/v1", "pope:adv", {"b": (1, 2), "a": 1}, "c1")
    assert base.parent == tmp_path and base.name.startswith("tiny-llava-v1__pope-adv-")
    others = {
        store_path(tmp_path, "tiny llava/v2", "pope:adv", {"a": 1, "b": [1, 2]}, "c1"),
        store_path(tmp_path, "tiny llava/v1", "pope:rnd", {"a": 1, "b": [1, 2]}, "c1"),
        store_path(tmp_path, "tiny llava/v1", "pope:adv", {"a": 2, "b": [1, 2]}, "c1"),
        store_path(tmp_path, "tiny llava/v1", "pope:adv", {"a": 1, "b": [1, 2]}, "c2"),
    }
    assert base not in others and len(others) == 4


def test_round_trip_with_ragged_image_tokens_and_memmap(tmp_path: Path) -> None:
    counts = [5, 3, 7, 4, 6]
    ids = [f"e{i}" for i in range(len(counts))]
    examples = [make_example(i, n) for i, n in enumerate(counts)]
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=2)
    for record, arrays in examples:
        writer.add(record, arrays)
    store = writer.finalize()

    table = store.table()
    assert list(table["id"]) == ids
    assert list(table["array_index"]) == list(range(5))
    assert list(table["n_image_tokens"]) == counts
    assert list(table["question"]) == [record["question"] for record, _ in examples]
    assert list(table["correct"]) == [record["correct"] for record, _ in examples]
    np.testing.assert_allclose(np.stack(table["token_logprobs"].to_numpy()), [r["token_logprobs"] for r, _ in examples])

    attention = store.attention()
    assert isinstance(attention, np.memmap) and attention.dtype == np.float16
    assert attention.shape == (5, 2, 3, 1, max(counts))
    assert isinstance(store.attention(layer=1), np.memmap) and store.attention(layer=1).shape == (5, 3, 1, 7)
    np.testing.assert_array_equal(store.image_token_counts(), counts)
    mask = store.image_token_mask()
    assert mask.shape == (5, 7) and mask.sum(axis=1).tolist() == counts
    for i, (_, arrays) in enumerate(examples):
        np.testing.assert_array_equal(attention[i, ..., : counts[i]], arrays["attention"])
        assert not attention[i, ..., counts[i] :].any(), "padding must be zeros"
        np.testing.assert_array_equal(store.hidden(kind="last_prompt")[i], arrays["hidden_last_prompt"])
        np.testing.assert_array_equal(store.hidden(layer=0, kind="answer_mean")[i], arrays["hidden_answer_mean"][0])
    assert isinstance(store.hidden(), np.memmap)
    with pytest.raises(ValueError, match="kind"):
        store.hidden(kind="first")
    store.verify()
    assert store.manifest["settings"] == {"layers": [0, 1]}
    assert store.manifest["store"]["library_versions"]["numpy"] == np.__version__


def test_chunked_writing_commits_every_three_rows_and_finalize_removes_chunks(tmp_path: Path) -> None:
    ids = [f"e{i}" for i in range(10)]
    path = tmp_path / "s"
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=3)
    for i in range(10):
        writer.add(*make_example(i, 4 + i % 3))
        commits = sorted(p.name for p in (path / "chunks").glob("*.commit.json"))
        assert len(commits) == (i + 1) // 3
    with pytest.raises(IncompleteStoreError, match="not finalized"):
        FeatureStore.open(path)
    partial = FeatureStore.open(path, allow_partial=True)
    assert partial.n_ok == 9 and not partial.summary()["complete"]  # the 10th row is still buffered
    store = writer.finalize()
    assert not (path / "chunks").exists()
    assert store.n_ok == 10 and list(store.table()["id"]) == ids


def test_final_bytes_do_not_depend_on_chunk_size_or_add_order(tmp_path: Path, worker: tuple[ModuleType, Path]) -> None:
    module, _ = worker
    module.run(tmp_path / "a", 3)
    module.run(tmp_path / "b", 5)
    module.run(tmp_path / "c", 100)
    # Same content added in reverse order: final rows follow expected_ids, not add order.
    writer = FeatureStore.create_or_resume(tmp_path / "d", module.MANIFEST, module.IDS, chunk_size=4)
    for i in reversed(range(module.N)):
        if i in module.ERRORS:
            writer.add_error(module.IDS[i], module.ERRORS[i], {"question_id": i, "question": f"question {i}"})
        else:
            writer.add(*module.example(i))
    writer.finalize()
    for other in "bcd":
        assert_same_store(tmp_path / other, tmp_path / "a")


def test_resume_after_sigkill_at_random_write_events_matches_uninterrupted_run(
    tmp_path: Path, worker: tuple[ModuleType, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, source = worker
    reference, n_events = reference_store(module, tmp_path, monkeypatch)
    store = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    # Each run dies at a random fsync/replace (mid-chunk, between a chunk's files, before its
    # commit, during finalize...), the next one resumes; stop when a run gets to the end.
    for _ in range(5):
        returncode = finish(run_worker(source, store, kill_at=rng.randint(1, 20)))
        if returncode == 0:
            break
        kills += 1
    else:
        assert finish(run_worker(source, store)) == 0
    assert kills >= 3
    assert_same_store(store, reference)

    # Kills inside finalize: the last events of a run are the final table, arrays and complete.json.
    for back in (0, 4):
        store = tmp_path / f"killed-finalize-{back}"
        assert finish(run_worker(source, store, kill_at=n_events - back)) == -signal.SIGKILL
        # back=0: died at the last directory fsync, after complete.json, before the chunks were removed
        assert (store / COMPLETE_FILE).exists() == (back == 0)
        assert finish(run_worker(source, store)) == 0
        assert_same_store(store, reference)


def test_resume_after_sigkill_at_random_times(
    tmp_path: Path, worker: tuple[ModuleType, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    module, source = worker
    reference, _ = reference_store(module, tmp_path, monkeypatch)
    store = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    for _ in range(4):
        process = run_worker(source, store, sleep=0.03)
        deadline = time.monotonic() + 60
        while not (store / "manifest.json").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # wait for the writer to start, then kill it somewhere in its writes
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        if finish(process) == -signal.SIGKILL:
            kills += 1
    assert kills >= 2
    if not (store / COMPLETE_FILE).exists():
        assert finish(run_worker(source, store)) == 0
    assert_same_store(store, reference)


def test_duplicates_and_unknown_ids_raise(tmp_path: Path) -> None:
    ids = ["e0", "e1", "e2"]
    path = tmp_path / "s"
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    writer.add(*make_example(0, 4))
    with pytest.raises(DuplicateExampleError, match="e0"):  # still buffered
        writer.add(*make_example(0, 4))
    writer.add(*make_example(1, 4))  # commits chunk 0
    with pytest.raises(DuplicateExampleError, match="e1"):
        writer.add_error("e1", "oom")
    with pytest.raises(KeyError, match="e9"):
        writer.add(*make_example(9, 4))
    with pytest.raises(StoreLockedError):
        FeatureStore.create_or_resume(path, MANIFEST, ids)
    writer.close()
    resumed = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    assert resumed.done_ids() == {"e0", "e1"}
    with pytest.raises(DuplicateExampleError, match="done_ids"):
        resumed.add(*make_example(0, 4))
    with pytest.raises(IncompleteStoreError, match="1 of 3 expected ids"):
        resumed.finalize()
    resumed.add(*make_example(2, 4))
    assert list(resumed.finalize().table()["id"]) == ids
    with pytest.raises(ValueError, match="duplicates"):
        FeatureStore.create_or_resume(tmp_path / "t", MANIFEST, ["a", "a"])


def test_error_rows_are_counted_kept_and_excluded_by_default(tmp_path: Path) -> None:
    ids = [f"e{i}" for i in range(6)]
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=4)
    for i in range(6):
        if i in (1, 4):
            writer.add_error(f"e{i}", "parse_failed", {"question": f"q{i}", "generated_text": "maybe"})
        elif i == 5:
            writer.add_error(f"e{i}", "image_too_large")
        else:
            writer.add(*make_example(i, 3 + i))
    assert writer.summary()["n_error"] == 3
    store = writer.finalize()
    expected = {"n_expected": 6, "n_ok": 3, "n_error": 3, "complete": True}
    assert store.summary() == {**expected, "error_reasons": {"image_too_large": 1, "parse_failed": 2}}
    assert store.n_errors == 3 and store.n_ok == 3
    table = store.table()
    assert list(table["id"]) == ["e0", "e2", "e3"] and table["error"].isna().all()
    assert store.attention().shape[0] == 3 and store.hidden().shape[0] == 3
    np.testing.assert_array_equal(store.image_token_counts(), [3, 5, 6])
    everything = store.table(include_errors=True)
    assert list(everything["id"]) == ids
    assert list(everything["array_index"]) == [0, -1, 1, 2, -1, -1]
    assert list(everything["error"].fillna("")) == ["", "parse_failed", "", "", "parse_failed", "image_too_large"]
    assert everything.loc[1, "generated_text"] == "maybe"


@pytest.mark.parametrize("chunk_size, n_errors_first", [(1, 0), (3, 2)])
def test_first_ok_row_that_fills_a_chunk_keeps_its_arrays(tmp_path: Path, chunk_size: int, n_errors_first: int) -> None:
    """The add that makes the buffer full commits the chunk: it must already know the array specs.

    Found by the property test of the round trip: with chunk_size=1, or error rows filling a chunk
    up to the first OK row, that chunk was committed with no array files and finalize failed.
    """
    ids = [f"e{i}" for i in range(4)]
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=chunk_size)
    for i in range(4):
        if i < n_errors_first:
            writer.add_error(f"e{i}", "parse_failed")
        else:
            writer.add(*make_example(i, 3 + i))
    store = writer.finalize()
    assert store.n_ok == 4 - n_errors_first
    for j, i in enumerate(range(n_errors_first, 4)):
        np.testing.assert_array_equal(store.attention()[j, ..., : 3 + i], make_example(i, 3 + i)[1]["attention"])


def test_stale_manifest_or_ids_raise(tmp_path: Path) -> None:
    ids = ["e0", "e1"]
    path = tmp_path / "s"
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids)
    writer.add(*make_example(0, 4))
    writer.close()  # partial store on disk
    newer = store_identity("m", "d", {"layers": [0, 1]}, "v2")
    with pytest.raises(StaleStoreError, match="code_version"):
        FeatureStore.create_or_resume(path, newer, ids)
    with pytest.raises(StaleStoreError, match="expected ids"):
        FeatureStore.create_or_resume(path, MANIFEST, ["e0", "e1", "e2"])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["store"]["library_versions"]["numpy"] = "0.0.1"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleStoreError, match=re.escape(f"library versions (numpy: 0.0.1 -> {np.__version__})")):
        FeatureStore.create_or_resume(path, MANIFEST, ids)

    done = tmp_path / "done"
    writer = FeatureStore.create_or_resume(done, MANIFEST, ids)
    for i in range(2):
        writer.add(*make_example(i, 4))
    writer.finalize()
    FeatureStore.open(done, expect=MANIFEST)  # matches
    with pytest.raises(StaleStoreError, match="settings"):
        FeatureStore.open(done, expect=store_identity("m", "d", {"layers": [0]}, "v1"))
    with pytest.raises(StaleStoreError, match="model_fingerprint"):
        FeatureStore.open(done, expect={"model_fingerprint": "other"})
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore.open(tmp_path)


def test_inconsistent_arrays_and_bad_records_fail_at_add(tmp_path: Path) -> None:
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, [f"e{i}" for i in range(5)])
    writer.add(*make_example(0, 4))
    with pytest.raises(ValueError, match="hidden_last_prompt: <f4 \\[2, 9\\]"):
        writer.add(*make_example(1, 4, width=9))  # only the image-token axis may vary
    record, arrays = make_example(2, 4)
    del arrays["hidden_answer_mean"]
    with pytest.raises(ValueError, match="do not match"):
        writer.add(record, arrays)
    record, arrays = make_example(3, 4)
    with pytest.raises(TypeError, match="'question'"):
        writer.add({**record, "question": 3.5j}, arrays)
    with pytest.raises(TypeError, match="clash"):
        writer.add({**record, "correct": "yes"}, arrays)
    with pytest.raises(ValueError, match="add_error"):
        writer.add({**record, "error": "oom"}, arrays)
    with pytest.raises(ValueError, match="n_image_tokens"):
        writer.add({**record, "n_image_tokens": 5}, arrays)
    assert writer.done_ids() == {"e0"}  # failed adds leave nothing behind


# ----------------------------------------------------------------------------- damaged stores


def damage(path: Path, how: str) -> None:
    """Delete the file, cut it to half its size, or flip one byte (same size)."""
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


def partial_store(path: Path) -> list[str]:
    """Six examples committed as three chunks of two (c000000 .. c000002), not finalized."""
    ids = [f"e{i}" for i in range(8)]
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    for i in range(6):
        writer.add(*make_example(i, 3 + i % 3))
    writer.close()
    assert sorted(p.name for p in (path / "chunks").glob("*.commit.json")) == [f"c00000{i}.commit.json" for i in range(3)]
    return ids


# A deleted commit.json is not damage: the chunk was never committed (see the next test).
CHUNK_DAMAGE = [(name, how) for name in ("table.parquet", "attention.npy", "hidden_answer_mean.npy") for how in ("delete", "truncate")]


@pytest.mark.parametrize(("name", "how"), [*CHUNK_DAMAGE, ("commit.json", "truncate")])
@pytest.mark.parametrize("chunk", ["c000002", "c000000"], ids=["last-chunk", "earlier-chunk"])
def test_damaged_committed_chunk_is_refused_naming_the_file(tmp_path: Path, chunk: str, name: str, how: str) -> None:
    path = tmp_path / "s"
    ids = partial_store(path)
    damaged = path / "chunks" / f"{chunk}.{name}"
    damage(damaged, how)
    before = sorted(p.name for p in (path / "chunks").iterdir())
    message = re.escape(str(damaged))
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.open(path, allow_partial=True)
    # The refused resume deleted nothing (the damaged store is left as it was, for inspection) and
    # released the lock, so the next attempt gets the same error, not StoreLockedError.
    assert sorted(p.name for p in (path / "chunks").iterdir()) == before
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)


def test_uncommitted_last_chunk_is_redone_on_resume(tmp_path: Path) -> None:
    """The one legitimate loss: a chunk whose commit.json never landed (killed mid-flush) is not done."""
    path = tmp_path / "s"
    ids = partial_store(path)
    (path / "chunks" / "c000002.commit.json").unlink()
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    assert writer.done_ids() == {"e0", "e1", "e2", "e3"}
    assert not list((path / "chunks").glob("c000002.*"))
    for i in range(4, 8):
        writer.add(*make_example(i, 3 + i % 3))
    assert list(writer.finalize().table()["id"]) == ids


def complete_store(path: Path) -> list[str]:
    ids = [f"e{i}" for i in range(5)]
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    for i in range(5):
        writer.add(*make_example(i, 3 + i % 3))
    writer.finalize().verify()
    return ids


@pytest.mark.parametrize("how", ["delete", "truncate"])
@pytest.mark.parametrize("name", ["table.parquet", "attention.npy", "hidden_last_prompt.npy"])
def test_damaged_final_file_of_complete_store_is_refused_naming_the_file(tmp_path: Path, name: str, how: str) -> None:
    path = tmp_path / "s"
    ids = complete_store(path)
    opened = FeatureStore.open(path)  # opened while intact: verify() must still notice
    damage(path / name, how)
    message = re.escape(str(path / name))
    with pytest.raises(CorruptStoreError, match=message):
        opened.verify()
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.open(path)
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.open(path, allow_partial=True)
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.create_or_resume(path, MANIFEST, ids)
    with pytest.raises(CorruptStoreError, match=message):  # the refused resume released its lock
        FeatureStore.create_or_resume(path, MANIFEST, ids)


def test_verify_notices_a_changed_byte_that_keeps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "s"
    complete_store(path)
    damage(path / "hidden_answer_mean.npy", "flip")
    store = FeatureStore.open(path)  # sizes match: opening stays cheap and does not hash
    with pytest.raises(CorruptStoreError, match=re.escape(str(path / "hidden_answer_mean.npy")) + ": sha256"):
        store.verify()


# ------------------------------------------------------------------------- identity, empty and partial


def test_store_path_golden_value() -> None:
    """The directory name is a published identity: readable slugs (cut to 32 characters, ``-``/``.`` trimmed
    before and after the cut, ``x`` when nothing is left) plus the first 16 hex digits of the sha256 of the
    canonical identity JSON (sorted keys, no spaces), written out here by hand."""
    settings = {"b": (1, 2), "a": 1.5}
    canonical = (
        '{"code_version":"v3","dataset_fingerprint":"..POPE/coco adversarial, splits v2 of 2014",'
        '"model_fingerprint":"..Xtra/LLaVA 1.5 (7B) X","settings":{"a":1.5,"b":[1,2]}}'
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    path = store_path("/stores", "..Xtra/LLaVA 1.5 (7B) X", "..POPE/coco adversarial, splits v2 of 2014", settings, "v3")
    assert path == Path("/stores") / f"Xtra-LLaVA-1.5-7B-X__POPE-coco-adversarial-splits-v2-{digest}"
    assert store_path("/stores", "%%%", "d", {}, "v3").name.startswith("x__d-")


@pytest.mark.parametrize("value", ["", 3, None])
@pytest.mark.parametrize("part", ["model_fp", "dataset_fp", "code_version"])
def test_store_identity_refuses_empty_or_non_string_parts(part: str, value: object) -> None:
    parts = {"model_fp": "m", "dataset_fp": "d", "settings": {}, "code_version": "v1", part: value}
    with pytest.raises(ValueError, match=rf"^{part} must be a non-empty string, got {re.escape(repr(value))}$"):
        store_identity(**parts)


def test_store_identity_refuses_settings_that_are_not_a_json_dict() -> None:
    with pytest.raises(TypeError, match=r"^settings must be a dict, got list$"):
        store_identity("m", "d", [("a", 1)], "v1")
    with pytest.raises(TypeError, match=r"^settings: value of type object is not JSON-serialisable"):
        store_identity("m", "d", {"a": object()}, "v1")
    with pytest.raises(ValueError, match="not JSON compliant"):  # NaN has no JSON spelling: never in an identity
        store_identity("m", "d", {"threshold": float("nan")}, "v1")
    identity = store_identity("m", "d", {"a": np.int64(3), "b": (np.float32(0.5), Path("x/y"))}, "v1")
    assert identity == {"model_fingerprint": "m", "dataset_fingerprint": "d", "code_version": "v1",
                        "settings": {"a": 3, "b": [0.5, "x/y"]}}


@pytest.mark.parametrize("change", ["extra key", "missing key"])
def test_resume_refuses_a_manifest_with_a_key_added_or_removed(tmp_path: Path, change: str) -> None:
    ids = ["e0", "e1"]
    path = tmp_path / "s"
    FeatureStore.create_or_resume(path, {**MANIFEST, "note": "run 1"}, ids).close()
    manifest = {**MANIFEST, "note": "run 1", "seed": 7} if change == "extra key" else MANIFEST
    key = "seed" if change == "extra key" else "note"
    with pytest.raises(StaleStoreError, match=re.escape(f"stale feature store {path}: ") + rf"(.|\n)*\n  {key}: store has"):
        FeatureStore.create_or_resume(path, manifest, ids)


def test_store_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    path = store_path(tmp_path / "not" / "yet", "m", "d", {}, "v1")
    FeatureStore.create_or_resume(path, MANIFEST, ["e0"]).close()
    assert (path / "manifest.json").is_file()


def test_writer_summary_counts_buffered_and_committed_rows(tmp_path: Path) -> None:
    ids = [f"e{i}" for i in range(6)]
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=3)
    writer.add(*make_example(0, 4))
    writer.add_error("e1", "oom")
    writer.add(*make_example(2, 4))  # commits chunk 0
    writer.add_error("e3", "parse_failed")
    writer.add_error("e4", "oom")  # buffered
    assert writer.summary() == {
        "n_expected": 6, "n_ok": 2, "n_error": 3, "error_reasons": {"oom": 2, "parse_failed": 1}, "complete": False,
    }
    writer.close()
    resumed = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=3)
    assert resumed.summary() == {
        "n_expected": 6, "n_ok": 2, "n_error": 3, "error_reasons": {"oom": 2, "parse_failed": 1}, "complete": False,
    }
    resumed.add(*make_example(5, 4))
    assert resumed.manifest_without_store() == MANIFEST
    final = {"n_expected": 6, "n_ok": 3, "n_error": 3, "error_reasons": {"oom": 2, "parse_failed": 1}, "complete": True}
    assert resumed.finalize().summary() == final
    assert resumed.complete and resumed.summary() == final


def test_partial_store_with_nothing_committed_opens_empty(tmp_path: Path) -> None:
    """Killed before its first chunk: the partial store reads as zero rows with the store's own columns."""
    path = tmp_path / "s"
    FeatureStore.create_or_resume(path, MANIFEST, ["e0", "e1"]).close()
    store = FeatureStore.open(path, allow_partial=True)
    assert not store.complete and store.n_ok == 0 and store.n_errors == 0 and store.array_names == []
    assert store.summary() == {"n_expected": 2, "n_ok": 0, "n_error": 0, "error_reasons": {}, "complete": False}
    table = store.table(include_errors=True)
    assert list(table.columns) == ["id", "error", "array_index", "n_image_tokens"] and len(table) == 0
    assert repr(store) == f"FeatureStore({str(path)!r}, partial, n_ok=0, n_error=0)"
    with pytest.raises(IncompleteStoreError, match="not finalized"):
        store.verify()
    with pytest.raises(IncompleteStoreError, match="allow_partial=True"):
        FeatureStore.open(path)


def test_partial_store_reads_the_committed_rows_and_arrays(tmp_path: Path) -> None:
    path = tmp_path / "s"
    partial_store(path)  # e0..e5 committed, e6 and e7 never added
    store = FeatureStore.open(path, allow_partial=True)
    assert not store.complete and store.n_ok == 6
    assert list(store.table()["id"]) == [f"e{i}" for i in range(6)]
    assert repr(store) == f"FeatureStore({str(path)!r}, partial, n_ok=6, n_error=0)"
    assert store.array_names == ["attention", "hidden_answer_mean", "hidden_last_prompt"]
    assert store.attention().shape == (6, 2, 3, 1, 5) and store.attention().dtype == np.float16
    assert store.hidden().dtype == np.float32
    np.testing.assert_array_equal(store.image_token_counts(), [3 + i % 3 for i in range(6)])
    for i in range(6):
        arrays = make_example(i, 3 + i % 3)[1]
        np.testing.assert_array_equal(store.attention()[i, ..., : 3 + i % 3], arrays["attention"])
        assert not store.attention()[i, ..., 3 + i % 3 :].any()
        np.testing.assert_array_equal(store.hidden(layer=1, kind="answer_mean")[i], arrays["hidden_answer_mean"][1])
    complete = tmp_path / "c"
    complete_store(complete)
    assert repr(FeatureStore.open(complete)) == f"FeatureStore({str(complete)!r}, complete, n_ok=5, n_error=0)"


def test_partial_store_with_ids_in_two_chunks_or_unexpected_ids_is_refused(tmp_path: Path) -> None:
    """Chunks edited outside the writer: the same ids committed twice, or ids missing from expected_ids."""
    path = tmp_path / "s"
    ids = partial_store(path)
    chunks = path / "chunks"
    shutil.copy(chunks / "c000001.commit.json", chunks / "c000003.commit.json")  # c000001's rows, committed again
    with pytest.raises(CorruptStoreError, match=re.escape("ids written in more than one chunk: ['e2', 'e3']")):
        FeatureStore.open(path, allow_partial=True)
    (chunks / "c000003.commit.json").unlink()
    (path / "expected_ids.json").write_text(json.dumps(["e0", "e2", "e4", "e5", *ids[6:]]))
    with pytest.raises(CorruptStoreError, match=re.escape("chunks hold ids that are not in expected_ids: ['e1', 'e3']")):
        FeatureStore.open(path, allow_partial=True)


# --------------------------------------------------------------------- manifest, files on disk, validation


def test_manifest_records_format_versions_and_expected_ids_digest(tmp_path: Path, monkeypatch) -> None:
    """manifest.json: sorted keys, 2-space indent; the ids' sha256 is over their compact JSON list."""
    import importlib.metadata
    import platform

    from vrp_utils.extract import store as store_module

    monkeypatch.setattr(store_module, "RECORDED_PACKAGES", ("numpy", "surely-not-an-installed-package"))
    ids = ["e0", "é1"]
    path = tmp_path / "s"
    FeatureStore.create_or_resume(path, MANIFEST, ids, ragged_arrays={"attention": "n_keys"}).close()
    text = (path / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert manifest["store"] == {
        "format": "vrp-feature-store",
        "format_version": 1,
        "library_versions": {"python": platform.python_version(), "numpy": importlib.metadata.version("numpy"),
                             "surely-not-an-installed-package": None},
        "expected_ids": {"count": 2, "sha256": hashlib.sha256(b'["e0","\\u00e91"]').hexdigest()},
        "ragged_arrays": {"attention": "n_keys"},
    }
    assert {key: value for key, value in manifest.items() if key != "store"} == MANIFEST
    assert json.loads((path / "expected_ids.json").read_text()) == ids


def test_store_of_another_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    complete_store(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["store"]["format_version"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    expected = re.escape(f"{path / 'manifest.json'}: store format 'vrp-feature-store' v2, this code reads 'vrp-feature-store' v1")
    with pytest.raises(StaleStoreError, match=expected):
        FeatureStore.open(path)
    with pytest.raises(StaleStoreError, match=expected):
        FeatureStore.create_or_resume(path, MANIFEST, [f"e{i}" for i in range(5)])
    (path / "manifest.json").write_text(json.dumps({key: value for key, value in manifest.items() if key != "store"}))
    with pytest.raises(StaleStoreError, match=r"store format None vNone"):
        FeatureStore.open(path)


def test_complete_store_resumes_as_done_under_other_library_versions(tmp_path: Path) -> None:
    """A finished store is only read: resuming it (other versions, a leftover chunks dir) finishes at once."""
    path = tmp_path / "s"
    ids = [f"e{i}" for i in range(4)]
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    writer.add(*make_example(0, 4))
    writer.add_error("e1", "oom")
    writer.add_error("e2", "oom")
    writer.add(*make_example(3, 5))
    writer.finalize()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["store"]["library_versions"]["numpy"] = "0.0.1"
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "chunks").mkdir()  # finalize killed while deleting its chunks
    (path / "chunks" / "c000000.table.parquet").write_bytes(b"left over")
    resumed = FeatureStore.create_or_resume(path, MANIFEST, ids)
    assert not (path / "chunks").exists()
    assert resumed.complete and resumed.done_ids() == set(ids)
    assert resumed.summary() == {"n_expected": 4, "n_ok": 2, "n_error": 2, "error_reasons": {"oom": 2}, "complete": True}
    store = resumed.finalize()
    assert store.complete and list(store.table()["id"]) == ["e0", "e3"]
    np.testing.assert_array_equal(store.attention()[1], make_example(3, 5)[1]["attention"])


def test_resume_removes_only_temporaries_and_keeps_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = partial_store(path)
    for directory in (path, path / "chunks"):
        (directory / ".table.parquet.abc.tmp").write_bytes(b"half written")
        (directory / ".keep").write_bytes(b"")
        (directory / "notes.tmp").write_bytes(b"")
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    for directory in (path, path / "chunks"):
        assert not (directory / ".table.parquet.abc.tmp").exists()
        assert (directory / ".keep").exists() and (directory / "notes.tmp").exists()
    assert (path / ".writer.lock").exists()
    with pytest.raises(StoreLockedError, match=re.escape(f"another process is writing feature store {path}")):
        FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    assert writer.done_ids() == set(ids[:6])
    writer.close()
    writer.close()  # closing twice is a no-op
    with pytest.raises(StoreError, match=re.escape(f"writer for {path} is closed")):
        writer.add(*make_example(6, 3))


def test_create_or_resume_validates_its_arguments(tmp_path: Path) -> None:
    path = tmp_path / "s"
    for chunk_size in (0, 2.0):
        with pytest.raises(ValueError, match=rf"^chunk_size must be a positive int, got {chunk_size!r}$"):
            FeatureStore.create_or_resume(path, MANIFEST, ["e0"], chunk_size=chunk_size)
    with pytest.raises(TypeError, match=r"^manifest: value of type object is not JSON-serialisable"):
        FeatureStore.create_or_resume(path, {**MANIFEST, "note": object()}, ["e0"])
    with pytest.raises(ValueError, match="manifest key 'store' is reserved"):
        FeatureStore.create_or_resume(path, {**MANIFEST, "store": 1}, ["e0"])
    with pytest.raises(TypeError, match=re.escape("expected_ids must be non-empty strings; got ['', 3]")):
        FeatureStore.create_or_resume(path, MANIFEST, ["e0", "", 3])
    with pytest.raises(ValueError, match=re.escape("expected_ids has duplicates: ['a', 'b'] (2 in all)")):
        FeatureStore.create_or_resume(path, MANIFEST, ["b", "a", "c", "a", "b"])
    with pytest.raises(ValueError, match=re.escape("expected_ids has duplicates: ['a', 'b', 'c', 'd', 'e'] (6 in all)")):
        FeatureStore.create_or_resume(path, MANIFEST, list("abcdef") * 2)
    with pytest.raises(TypeError, match=re.escape("expected_ids must be non-empty strings; got [1, 2, 3, 4, 5]")):
        FeatureStore.create_or_resume(path, MANIFEST, [1, 2, 3, 4, 5, 6])
    assert not path.exists()  # nothing was created by a refused call
    path.mkdir()
    (path / "results.csv").write_text("x")
    with pytest.raises(StoreError, match=re.escape("has no manifest.json but is not empty (['results.csv'])")):
        FeatureStore.create_or_resume(path, MANIFEST, ["e0"])
    (path / "results.csv").unlink()
    (path / "expected_ids.json").write_text("[")  # killed between writing the ids and the manifest
    FeatureStore.create_or_resume(path, MANIFEST, ["e0"]).close()  # the lock file and ids alone are fine
    assert json.loads((path / "expected_ids.json").read_text()) == ["e0"]
    with pytest.raises(StaleStoreError, match=re.escape("ragged arrays {'attention': 'n_image_tokens'} != {'attention': 'k'}")):
        FeatureStore.create_or_resume(path, MANIFEST, ["e0"], ragged_arrays={"attention": "k"})
    with pytest.raises(StaleStoreError, match=r"made for 1 other expected ids \(sha256 [0-9a-f]{12}\), the caller expects 2"):
        FeatureStore.create_or_resume(path, MANIFEST, ["e0", "e1"])


def test_bad_ids_records_and_arrays_are_refused_at_add(tmp_path: Path) -> None:
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, [f"e{i}" for i in range(4)])
    record, arrays = make_example(0, 4)
    with pytest.raises(TypeError, match=r"^example id must be a str, got int: 3$"):
        writer.add_error(3, "oom")
    for reason in ("", None):
        with pytest.raises(ValueError, match=rf"^example 'e0': error reason must be a non-empty string, got {reason!r}$"):
            writer.add_error("e0", reason)
    with pytest.raises(ValueError, match=r"record must be a dict with an 'id' field"):
        writer.add({"question": "q"}, arrays)
    for key in ("", "_private", 7):
        with pytest.raises(ValueError, match=rf"^example 'e0': record field names must be non-empty str not starting with '_', got {key!r}"):
            writer.add({**record, key: 1}, arrays)
    with pytest.raises(ValueError, match=r"record\['id'\] is 'e1'"):
        writer.add_error("e0", "oom", {"id": "e1"})
    with pytest.raises(ValueError, match=r"record field 'array_index' is reserved"):
        writer.add({**record, "array_index": 0}, arrays)
    for name in ("table", "1st", "a-b", 5):
        with pytest.raises(ValueError, match=rf"^example 'e0': bad array name {name!r}"):
            writer.add(record, {**arrays, name: np.zeros(2)})
    for value, described in ((np.array(["a"], dtype=object), "object (1,)"), (np.float32(1), "float32 ()")):
        with pytest.raises(ValueError, match=re.escape(f"array 'extra' must be a numeric array with >= 1 axis, got {described}")):
            writer.add(record, {**arrays, "extra": value})
    with pytest.raises(TypeError, match=r"^example 'e0': field 'big' cannot be stored in the table"):
        writer.add({**record, "big": 2**70}, arrays)
    with pytest.raises(TypeError, match=r"^example 'e0' field 'obj': value of type object cannot be stored in the table: <object"):
        writer.add({**record, "obj": object()}, arrays)
    writer.add({"error": None, **record, "n_image_tokens": 4}, arrays)  # explicit None error, matching length: fine
    writer.add_error("e1", "oom", {"id": "e1", "error": "oom", "note": b"\x00raw"})
    record2, arrays2 = make_example(2, 6)
    del arrays2["hidden_answer_mean"]
    with pytest.raises(ValueError, match=re.escape(
            "arrays {attention: <f2 [2, 3, 1], hidden_last_prompt: <f4 [2, 8]} do not match earlier examples' "
            "{attention: <f2 [2, 3, 1], hidden_answer_mean: <f4 [2, 8], hidden_last_prompt: <f4 [2, 8]} "
            "(only the last axis of ['attention'] may vary)")):
        writer.add(record2, arrays2)
    writer.add({**record2, "mapping": {1: (np.int8(2), np.int64(3))}, "pair": (1, 2)}, make_example(2, 6)[1])
    writer.add_error("e3", "oom")
    table = writer.finalize().table(include_errors=True)
    assert table.loc[0, "question"] == "q0" and table.loc[0, "n_image_tokens"] == 4  # fields after "error" kept
    assert table.loc[1, "note"] == b"\x00raw"
    assert table.loc[2, "pair"].tolist() == [1, 2]
    assert list(table.loc[2, "mapping"]) == ["1"] and table.loc[2, "mapping"]["1"].tolist() == [2, 3]


def test_zero_width_arrays_and_rows_with_no_arrays(tmp_path: Path) -> None:
    """Arrays may have a zero-length axis (nothing to memory-map); error-only chunks carry no arrays."""
    ids = [f"e{i}" for i in range(4)]
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ids, chunk_size=2)
    writer.add_error("e0", "oom")
    writer.add_error("e1", "oom")
    writer.add({"id": "e2"}, {"attention": np.zeros((2, 0), np.float16), "hidden": np.zeros((0,), np.float32)})
    writer.add({"id": "e3"}, {"attention": np.zeros((2, 0), np.float16), "hidden": np.zeros((0,), np.float32)})
    store = writer.finalize()
    assert store.attention().shape == (2, 2, 0) and store.array("hidden").shape == (2, 0)
    assert store.attention().dtype == np.float16 and store.array("hidden").dtype == np.float32
    assert store.image_token_counts().tolist() == [0, 0]
    store.verify()


def test_store_of_error_rows_only(tmp_path: Path) -> None:
    """No OK row: no arrays, and the store's columns (lengths included) are there, all null / -1."""
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ["e0", "e1"], chunk_size=1)
    writer.add_error("e0", "oom", {"question": "q0"})
    writer.add_error("e1", "image_too_large")
    store = writer.finalize()
    assert store.array_names == [] and store.n_ok == 0 and store.n_errors == 2
    table = store.table(include_errors=True)
    assert list(table.columns) == ["id", "error", "array_index", "n_image_tokens", "question"]
    assert table["array_index"].tolist() == [-1, -1] and table["n_image_tokens"].isna().all()
    assert table["error"].tolist() == ["oom", "image_too_large"] and table.loc[0, "question"] == "q0"
    assert table["question"].isna().tolist() == [False, True]
    assert str(pq.read_table(tmp_path / "s" / "table.parquet").schema.field("n_image_tokens").type) == "int64"


def test_complete_json_without_sizes_or_file_list(tmp_path: Path) -> None:
    """Stores finalized before sizes were recorded open on existence alone; no file list at all is corrupt."""
    path = tmp_path / "s"
    complete_store(path)
    complete = json.loads((path / COMPLETE_FILE).read_text())
    (path / COMPLETE_FILE).write_text(json.dumps({key: value for key, value in complete.items() if key != "bytes"}))
    damage(path / "hidden_last_prompt.npy", "flip")  # same size: only verify() can tell
    store = FeatureStore.open(path)
    assert store.n_ok == 5
    with pytest.raises(CorruptStoreError, match=re.escape(str(path / "hidden_last_prompt.npy")) + ": sha256"):
        store.verify()
    (path / COMPLETE_FILE).write_text(json.dumps({"summary": complete["summary"]}))
    with pytest.raises(CorruptStoreError, match=re.escape(f"{path / COMPLETE_FILE}: no list of final files (KeyError('sha256'))")):
        FeatureStore.open(path)


def test_unreadable_final_table_of_the_same_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = complete_store(path)
    damage(path / "table.parquet", "flip")  # the footer's magic bytes: same size, not parquet any more
    message = re.escape(f"final table {path / 'table.parquet'} cannot be read: ")
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.open(path)
    with pytest.raises(CorruptStoreError, match=message):
        FeatureStore.create_or_resume(path, MANIFEST, ids)


def test_finalize_temporaries_are_hidden_tmp_files_in_the_store(tmp_path: Path, monkeypatch) -> None:
    """Final arrays are written to ``.<name>.npy.*.tmp`` beside their destination (what a resume after kill -9
    removes), and a finalize that fails removes them and leaves a resumable store."""
    path = tmp_path / "s"
    ids = [f"e{i}" for i in range(3)]
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    for i in range(3):
        writer.add(*make_example(i, 3 + i))
    real_replace = os.replace
    moves: list[tuple[Path, Path]] = []

    def failing_replace(src, dst):
        moves.append((Path(src), Path(dst)))
        if Path(dst).name == "hidden_last_prompt.npy":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        writer.finalize()
    monkeypatch.setattr(os, "replace", real_replace)
    finals = [(src, dst) for src, dst in moves if dst.suffix == ".npy" and dst.parent == path]
    assert [dst.name for _, dst in finals] == ["attention.npy", "hidden_answer_mean.npy", "hidden_last_prompt.npy"]
    for src, dst in finals:
        assert src.parent == path and re.fullmatch(rf"\.{re.escape(dst.name)}\..+\.tmp", src.name), src
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    assert not (path / COMPLETE_FILE).exists()
    writer.close()
    resumed = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    assert resumed.done_ids() == set(ids)
    store = resumed.finalize()
    store.verify()
    np.testing.assert_array_equal(store.hidden()[2], make_example(2, 5)[1]["hidden_last_prompt"])


def test_committed_chunks_with_different_array_specs_are_refused(tmp_path: Path) -> None:
    """A commit edited outside the writer (dtype of one array changed, file sizes intact) is not merged."""
    path = tmp_path / "s"
    ids = partial_store(path)
    commit_path = path / "chunks" / "c000001.commit.json"
    commit = json.loads(commit_path.read_text())
    commit["arrays"]["hidden_last_prompt"]["dtype"] = "<f8"
    commit_path.write_text(json.dumps(commit))
    with pytest.raises(CorruptStoreError, match=re.escape("chunk 1 has arrays {") + r".*'hidden_last_prompt': \('<f8', \(2, 8\)\)"):
        FeatureStore.open(path, allow_partial=True)
    with pytest.raises(CorruptStoreError, match="chunk 1 has arrays"):
        FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)


def test_open_expect_is_compared_after_json_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "s"
    complete_store(path)
    store = FeatureStore.open(path, expect={"settings": {"layers": (np.int64(0), 1)}, "code_version": "v1"})
    assert store.complete
    with pytest.raises(StaleStoreError, match=re.escape(f"stale feature store {path}: manifest does not match")
                       + r".*\n  settings: store has \{\"layers\":\[0,1\]\}, expected \{\"layers\":\[1,0\]\}"):
        FeatureStore.open(path, expect={"settings": {"layers": (1, 0)}})


def test_reading_a_partial_store_changes_nothing_on_disk(tmp_path: Path) -> None:
    """A reader may look at a store while its writer runs: it must not delete the writer's unfinished files."""
    path = tmp_path / "s"
    partial_store(path)
    chunks = path / "chunks"
    (chunks / "c000003.table.parquet").write_bytes(b"being written")  # no commit.json yet
    (chunks / ".c000003.attention.npy.x1.tmp").write_bytes(b"half")
    before = sorted(p.name for p in chunks.iterdir())
    assert FeatureStore.open(path, allow_partial=True).n_ok == 6
    assert sorted(p.name for p in chunks.iterdir()) == before


def test_each_commit_is_made_durable_by_syncing_its_directory(tmp_path: Path, monkeypatch) -> None:
    """manifest.json, every chunk's commit.json and complete.json: renamed into place, then the directory fsync'ed
    (a rename is durable only once its directory is)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("replace", Path(dst).name))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, [f"e{i}" for i in range(3)], chunk_size=2)
    for i in range(3):
        writer.add(*make_example(i, 4))
    writer.finalize()
    for name, directory in (("manifest.json", "s"), ("c000000.commit.json", "chunks"), ("c000001.commit.json", "chunks"),
                            ("complete.json", "s")):
        i = events.index(("replace", name))
        assert events[i + 1] == ("fsync", directory), (name, events[i : i + 2])
    data_files = [name for kind, name in events if kind == "replace" and not name.endswith(".json")]
    for name in data_files:  # every data file was fsync'ed (as its temporary) before its rename
        i = events.index(("replace", name))
        assert any(kind == "fsync" and synced.startswith(f".{name}.") for kind, synced in events[:i]), name


def test_resumed_writer_keeps_the_array_specs_and_the_chunk_numbering(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = partial_store(path)  # chunks c000000 .. c000002
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=2)
    with pytest.raises(ValueError, match=r"hidden_last_prompt: <f4 \[2, 9\]\} do not match earlier examples'"):
        writer.add(*make_example(6, 3, width=9))
    with pytest.raises(TypeError, match="record types clash with earlier rows"):
        writer.add({**make_example(6, 3)[0], "correct": "yes"}, make_example(6, 3)[1])
    writer.add(*make_example(6, 3))
    writer.add(*make_example(7, 4))
    assert (path / "chunks" / "c000003.commit.json").is_file()
    assert sorted(p.name for p in (path / "chunks").glob("*.commit.json")) == [f"c00000{i}.commit.json" for i in range(4)]
    store = writer.finalize()
    np.testing.assert_array_equal(store.attention()[7, ..., :4], make_example(7, 4)[1]["attention"])


def test_record_fields_none_nested_and_promoted_within_a_chunk(tmp_path: Path) -> None:
    """None fields, int and float rows of one field in the same chunk (promoted to float), and an unstorable value
    nested in a list, reported with its example and field."""
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ["e0", "e1", "e2"], chunk_size=3)
    record, arrays = make_example(0, 3)
    with pytest.raises(TypeError, match=r"^example 'e0' field 'tags': value of type object cannot be stored"):
        writer.add({**record, "tags": [1, object()]}, arrays)
    with pytest.raises(TypeError, match=r"^example 'e0' field 'nested': value of type object cannot be stored"):
        writer.add({**record, "nested": {"a": [object()]}}, arrays)
    with pytest.raises(TypeError, match=r"^example 'e0' field 'arr': value of type object cannot be stored"):
        writer.add({**record, "arr": np.array([object()], dtype=object)}, arrays)
    writer.add({**record, "score": 1, "answer": None}, arrays)
    writer.add({**make_example(1, 3)[0], "score": 0.5, "answer": "yes"}, make_example(1, 3)[1])
    writer.add_error("e2", "oom", {"score": None})
    table = writer.finalize().table(include_errors=True)
    assert table["score"].tolist()[:2] == [1.0, 0.5] and str(table["score"].dtype) == "float64"
    assert table["answer"].isna().tolist() == [True, False, True] and table.loc[1, "answer"] == "yes"


def test_resume_promotes_a_field_that_is_int_in_one_chunk_and_float_in_another(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = ["e0", "e1", "e2"]
    writer = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=1)
    writer.add({**make_example(0, 3)[0], "score": 1}, make_example(0, 3)[1])
    writer.add({**make_example(1, 3)[0], "score": 0.5}, make_example(1, 3)[1])
    writer.close()
    resumed = FeatureStore.create_or_resume(path, MANIFEST, ids, chunk_size=1)
    resumed.add({**make_example(2, 3)[0], "score": 2}, make_example(2, 3)[1])
    assert resumed.finalize().table()["score"].tolist() == [1.0, 0.5, 2.0]


def test_arrays_of_a_store_without_ragged_arrays_must_match_exactly(tmp_path: Path) -> None:
    writer = FeatureStore.create_or_resume(tmp_path / "s", MANIFEST, ["e0", "e1"], ragged_arrays={})
    writer.add({"id": "e0"}, {"attention": np.zeros((2, 4), np.float16)})
    with pytest.raises(ValueError, match=re.escape("arrays {attention: <f2 [2, 5]} do not match earlier examples' "
                                                   "{attention: <f2 [2, 4]}") + "$"):
        writer.add({"id": "e1"}, {"attention": np.zeros((2, 5), np.float16)})
    writer.add({"id": "e1"}, {"attention": np.ones((2, 4), np.float16)})
    store = writer.finalize()
    assert "n_image_tokens" not in store.table().columns and store.attention().shape == (2, 2, 4)
