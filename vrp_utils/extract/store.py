"""The feature store: the on-disk record of one extraction pass.

An extraction pass runs a VLM over thousands of examples. It can take hours and can be killed at
any moment, so the store is written in small atomic chunks and resumed where it stopped, and
everything downstream (analyses, notebooks) reads only a *finalized* store whose manifest says
which model, dataset, settings and code produced it. A store that does not match what the caller
expects raises :class:`StaleStoreError`; it is never read silently.

On-disk layout (one directory per model fingerprint x dataset fingerprint x extraction settings x
extraction code version, named by :func:`store_path`)::

    <root>/<model>__<dataset>-<sha256[:16] of the identity>/
        manifest.json          caller's manifest (identity) + "store": format version, library
                               versions, expected-id count and sha256, ragged arrays
        expected_ids.json      the caller's expected ids, in order (the final row order)
        .writer.lock           flock(2) target: one writer at a time (empty file)
        chunks/                only while the store is being written
            c000000.table.parquet     rows of chunk 0 (OK and error rows, in add order)
            c000000.<array>.npy       one per array: OK rows of the chunk stacked on axis 0;
                                      ragged arrays zero-padded to the chunk's longest row
            c000000.commit.json       written LAST: ids, file names, sizes, array shapes/dtypes
        table.parquet          final table, rows in expected-id order (OK and error rows)
        <array>.npy            final arrays, one per array name: [n_ok, *dims], OK rows in table
                               order; ragged arrays zero-padded on their last axis to the store max
        complete.json          written LAST by finalize: summary + sha256 and size of every final file

Every file is written to a temporary ``.<name>.*.tmp`` in the same directory, fsync'ed, then
``os.replace``'d into place. A chunk counts only once its ``commit.json`` exists; on resume, files
of uncommitted chunks and stray temporaries are deleted, so a run killed at any moment (kill -9)
and resumed ends with the same bytes as an uninterrupted run. Resuming or opening checks that every
committed chunk file (partial store) or final file (complete store) exists with its recorded size
and raises :class:`CorruptStoreError` naming the file otherwise, so a damaged store never counts
rows as done; :meth:`FeatureStore.verify` re-hashes final files. Final content does not depend on
chunk boundaries: rows are re-ordered by the expected ids, record columns are sorted by name and
their types are the permissive Arrow promotion of all rows.

Table columns: ``id`` (str), ``error`` (str, null for OK rows), ``array_index`` (int64: row in
every ``<array>.npy``, -1 for error rows), one int64 length column per ragged array (default
``n_image_tokens`` for ``attention``: the true length of the last axis before padding), then the
caller's record fields in name order.

Array names used by the extraction pass: ``attention`` ``[layers, heads, positions,
image_tokens]`` (ragged in image tokens: Qwen2-VL's count varies per example),
``hidden_last_prompt`` and ``hidden_answer_mean`` ``[layers, width]``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vrp_utils.atomic import atomic_write, atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

FORMAT_NAME = "vrp-feature-store"
FORMAT_VERSION = 1

ID_COLUMN = "id"
ERROR_COLUMN = "error"
ARRAY_INDEX_COLUMN = "array_index"
#: Default ragged arrays: array name -> table column holding each example's true last-axis length.
DEFAULT_RAGGED_ARRAYS: Mapping[str, str] = {"attention": "n_image_tokens"}
HIDDEN_KINDS: Mapping[str, str] = {"last_prompt": "hidden_last_prompt", "answer_mean": "hidden_answer_mean"}
DEFAULT_CHUNK_SIZE = 64

MANIFEST_FILE = "manifest.json"
EXPECTED_IDS_FILE = "expected_ids.json"
COMPLETE_FILE = "complete.json"
TABLE_FILE = "table.parquet"
LOCK_FILE = ".writer.lock"
CHUNKS_DIR = "chunks"
#: Packages whose versions are recorded in the manifest (a partial store resumes only under the same).
RECORDED_PACKAGES = ("vrp_utils", "numpy", "pandas", "pyarrow", "torch", "transformers", "tokenizers")

_ARRAY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_CHUNK_FILE = re.compile(r"^c(\d{6})\.(.+)$")
_RESERVED_FILE_STEMS = {"table", "manifest", "expected_ids", "complete"}
_CHUNK_ROW = "_array_row"  # row of an OK example inside its chunk's arrays (-1 for errors)


class StoreError(RuntimeError):
    """Base class of feature-store errors."""


class StaleStoreError(StoreError):
    """The store on disk was made by a different model/dataset/settings/code than expected."""


class IncompleteStoreError(StoreError):
    """The store has not been finalized (or finalize was asked for before every id was written)."""


class DuplicateExampleError(StoreError):
    """An example id was added twice (callers skip ``writer.done_ids()``)."""


class StoreLockedError(StoreError):
    """Another live writer holds the store."""


class CorruptStoreError(StoreError):
    """A committed file is missing or has the wrong size: the store was modified outside the writer."""


# --------------------------------------------------------------------------- JSON and identity


def _json_normalise(value: Any, what: str) -> Any:
    """Round-trip through JSON (tuples -> lists, numpy scalars -> Python) so comparisons are exact."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"{what}: value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")

    return json.loads(json.dumps(value, default=default, sort_keys=True, allow_nan=False))


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def store_identity(model_fp: str, dataset_fp: str, settings: Mapping[str, Any], code_version: str) -> dict[str, Any]:
    """The manifest fields that identify a store; pass (plus any extras) to ``create_or_resume``."""
    for name, value in (("model_fp", model_fp), ("dataset_fp", dataset_fp), ("code_version", code_version)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    return {
        "model_fingerprint": model_fp,
        "dataset_fingerprint": dataset_fp,
        "settings": _json_normalise(dict(settings), "settings"),
        "code_version": code_version,
    }


def _slug(text: str, limit: int = 32) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:limit].strip("-.")
    return slug or "x"


def store_path(
    root: str | os.PathLike[str], model_fp: str, dataset_fp: str, settings: Mapping[str, Any], code_version: str
) -> Path:
    """Deterministic store directory: a readable prefix plus a hash of the whole identity."""
    identity = store_identity(model_fp, dataset_fp, settings, code_version)
    digest = hashlib.sha256(_canonical_json(identity).encode()).hexdigest()[:16]
    return Path(root) / f"{_slug(model_fp)}__{_slug(dataset_fp)}-{digest}"


def library_versions() -> dict[str, str | None]:
    """Versions of the packages that shape extracted numbers (None where not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256(_canonical_json(list(ids)).encode()).hexdigest()


def _mismatched_keys(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return sorted(
        key for key in set(stored) | set(expected) if _canonical_json(stored.get(key)) != _canonical_json(expected.get(key))
    )


def _describe_mismatch(path: Path, stored: Mapping[str, Any], expected: Mapping[str, Any], keys: Iterable[str]) -> str:
    lines = [f"stale feature store {path}: manifest does not match what the caller expects:"]
    for key in keys:
        lines.append(f"  {key}: store has {_canonical_json(stored.get(key))[:200]}, expected {_canonical_json(expected.get(key))[:200]}")
    lines.append("Delete the directory to rebuild it, or use store_path(...) so each identity gets its own directory.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- atomic file writes


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_json(path, payload, indent=2, sort_keys=True, allow_nan=False)


def _atomic_write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array), allow_pickle=False))


def _atomic_write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda handle: pq.write_table(table, handle))


def _remove_temporaries(directory: Path) -> None:
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptStoreError(f"{path}: not valid JSON ({exc})") from exc


# --------------------------------------------------------------------------- record normalisation


def _plain(value: Any, where: str) -> Any:
    """numpy scalars/arrays -> Python values, so Arrow infers the same types whatever the chunking."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item, where) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise TypeError(f"{where}: value of type {type(value).__name__} cannot be stored in the table: {value!r}")


def _row_schema(row: Mapping[str, Any], where: str) -> pa.Schema:
    fields = []
    for key, value in row.items():
        try:
            fields.append(pa.field(key, pa.array([value]).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise TypeError(f"{where}: field {key!r} cannot be stored in the table ({exc}): {value!r}") from exc
    return pa.schema(fields)


def _store_columns(ragged: Mapping[str, str]) -> dict[str, pa.DataType]:
    columns = {ID_COLUMN: pa.string(), ERROR_COLUMN: pa.string(), ARRAY_INDEX_COLUMN: pa.int64()}
    columns.update({column: pa.int64() for column in ragged.values()})
    return columns


# --------------------------------------------------------------------------- chunks and consolidation


class _Chunk:
    """A committed chunk (its commit.json has been read)."""

    def __init__(self, directory: Path, index: int, commit: Mapping[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.ids: list[str] = list(commit["ids"])
        self.n_ok: int = int(commit["n_ok"])
        self.table_file: str = commit["table"]["file"]
        self.arrays: dict[str, dict[str, Any]] = dict(commit["arrays"])

    def check_files(self, commit: Mapping[str, Any]) -> None:
        expected = {commit["table"]["file"]: commit["table"]["bytes"]}
        expected.update({spec["file"]: spec["bytes"] for spec in commit["arrays"].values()})
        for name, size in expected.items():
            path = self.directory / name
            if not path.is_file():
                raise CorruptStoreError(f"committed chunk file {path} is missing")
            if path.stat().st_size != size:
                raise CorruptStoreError(f"committed chunk file {path} is {path.stat().st_size} bytes, its commit recorded {size}")

    def array_path(self, name: str) -> Path:
        return self.directory / self.arrays[name]["file"]


def _chunk_prefix(index: int) -> str:
    return f"c{index:06d}"


def _scan_chunks(chunks_dir: Path, clean: bool) -> list[_Chunk]:
    """Committed chunks in index order; with ``clean``, delete uncommitted files and temporaries."""
    if not chunks_dir.is_dir():
        return []
    committed: dict[int, _Chunk] = {}
    for path in chunks_dir.glob("c*.commit.json"):
        match = _CHUNK_FILE.match(path.name)
        if match is None:
            continue
        commit = _read_json(path)
        chunk = _Chunk(chunks_dir, int(match.group(1)), commit)
        chunk.check_files(commit)
        committed[chunk.index] = chunk
    if clean:
        _remove_temporaries(chunks_dir)
        for path in chunks_dir.iterdir():
            match = _CHUNK_FILE.match(path.name)
            if match is not None and int(match.group(1)) not in committed:
                path.unlink()
    return [committed[index] for index in sorted(committed)]


def _array_specs_from_chunks(chunks: Sequence[_Chunk], ragged: Mapping[str, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, fixed per-example dims: the whole shape, or all but the last axis if ragged)."""
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for chunk in chunks:
        if chunk.n_ok == 0:
            continue
        current = {}
        for name, spec in chunk.arrays.items():
            dims = tuple(spec["shape"][1:])
            current[name] = (spec["dtype"], dims[:-1] if name in ragged else dims)
        if specs and current != specs:
            raise CorruptStoreError(f"chunk {chunk.index} has arrays {current}, earlier chunks {specs}")
        specs = current
    return specs


def _consolidate(
    chunks: Sequence[_Chunk],
    expected_ids: Sequence[str],
    ragged: Mapping[str, str],
    allocate: Any,
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Merge committed chunks into one table (expected-id order) and one array per name.

    ``allocate(name, dtype, shape)`` returns a zero-filled writable array (in memory, or a
    memory-mapped temporary ``.npy`` for finalize).
    """
    store_columns = _store_columns(ragged)
    tables = []
    for chunk in chunks:
        table = pq.read_table(chunk.directory / chunk.table_file)
        tables.append(table.append_column("_chunk", pa.array([chunk.index] * table.num_rows, pa.int64())))
    if tables:
        table = pa.concat_tables(tables, promote_options="permissive")
    else:
        table = pa.table({name: pa.array([], dtype) for name, dtype in store_columns.items() if name != ARRAY_INDEX_COLUMN})
        table = table.append_column(_CHUNK_ROW, pa.array([], pa.int64())).append_column("_chunk", pa.array([], pa.int64()))

    position = {example_id: i for i, example_id in enumerate(expected_ids)}
    ids = table[ID_COLUMN].to_pylist()
    if len(set(ids)) != len(ids):
        duplicated = sorted(example_id for example_id, count in Counter(ids).items() if count > 1)
        raise CorruptStoreError(f"ids written in more than one chunk: {duplicated[:5]}")
    unknown = [example_id for example_id in ids if example_id not in position]
    if unknown:
        raise CorruptStoreError(f"chunks hold ids that are not in expected_ids: {unknown[:5]}")
    order = np.argsort(np.array([position[example_id] for example_id in ids], dtype=np.int64), kind="stable")
    table = table.take(pa.array(order, pa.int64()))

    chunk_rows = np.asarray(table[_CHUNK_ROW].to_numpy(zero_copy_only=False), dtype=np.int64)
    chunk_of_row = np.asarray(table["_chunk"].to_numpy(zero_copy_only=False), dtype=np.int64)
    is_ok = chunk_rows >= 0
    array_index = np.where(is_ok, np.cumsum(is_ok) - 1, -1).astype(np.int64)
    n_ok = int(is_ok.sum())

    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, fixed) in _array_specs_from_chunks(chunks, ragged).items():
        shape: tuple[int, ...] = (n_ok, *fixed)
        if name in ragged:
            lengths = np.asarray(table[ragged[name]].to_numpy(zero_copy_only=False)[is_ok], dtype=np.int64)
            shape = (*shape, int(lengths.max()) if n_ok else 0)
        out = allocate(name, np.dtype(dtype), shape)
        for chunk in chunks:
            if chunk.n_ok == 0:
                continue
            mine = np.flatnonzero((chunk_of_row == chunk.index) & is_ok)
            destination = np.empty(chunk.n_ok, dtype=np.int64)
            destination[chunk_rows[mine]] = array_index[mine]
            source = np.load(chunk.array_path(name), mmap_mode="r", allow_pickle=False)
            if name in ragged:
                out[destination, ..., : source.shape[-1]] = source
            else:
                out[destination] = source
        arrays[name] = out

    table = table.drop_columns([_CHUNK_ROW, "_chunk"]).append_column(ARRAY_INDEX_COLUMN, pa.array(array_index, pa.int64()))
    for name, dtype in store_columns.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, dtype))
        else:
            table = table.set_column(table.column_names.index(name), name, table[name].cast(dtype))
    record_columns = sorted(name for name in table.column_names if name not in store_columns)
    return table.select([*store_columns, *record_columns]).combine_chunks(), arrays


def _summary(table: pa.Table, n_expected: int, complete: bool) -> dict[str, Any]:
    errors = [reason for reason in table[ERROR_COLUMN].to_pylist() if reason is not None]
    return {
        "n_expected": n_expected,
        "n_ok": table.num_rows - len(errors),
        "n_error": len(errors),
        "error_reasons": dict(sorted(Counter(errors).items())),
        "complete": complete,
    }


# --------------------------------------------------------------------------- reader


class FeatureStore:
    """Read side of a store: table + memory-mapped arrays, rows aligned."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        expected_ids: list[str],
        table: pa.Table,
        arrays: dict[str, np.ndarray] | None,
        complete: bool,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.expected_ids = expected_ids
        self.complete = complete
        self._table = table
        self._arrays = arrays  # None: load final .npy files lazily with mmap
        self._ragged: dict[str, str] = dict(manifest["store"]["ragged_arrays"])

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None, allow_partial: bool = False
    ) -> FeatureStore:
        """Open a store; ``expect`` (manifest keys -> values) must match or :class:`StaleStoreError`.

        A store that was not finalized raises :class:`IncompleteStoreError` unless ``allow_partial``:
        then the committed chunks are read, with arrays in memory rather than memory-mapped.
        """
        path = Path(path)
        manifest = _load_manifest(path)
        if expect is not None:
            expected = _json_normalise(dict(expect), "expect")
            keys = [key for key in expected if _canonical_json(manifest.get(key)) != _canonical_json(expected[key])]
            if keys:
                raise StaleStoreError(_describe_mismatch(path, manifest, expected, keys))
        expected_ids = _read_json(path / EXPECTED_IDS_FILE)
        if (path / COMPLETE_FILE).is_file():
            _check_final_files(path)
            return cls(path, manifest, expected_ids, _read_final_table(path), None, True)
        if not allow_partial:
            raise IncompleteStoreError(
                f"feature store {path} is not finalized (no {COMPLETE_FILE}): the extraction pass did not finish; "
                "resume it, or open with allow_partial=True to read the committed chunks"
            )
        ragged = dict(manifest["store"]["ragged_arrays"])
        chunks = _scan_chunks(path / CHUNKS_DIR, clean=False)
        table, arrays = _consolidate(chunks, expected_ids, ragged, lambda name, dtype, shape: np.zeros(shape, dtype))
        return cls(path, manifest, expected_ids, table, arrays, False)

    @staticmethod
    def create_or_resume(
        path: str | os.PathLike[str],
        manifest: Mapping[str, Any],
        expected_ids: Sequence[str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        ragged_arrays: Mapping[str, str] = DEFAULT_RAGGED_ARRAYS,
    ) -> StoreWriter:
        """Start a store at ``path``, or resume the one there if its manifest matches.

        ``manifest`` is the caller's identity (see :func:`store_identity`; extra JSON keys are
        allowed); a different manifest, different ``expected_ids``, or (for a partial store)
        different library versions raise :class:`StaleStoreError`. ``chunk_size`` only sets how
        often rows are committed; it does not change the final content. ``ragged_arrays`` maps
        array name -> table column recording the true length of its last axis.
        """
        return _create_or_resume(path, manifest, expected_ids, chunk_size, ragged_arrays)

    # -- table
    def table(self, include_errors: bool = False) -> pd.DataFrame:
        """The per-example table; by default OK rows only, so row i is row i of every array."""
        table = self._table
        if not include_errors:
            table = table.filter(pc.is_null(table[ERROR_COLUMN]))
        return table.to_pandas()

    @property
    def n_errors(self) -> int:
        """Number of error rows (excluded from ``table()`` by default)."""
        return self._table.num_rows - self._table[ERROR_COLUMN].null_count

    @property
    def n_ok(self) -> int:
        """Number of OK rows (the first axis of every array)."""
        return self._table.num_rows - self.n_errors

    def summary(self) -> dict[str, Any]:
        """Counts of OK and error rows, error reasons, and whether the store is complete."""
        return _summary(self._table, len(self.expected_ids), self.complete)

    # -- arrays
    @property
    def array_names(self) -> list[str]:
        if self._arrays is not None:
            return sorted(self._arrays)
        return sorted(self._read_complete()["arrays"])

    def _read_complete(self) -> dict[str, Any]:
        return _read_json(self.path / COMPLETE_FILE)

    def array(self, name: str, layer: int | None = None) -> np.ndarray:
        """Array ``name`` ``[n_ok, ...]`` (memory-mapped when complete), or one layer of axis 1."""
        if name not in self.array_names:
            raise KeyError(f"feature store {self.path} has no array {name!r}; it has {self.array_names}")
        if self._arrays is not None:
            array = self._arrays[name]
        else:
            array = np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return array if layer is None else array[:, layer]

    def attention(self, layer: int | None = None) -> np.ndarray:
        """``[examples, layers, heads, positions, image_tokens]`` (or one layer); padded tokens are 0."""
        return self.array("attention", layer)

    def hidden(self, layer: int | None = None, kind: str = "last_prompt") -> np.ndarray:
        """Hidden states ``[examples, layers, width]``: ``last_prompt`` position or ``answer_mean``."""
        if kind not in HIDDEN_KINDS:
            raise ValueError(f"kind must be one of {sorted(HIDDEN_KINDS)}, got {kind!r}")
        return self.array(HIDDEN_KINDS[kind], layer)

    def lengths(self, name: str) -> np.ndarray:
        """True last-axis length of ragged array ``name`` per OK row (aligned with ``table()``)."""
        if name not in self._ragged:
            raise KeyError(f"array {name!r} is not ragged; ragged arrays: {sorted(self._ragged)}")
        table = self._table.filter(pc.is_null(self._table[ERROR_COLUMN]))
        return np.asarray(table[self._ragged[name]].to_numpy(zero_copy_only=False), dtype=np.int64)

    def image_token_counts(self) -> np.ndarray:
        """Number of real (unpadded) image tokens of each OK example."""
        return self.lengths("attention")

    def image_token_mask(self) -> np.ndarray:
        """``[examples, max_image_tokens]`` bool: True where the attention column is a real token."""
        counts = self.image_token_counts()
        width = self.attention().shape[-1]
        return np.arange(width)[None, :] < counts[:, None]

    def verify(self) -> None:
        """Re-hash every final file against ``complete.json`` (reads everything: slow on big stores)."""
        if not self.complete:
            raise IncompleteStoreError(f"feature store {self.path} is not finalized")
        for name, digest in self._read_complete()["sha256"].items():
            path = self.path / name
            if not path.is_file():
                raise CorruptStoreError(f"final file {path} of feature store {self.path} is missing")
            actual = _sha256_file(path)
            if actual != digest:
                raise CorruptStoreError(f"{path}: sha256 {actual} != recorded {digest}")

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"FeatureStore({str(self.path)!r}, {state}, n_ok={self.n_ok}, n_error={self.n_errors})"


def _check_final_files(path: Path) -> None:
    """Every final file listed in ``complete.json`` exists with its recorded size (a cheap stat, no hashing).

    Stores finalized before sizes were recorded (no ``bytes`` key) are checked for existence only;
    :meth:`FeatureStore.verify` re-hashes the content.
    """
    complete = _read_json(path / COMPLETE_FILE)
    try:
        names = list(complete["sha256"])
    except (KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{path / COMPLETE_FILE}: no list of final files ({exc!r})") from exc
    sizes = complete.get("bytes", {})
    for name in names:
        file = path / name
        if not file.is_file():
            raise CorruptStoreError(f"final file {file} of complete feature store {path} is missing")
        if name in sizes and file.stat().st_size != sizes[name]:
            raise CorruptStoreError(
                f"final file {file} of complete feature store {path} is {file.stat().st_size} bytes, "
                f"{COMPLETE_FILE} recorded {sizes[name]}"
            )


def _read_final_table(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path / TABLE_FILE, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptStoreError(f"final table {path / TABLE_FILE} cannot be read: {exc}") from exc


def _load_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a feature store: no {MANIFEST_FILE}")
    manifest = _read_json(manifest_path)
    store = manifest.get("store", {})
    if store.get("format") != FORMAT_NAME or store.get("format_version") != FORMAT_VERSION:
        raise StaleStoreError(
            f"{manifest_path}: store format {store.get('format')!r} v{store.get('format_version')!r}, "
            f"this code reads {FORMAT_NAME!r} v{FORMAT_VERSION}; delete the directory to rebuild it"
        )
    return manifest


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Append side of a store: buffer rows, commit them in atomic chunks, finalize once.

    Use through :meth:`FeatureStore.create_or_resume`. Holds an exclusive ``flock`` on the store
    until :meth:`close` / :meth:`finalize` (released by the OS if the process dies).
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        expected_ids: list[str],
        ragged: dict[str, str],
        chunk_size: int,
        lock_handle: Any,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.expected_ids = expected_ids
        self.chunk_size = chunk_size
        self._ragged = ragged
        self._lock_handle = lock_handle
        self._position = {example_id: i for i, example_id in enumerate(expected_ids)}
        self._chunks_dir = path / CHUNKS_DIR
        self._buffer: list[tuple[dict[str, Any], pa.Schema, dict[str, np.ndarray] | None]] = []
        self._done: set[str] = set()
        self._error_reasons: Counter[str] = Counter()
        self._schema = pa.schema([])
        self._array_specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._next_chunk = 0
        self.complete = (path / COMPLETE_FILE).is_file()
        if self.complete:
            _check_final_files(path)  # a damaged final file must not count its rows as done
            table = _read_final_table(path, columns=[ID_COLUMN, ERROR_COLUMN])
            self._done = set(table[ID_COLUMN].to_pylist())
            self._error_reasons.update(reason for reason in table[ERROR_COLUMN].to_pylist() if reason is not None)
            if self._chunks_dir.exists():  # finalize was killed while deleting the chunks
                shutil.rmtree(self._chunks_dir)
            return
        self._chunks_dir.mkdir(exist_ok=True)
        chunks = _scan_chunks(self._chunks_dir, clean=True)
        for chunk in chunks:
            table = pq.read_table(chunk.directory / chunk.table_file)
            self._schema = pa.unify_schemas([self._schema, table.schema], promote_options="permissive")
            self._done.update(chunk.ids)
            self._error_reasons.update(reason for reason in table[ERROR_COLUMN].to_pylist() if reason is not None)
        self._array_specs = _array_specs_from_chunks(chunks, ragged)
        self._next_chunk = chunks[-1].index + 1 if chunks else 0

    # -- bookkeeping
    def done_ids(self) -> set[str]:
        """Ids already added (committed or buffered, OK or error): skip these when resuming."""
        return set(self._done)

    def summary(self) -> dict[str, Any]:
        """Counts over everything added so far (committed and buffered)."""
        n_error = sum(self._error_reasons.values())
        return {
            "n_expected": len(self.expected_ids),
            "n_ok": len(self._done) - n_error,
            "n_error": n_error,
            "error_reasons": dict(sorted(self._error_reasons.items())),
            "complete": self.complete,
        }

    def _check_open(self) -> None:
        if self._lock_handle is None:
            raise StoreError(f"writer for {self.path} is closed")

    def _check_new_id(self, example_id: Any) -> str:
        if not isinstance(example_id, str):
            raise TypeError(f"example id must be a str, got {type(example_id).__name__}: {example_id!r}")
        if example_id not in self._position:
            raise KeyError(f"example id {example_id!r} is not in this store's expected_ids ({self.path})")
        if example_id in self._done:
            raise DuplicateExampleError(
                f"example {example_id!r} is already in {self.path}; skip the ids in writer.done_ids()"
            )
        return example_id

    def _record_row(self, example_id: str, record: Mapping[str, Any], error: str | None) -> dict[str, Any]:
        where = f"example {example_id!r}"
        row: dict[str, Any] = {ID_COLUMN: example_id, ERROR_COLUMN: error}
        for key, value in record.items():
            if not isinstance(key, str) or not key or key.startswith("_"):
                raise ValueError(f"{where}: record field names must be non-empty str not starting with '_', got {key!r}")
            if key == ID_COLUMN:
                if value != example_id:
                    raise ValueError(f"{where}: record[{ID_COLUMN!r}] is {value!r}")
                continue
            if key == ERROR_COLUMN:
                if value is not None and value != error:
                    raise ValueError(
                        f"{where}: record[{ERROR_COLUMN!r}] is {value!r}; error rows go through add_error(id, reason, record)"
                    )
                continue
            if key == ARRAY_INDEX_COLUMN:
                raise ValueError(f"{where}: record field {ARRAY_INDEX_COLUMN!r} is reserved for the store")
            row[key] = _plain(value, f"{where} field {key!r}")
        return row

    def _admit(
        self,
        row: dict[str, Any],
        arrays: dict[str, np.ndarray] | None,
        specs: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    ) -> None:
        """Check the row's types merge with earlier rows (fail at add, naming the field), then buffer.

        ``specs`` (an OK row's array specs, already checked) are recorded before the buffer can fill:
        the flush this row may trigger writes the arrays named there.
        """
        schema = _row_schema(row, f"example {row[ID_COLUMN]!r}")
        try:
            merged = pa.unify_schemas([self._schema, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TypeError(f"example {row[ID_COLUMN]!r}: record types clash with earlier rows ({exc})") from exc
        self._schema = merged
        if specs is not None:
            self._array_specs = specs
        self._buffer.append((row, schema, arrays))
        self._done.add(row[ID_COLUMN])
        if row[ERROR_COLUMN] is not None:
            self._error_reasons[row[ERROR_COLUMN]] += 1
        if len(self._buffer) >= self.chunk_size:
            self.flush()

    # -- adding rows
    def add(self, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Buffer one OK example: ``record[\"id\"]`` plus scalar/list/text fields, and its arrays."""
        self._check_open()
        if not isinstance(record, Mapping) or ID_COLUMN not in record:
            raise ValueError(f"record must be a dict with an {ID_COLUMN!r} field, got {record!r:.200}")
        example_id = self._check_new_id(record[ID_COLUMN])
        where = f"example {example_id!r}"
        row = self._record_row(example_id, record, None)
        checked: dict[str, np.ndarray] = {}
        specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, value in arrays.items():
            if not isinstance(name, str) or not _ARRAY_NAME.match(name) or name in _RESERVED_FILE_STEMS:
                raise ValueError(f"{where}: bad array name {name!r} (letters, digits, '_'; not {sorted(_RESERVED_FILE_STEMS)})")
            array = np.asarray(value)
            if array.dtype.hasobject or array.ndim == 0:
                raise ValueError(f"{where}: array {name!r} must be a numeric array with >= 1 axis, got {array.dtype} {array.shape}")
            fixed = array.shape[:-1] if name in self._ragged else array.shape
            specs[name] = (array.dtype.str, tuple(int(d) for d in fixed))
            checked[name] = array
        for name, column in self._ragged.items():
            if name in checked:
                length = int(checked[name].shape[-1])
                if row.get(column) is not None and row[column] != length:
                    raise ValueError(f"{where}: record[{column!r}] = {row[column]!r} but array {name!r} has {length} on its last axis")
                row[column] = length
        if self._array_specs and specs != self._array_specs:
            raise ValueError(
                f"{where}: arrays {_describe_specs(specs)} do not match earlier examples' {_describe_specs(self._array_specs)}"
                + (f" (only the last axis of {sorted(self._ragged)} may vary)" if self._ragged else "")
            )
        self._admit(row, checked, specs)

    def add_error(self, example_id: str, reason: str, record: Mapping[str, Any] | None = None) -> None:
        """Record an example that failed (no arrays); it is counted in ``summary()`` and kept in the table."""
        self._check_open()
        example_id = self._check_new_id(example_id)
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"example {example_id!r}: error reason must be a non-empty string, got {reason!r}")
        self._admit(self._record_row(example_id, record or {}, reason), None)

    # -- committing
    def flush(self) -> None:
        """Commit the buffered rows as one chunk: data files first, ``commit.json`` last."""
        self._check_open()
        if not self._buffer:
            return
        prefix = _chunk_prefix(self._next_chunk)
        rows, schemas, arrays = zip(*self._buffer, strict=True)
        ok = [i for i, array_dict in enumerate(arrays) if array_dict is not None]
        array_row = {i: j for j, i in enumerate(ok)}
        rows = [dict(row, **{_CHUNK_ROW: array_row.get(i, -1)}) for i, row in enumerate(rows)]
        schema = pa.unify_schemas([*schemas, pa.schema([(_CHUNK_ROW, pa.int64())])], promote_options="permissive")
        table = pa.Table.from_pylist(rows, schema=schema)
        table_path = self._chunks_dir / f"{prefix}.table.parquet"
        _atomic_write_parquet(table_path, table)
        array_entries: dict[str, dict[str, Any]] = {}
        if ok:
            for name in sorted(self._array_specs):
                parts = [arrays[i][name] for i in ok]
                if name in self._ragged:
                    width = max(part.shape[-1] for part in parts)
                    stacked = np.zeros((len(parts), *parts[0].shape[:-1], width), dtype=parts[0].dtype)
                    for j, part in enumerate(parts):
                        stacked[j, ..., : part.shape[-1]] = part
                else:
                    stacked = np.stack(parts)
                array_path = self._chunks_dir / f"{prefix}.{name}.npy"
                _atomic_write_npy(array_path, stacked)
                array_entries[name] = {
                    "file": array_path.name,
                    "bytes": array_path.stat().st_size,
                    "shape": list(stacked.shape),
                    "dtype": stacked.dtype.str,
                }
        commit = {
            "ids": [row[ID_COLUMN] for row in rows],
            "n_ok": len(ok),
            "table": {"file": table_path.name, "bytes": table_path.stat().st_size},
            "arrays": array_entries,
        }
        _atomic_write_json(self._chunks_dir / f"{prefix}.commit.json", commit)
        _fsync_dir(self._chunks_dir)
        self._buffer.clear()
        self._next_chunk += 1

    def finalize(self) -> FeatureStore:
        """Flush, check every expected id is present, write the final files, mark complete, drop chunks."""
        self._check_open()
        if not self.complete:
            self.flush()
            missing = [example_id for example_id in self.expected_ids if example_id not in self._done]
            if missing:
                raise IncompleteStoreError(
                    f"cannot finalize {self.path}: {len(missing)} of {len(self.expected_ids)} expected ids were "
                    f"never added (first: {missing[:5]}); add them, or record failures with add_error()"
                )
            self._write_final()
        self.close()
        return FeatureStore.open(self.path, expect=self.manifest_without_store())

    def _write_final(self) -> None:
        chunks = _scan_chunks(self._chunks_dir, clean=False)
        temporaries: dict[str, str] = {}

        def allocate(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.npy.", suffix=".tmp")
            os.close(fd)
            temporaries[name] = tmp
            if math.prod(shape) == 0:  # cannot mmap zero bytes
                return np.zeros(shape, dtype)
            return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

        try:
            table, arrays = _consolidate(chunks, self.expected_ids, self._ragged, allocate)
            for name, array in arrays.items():
                if isinstance(array, np.memmap):
                    array.flush()
                    del array
                    with open(temporaries[name], "rb+") as handle:
                        os.fsync(handle.fileno())
                else:
                    with open(temporaries[name], "wb") as handle:
                        np.save(handle, array, allow_pickle=False)
                        handle.flush()
                        os.fsync(handle.fileno())
            arrays.clear()
            _atomic_write_parquet(self.path / TABLE_FILE, table)
            for name, tmp in sorted(temporaries.items()):
                os.replace(tmp, self.path / f"{name}.npy")
        except BaseException:
            for tmp in temporaries.values():
                Path(tmp).unlink(missing_ok=True)
            raise
        files = [TABLE_FILE, *(f"{name}.npy" for name in sorted(temporaries))]
        complete = {
            "summary": _summary(table, len(self.expected_ids), True),
            "arrays": sorted(temporaries),
            "sha256": {name: _sha256_file(self.path / name) for name in files},
            "bytes": {name: (self.path / name).stat().st_size for name in files},
        }
        _atomic_write_json(self.path / COMPLETE_FILE, complete)
        _fsync_dir(self.path)
        self.complete = True
        shutil.rmtree(self._chunks_dir)

    def manifest_without_store(self) -> dict[str, Any]:
        return {key: value for key, value in self.manifest.items() if key != "store"}

    def close(self) -> None:
        """Commit buffered rows and release the lock (no-op if already closed)."""
        if self._lock_handle is None:
            return
        try:
            if not self.complete:
                self.flush()
        finally:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _describe_specs(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> str:
    return "{" + ", ".join(f"{name}: {dtype} {list(dims)}" for name, (dtype, dims) in sorted(specs.items())) + "}"


def _create_or_resume(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    expected_ids: Sequence[str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ragged_arrays: Mapping[str, str] = DEFAULT_RAGGED_ARRAYS,
) -> StoreWriter:
    path = Path(path)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    caller_manifest = _json_normalise(dict(manifest), "manifest")
    if "store" in caller_manifest:
        raise ValueError("manifest key 'store' is reserved for the store's own fields")
    expected_ids = list(expected_ids)
    bad = [example_id for example_id in expected_ids if not isinstance(example_id, str) or not example_id]
    if bad:
        raise TypeError(f"expected_ids must be non-empty strings; got {bad[:5]}")
    if len(set(expected_ids)) != len(expected_ids):
        duplicated = sorted(example_id for example_id, count in Counter(expected_ids).items() if count > 1)
        raise ValueError(f"expected_ids has duplicates: {duplicated[:5]} ({len(duplicated)} in all)")
    ragged = {str(name): str(column) for name, column in ragged_arrays.items()}
    store_fields = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_versions": library_versions(),
        "expected_ids": {"count": len(expected_ids), "sha256": _ids_digest(expected_ids)},
        "ragged_arrays": ragged,
    }

    path.mkdir(parents=True, exist_ok=True)
    lock_handle = open(path / LOCK_FILE, "a+b")  # noqa: SIM115 - held for the writer's lifetime
    try:
        fcntl.flock(lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock_handle.close()
        raise StoreLockedError(f"another process is writing feature store {path}") from exc
    try:
        _remove_temporaries(path)
        if (path / MANIFEST_FILE).is_file():
            stored = _load_manifest(path)
            stored_caller = {key: value for key, value in stored.items() if key != "store"}
            keys = _mismatched_keys(stored_caller, caller_manifest)
            if keys:
                raise StaleStoreError(_describe_mismatch(path, stored_caller, caller_manifest, keys))
            stored_store = stored["store"]
            if stored_store["expected_ids"] != store_fields["expected_ids"]:
                raise StaleStoreError(
                    f"stale feature store {path}: it was made for {stored_store['expected_ids']['count']} other "
                    f"expected ids (sha256 {stored_store['expected_ids']['sha256'][:12]}), the caller expects "
                    f"{len(expected_ids)} (sha256 {store_fields['expected_ids']['sha256'][:12]}); delete it to rebuild"
                )
            if stored_store["ragged_arrays"] != ragged:
                raise StaleStoreError(f"stale feature store {path}: ragged arrays {stored_store['ragged_arrays']} != {ragged}")
            complete = (path / COMPLETE_FILE).is_file()
            if not complete and stored_store["library_versions"] != store_fields["library_versions"]:
                old, new = stored_store["library_versions"], store_fields["library_versions"]
                changes = ", ".join(f"{key}: {old.get(key)} -> {new.get(key)}" for key in _mismatched_keys(old, new))
                raise StaleStoreError(
                    f"cannot resume partial feature store {path} under different library versions ({changes}); "
                    "delete it to rebuild"
                )
            manifest_out = stored
        else:
            unexpected = sorted(entry.name for entry in path.iterdir() if entry.name not in {LOCK_FILE, EXPECTED_IDS_FILE})
            if unexpected:
                raise StoreError(f"{path} has no {MANIFEST_FILE} but is not empty ({unexpected[:5]}); refusing to write into it")
            manifest_out = {**caller_manifest, "store": store_fields}
            _atomic_write_json(path / EXPECTED_IDS_FILE, expected_ids)
            _atomic_write_json(path / MANIFEST_FILE, manifest_out)  # last: its presence means initialised
            _fsync_dir(path)
        return StoreWriter(path, manifest_out, expected_ids, ragged, chunk_size, lock_handle)
    except BaseException:
        fcntl.flock(lock_handle, fcntl.LOCK_UN)
        lock_handle.close()
        raise

