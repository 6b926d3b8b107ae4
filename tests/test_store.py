"""Feature store: round trip, chunking, crash/resume (kill -9 in a subprocess), errors, staleness."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from vrp_utils.extract.store import (
    COMPLETE_FILE,
    CorruptStoreError,
    DuplicateExampleError,
    FeatureStore,
    IncompleteStoreError,
    StaleStoreError,
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
    with pytest.raises(StaleStoreError, match="library versions"):
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
