"""The book build: strict toc check, status page, and the built book offline in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from vrp_utils import book
from vrp_utils.paths import REPO_ROOT

HTML = REPO_ROOT / "_build" / "html"
# Chromium's own background services (updates, accounts) ping these even with background
# networking disabled; they are the browser's requests, not the page's.
BROWSER_SERVICE_HOSTS = ("google.com", "googleapis.com", "gvt1.com")


def test_missing_toc_page_is_named(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: book/generated/01_attention\n  - file: book/typo\n"
    )
    with pytest.raises(book.BookBuildError) as error:
        book.check_toc(tmp_path)
    message = str(error.value)
    assert "book/generated/01_attention" in message and "python -m vrp_utils.run 01_attention" in message
    assert "book/typo" in message


def test_every_toc_page_of_this_book_has_a_source_or_is_generated():
    for name in book.toc_files():
        if not name.startswith("book/generated/"):
            assert (REPO_ROOT / f"{name}.md").is_file(), name
        else:
            stem = Path(name).name
            assert stem == "status" or (REPO_ROOT / "notebooks" / f"{stem}.md").is_file(), name


def test_status_page_lists_runs(tmp_path):
    record = {
        "notebook": "01_attention", "source": "notebooks/01_attention.md", "parameters": {"model": "zoo-llava", "n": 5},
        "overridden": ["n"], "results": {}, "finished_utc": "2026-01-01T00:00:00Z", "duration_s": 12.5,
        "host": {"machine": "x86_64", "python": "3.11.7", "cpus": 2}, "versions": {"torch": "2.13.0"},
    }
    (tmp_path / "01_attention.json").write_text(json.dumps(record))
    (tmp_path / "baselines.json").write_text(json.dumps({"table": []}))  # not a run record: ignored
    page = book.write_status(tmp_path, tmp_path / "status.md", benchmarks_dir=tmp_path / "none").read_text()
    assert "| 01_attention | 2026-01-01T00:00:00Z | 12.5 | `n=5` |" in page
    assert "model = 'zoo-llava'" in page
    assert "not declared by this notebook" in page and "`make verify` has not run" in page


def test_status_page_shows_inputs_commit_versions_benchmarks_and_verify(tmp_path):
    from vrp_utils import verify

    results, benchmarks = tmp_path / "results", tmp_path / "benchmarks"
    results.mkdir()
    benchmarks.mkdir()
    record = {
        "notebook": "00_benchmark_and_zoo", "source": "notebooks/00_benchmark_and_zoo.md", "parameters": {"seed": 0},
        "overridden": [], "results": {}, "finished_utc": "2026-01-01T00:00:00Z", "duration_s": 3.0,
        "host": {"machine": "x86_64", "python": "3.11.7", "cpus": 2}, "versions": {"torch": "2.13.0", "numpy": "2.4.6"},
        "git": {"commit": "0123456789abcdef", "dirty": True},
        "inputs": {"data": {"benchmark": "aaaa1111"}, "models": {"zoo-llava": "bbbb2222"}},
    }
    (results / "00_benchmark_and_zoo.json").write_text(json.dumps(record))
    (benchmarks / "bench_x.json").write_text(json.dumps({"claim": "fast", "ratios": {"capture_over_plain": 0.9776}}))
    (benchmarks / "other.json").write_text(json.dumps({"rows": []}))  # no ratios: not listed
    summary = results / "verify" / "summary.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({
        "passed": False, "checked_utc": "2026-01-02T00:00:00Z", "git_commit": "fedcba9876", "compared": 10, "ignored": 2,
        "failed": 1, "failures": [{"quantity": "00_benchmark_and_zoo/results/x", "reference": "0.5", "new": "0.7",
                                   "tolerance": "abs 0.01", "problem": "outside tolerance"}],
        "files": verify.results_digest(results), "cpu": "cpu A", "reference_cpu": "cpu B",
    }))
    page = book.write_status(results, tmp_path / "status.md", benchmarks_dir=benchmarks).read_text()
    assert "`0123456789` (uncommitted changes)" in page
    assert "| data | benchmark | `aaaa1111` |" in page and "| models | zoo-llava | `bbbb2222` |" in page
    assert "numpy 2.4.6, torch 2.13.0" in page
    assert "| `bench_x.json` | capture_over_plain | 0.978x |" in page and "other.json" not in page
    assert "**failed** (1 quantities)" in page and "| `00_benchmark_and_zoo/results/x` | 0.5 | 0.7 | abs 0.01 |" in page
    assert "Results changed since" not in page
    (results / "00_benchmark_and_zoo.json").write_text(json.dumps(record | {"duration_s": 4.0}))
    page = book.write_status(results, tmp_path / "status.md", benchmarks_dir=benchmarks).read_text()
    assert "Results changed since that check (00_benchmark_and_zoo)" in page


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    return found


def _browse(page: Path, tmp_path: Path, *extra: str) -> tuple[str, set[str]]:
    """Open ``page`` headless with every outside host unresolvable; return its DOM and requested URLs."""
    netlog = tmp_path / "net.json"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
        "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=8000",
        f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={netlog}", *extra, page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    events = json.loads(netlog.read_text())["events"]
    urls = {e["params"]["url"] for e in events if "url" in e.get("params", {})}
    return done.stdout, urls


@pytest.mark.built
@pytest.mark.parametrize("page", ["index.html", "book/intro.html", "book/rerun.html", "book/generated/status.html", "book/generated/00_benchmark_and_zoo.html"])
def test_built_book_renders_offline_with_maths(page, tmp_path):
    path = HTML / page
    assert path.is_file(), f"{path} missing: run `make book`"
    dom, urls = _browse(path, tmp_path, "--dump-dom")
    outside = {
        u for u in urls
        if not u.startswith(("file:", "data:", "blob:", "about:"))
        and not (urlparse(u).hostname or "").endswith(BROWSER_SERVICE_HOSTS)
    }
    assert not outside, f"{page} requested outside resources: {sorted(outside)}"
    if page == "book/intro.html":
        assert "mjx-container" in dom, "MathJax did not typeset the introduction's maths"
        assert "<mjx-merror" not in dom, "MathJax reported a maths error"
