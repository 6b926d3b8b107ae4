"""The book build: strict toc check, status page, and the built book offline in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import pytest

from vrp_utils import book
from vrp_utils.paths import REPO_ROOT

HTML = REPO_ROOT / "_build" / "html"
SCREENSHOTS = REPO_ROOT / "_build" / "screenshots"
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
            assert stem in book.WRITTEN_PAGES or (REPO_ROOT / "notebooks" / f"{stem}.md").is_file(), name


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
    assert "not declared by this notebook" in page and "**Not run** on this build (chapters finished 2026-01-01T00:00:00Z)" in page
    assert "0 of 1 declare the inputs they read; `make verify`: **not run**" in page


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
    assert "1 of 1 declare the inputs they read; `make verify`: **failed**, last check 2026-01-02T00:00:00Z" in page
    assert "on exactly the results this book shows" in page
    (results / "00_benchmark_and_zoo.json").write_text(json.dumps(record | {"duration_s": 4.0}))
    page = book.write_status(results, tmp_path / "status.md", benchmarks_dir=benchmarks).read_text()
    assert "Results changed since that check (00_benchmark_and_zoo)" in page
    assert "`make verify`: **not run on these results**, last check 2026-01-02T00:00:00Z" in page


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


def _toc_pages() -> list[str]:
    """Every page of ``_toc.yml`` as its built HTML path, plus the site's entry ``index.html``."""
    return ["index.html", *(f"{name}.html" for name in book.toc_files())]


def _analysis_chapter() -> str:
    """The chapter to screenshot: the first executed analysis chapter in the toc (00 only if it is alone)."""
    chapters = [n for n in book.toc_files() if n.startswith("book/generated/") and Path(n).name not in book.WRITTEN_PAGES]
    later = [n for n in chapters if not Path(n).name.startswith("00_")]
    return f"{(later or chapters)[0]}.html"


class _Page(HTMLParser):
    """Links, images, scripts, stylesheets and element ids of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []  # (tag, url)
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.refs.append((tag, attrs["href"]))
        elif tag in ("img", "script") and attrs.get("src"):
            self.refs.append((tag, attrs["src"]))
            if tag == "img":
                self.images.append(attrs)
        elif tag == "link" and attrs.get("href"):
            self.refs.append((tag, attrs["href"]))


def _parse(html: str) -> _Page:
    parser = _Page()
    parser.feed(html)
    return parser


def _unresolved(page: Path, parsed: _Page) -> list[str]:
    """Internal links and resources of ``page`` that name no built file (or no element, for a fragment)."""
    bad = []
    for tag, ref in parsed.refs:
        url = urlparse(ref)
        if url.scheme in ("http", "https", "mailto", "data", "javascript", "blob") or url.netloc:
            continue  # outside links are links, not requests; requests are checked through the net log
        target = Path(unquote(url.path)) if url.scheme == "file" else (page.parent / unquote(url.path)).resolve()
        if not url.path:
            target = page
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(f"<{tag}> {ref}: no file {target}")
            continue
        if not target.resolve().is_relative_to(HTML.resolve()):
            bad.append(f"<{tag}> {ref}: outside the built book ({target})")
        elif url.fragment and target.suffix == ".html":
            ids = parsed.ids if target == page else _parse(target.read_text()).ids
            if unquote(url.fragment) not in ids:
                bad.append(f"<{tag}> {ref}: no element with id {url.fragment!r} in {target.name}")
    return bad


@pytest.mark.built
@pytest.mark.parametrize("page", _toc_pages())
def test_built_book_renders_offline_with_maths_and_fits_1400_px(page, tmp_path):
    """Each page of the toc, opened from the built files with every outside host unresolvable: no request
    leaves the book, every request and every internal link and image resolves, maths is typeset by the
    vendored MathJax, and an executed chapter shows its figures. In the same browser launch (each costs about
    1.2 s), at 1400 px: each table fits the article's width or sits in a horizontally scrolling container that
    itself fits (the theme wraps Markdown tables in ``div.pst-scrollable-table-container``), and no code block runs
    past its box (the parameter cells carry long comments; the book's stylesheet wraps them). The constructed
    pages of the two tests after the next show that both layout checks can fail."""
    path = HTML / page
    assert path.is_file(), f"{path} missing: run `make book`"
    dom, urls, fit = _browse_and_measure(path, tmp_path)
    outside = {
        u for u in urls
        if not u.startswith(("file:", "data:", "blob:", "about:"))
        and not (urlparse(u).hostname or "").endswith(BROWSER_SERVICE_HOSTS)
    }
    assert not outside, f"{page} requested outside resources: {sorted(outside)}"
    assert dom.strip(), f"{page}: the browser returned an empty document"

    static = path.read_text()
    redirect = re.search(r'http-equiv="refresh"[^>]*url=([^"\s>]+)', static, re.IGNORECASE)
    if redirect:  # the site's index.html forwards to the root page: the DOM is that page's
        path = (path.parent / unquote(redirect.group(1))).resolve()
        assert path.is_file() and path.is_relative_to(HTML.resolve()), f"{page} forwards to a missing page {path}"
        static = path.read_text()
    parsed = _parse(dom)
    unresolved = _unresolved(path, parsed)
    assert not unresolved, f"{page}: " + "; ".join(unresolved)

    prose = re.sub(r"<pre\b.*?</pre>", "", dom, flags=re.DOTALL)
    # (smart quotes turn the rule row's "---" into an em dash)
    assert not re.search(r"\|\s*[-—–:]+\s*\|", prose), f"{page} shows a Markdown table as text, unrendered"
    if 'class="math' in static:
        assert "mjx-container" in dom, f"MathJax did not typeset the maths of {page}"
        assert "<mjx-merror" not in dom, f"MathJax reported a maths error on {page}"
        # (Chromium's net log does not list file: loads: the script element names what was loaded.)
        vendored = HTML.resolve() / "mathjax" / "tex-chtml.js"
        scripts = {(path.parent / unquote(urlparse(ref).path)).resolve() for tag, ref in parsed.refs
                   if tag == "script" and "mathjax" in ref.lower()}
        assert scripts == {vendored}, f"{page} loads MathJax from {sorted(map(str, scripts))}, not {vendored}"
    if page == "book/intro.html":
        assert "mjx-container" in dom, "the introduction's maths is not typeset"

    if page.startswith("book/generated/") and Path(page).stem not in book.WRITTEN_PAGES:
        figures = [img for img in parsed.images if "/_images/" in f"/{img['src']}" or img["src"].startswith("data:image")]
        assert figures, f"{page}: an executed chapter without a figure"
        for img in figures:
            if not img["src"].startswith("data:"):
                file = (path.parent / unquote(img["src"])).resolve()
                assert file.stat().st_size > 1000, f"{page}: figure {img['src']} is nearly empty"
        _check_opening_answer(Path(page).stem, static)
    for img in parsed.images:  # every image of every page: a description, not its file name (docutils' default)
        alt = img.get("alt", "").strip()
        name = Path(unquote(urlparse(img["src"]).path)).name
        assert alt and name not in alt and not re.fullmatch(r"\S+\.(png|jpe?g|svg|gif)", alt), \
            f"{page}: image {img['src'][:80]} has no alt text describing it (alt={alt!r})"
    if page != "index.html":  # (it only forwards: its measurement is the forwarded page's, checked as that page)
        assert fit is not None, f"{page}: the measuring script did not run"
        cut = _cut_off(fit["tables"])
        assert not cut, f"{page} at 1400 px: " + "; ".join(cut)
        assert fit["code"] == [], f"{page} at 1400 px: code runs past its box instead of wrapping: {fit['code']}"


def _check_opening_answer(name: str, html: str) -> None:
    """The chapter's first paragraph under its title is its answer, with the numbers ``vrp_utils.answers`` writes
    from the chapter's ``results/<name>.json`` (the file `make verify` checks), in the same order."""
    from html import unescape

    from vrp_utils.answers import answer
    from vrp_utils.paths import RESULTS_DIR

    after_title = html.split("</h1>", 1)[1]
    first = re.search(r"<p>(.*?)</p>", after_title, re.DOTALL)
    assert first, f"{name}: no paragraph under the title"
    shown = unescape(re.sub(r"<[^>]+>", "", first.group(1)))
    assert shown.startswith("The answer in this build."), f"{name}: the chapter does not open with its answer: {shown[:120]!r}"
    expected, *more = answer(name, json.loads((RESULTS_DIR / f"{name}.json").read_text())["results"]).split("\n\n")
    numbers = lambda text: re.findall(r"[-+−]?\d[\d,]*(?:\.\d+)?%?", text)  # noqa: E731
    assert numbers(shown) == numbers(expected), f"{name}: the opening paragraph's numbers are not its results file's"
    if more:  # "What stands out" follows the answer, as the second paragraph under the title
        second = re.findall(r"<p>(.*?)</p>", after_title, re.DOTALL)[1]
        assert numbers(unescape(re.sub(r"<[^>]+>", "", second))) == numbers(more[0]), f"{name}: 'what stands out' differs"


@pytest.mark.built
def test_screenshots_of_the_introduction_and_an_analysis_chapter(tmp_path):
    """Screenshots for a reader of the CI log: _build/screenshots/{intro,<chapter>}.png."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # The chapter's screenshot is tall enough to reach past its setup cells to its first figures.
    for page, size in (("book/intro.html", (1280, 1600)), (_analysis_chapter(), (1280, 4000))):
        out = SCREENSHOTS / f"{Path(page).stem}.png"
        out.unlink(missing_ok=True)
        (tmp_path / Path(page).stem).mkdir()
        _browse(HTML / page, tmp_path / Path(page).stem, f"--screenshot={out}", f"--window-size={size[0]},{size[1]}",
                "--hide-scrollbars")
        assert out.is_file(), f"no screenshot of {page}"
        with Image.open(out) as image:
            assert image.size == size
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 50, f"the screenshot of {page} is (nearly) blank"
        print(f"screenshot of {page}: {out}")


# -- Re-run commands: what the chapters, the re-run page and the README tell a reader to type --------

RUN_COMMAND = re.compile(r"python -m vrp_utils\.run\s+(.*)")


def _run_commands(text: str) -> list[list[str]]:
    """The arguments of every ``python -m vrp_utils.run ...`` command in ``text``: the lines of its fenced code
    blocks (comments dropped, continued lines joined) and its inline code spans."""
    import shlex

    fences = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    lines = [line for block in fences for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    lines += re.findall(r"`([^`\n]+)`", prose)
    return [shlex.split(m.group(1), comments=True) for line in lines if (m := RUN_COMMAND.search(line))]


def _run_command_problems(args: list[str]) -> list[str]:
    """Why the runner would refuse ``args`` (no notebook, an unknown flag, a parameter the notebook lacks or a value
    its default's type refuses); empty when it would accept them."""
    from vrp_utils import run

    try:
        parsed = run._parse_args(args)
    except SystemExit:
        return [f"the runner's options refuse {args}"]
    try:
        source = run.resolve_notebook(parsed.notebook)
    except FileNotFoundError as error:
        return [str(error)]
    given = {}
    for name, value in parsed.parameter:
        if name in given:
            return [f"{args}: parameter {name!r} given twice"]
        given[name] = value
    try:
        run.check_parameters(run.read_notebook(source), given, source.stem)
    except run.NotebookParameterError as error:
        return [f"{args}: {error}"]
    return []


def _rerun_section(text: str) -> str | None:
    match = re.search(r"^## Re-run it\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def test_the_rerun_check_catches_a_parameter_the_notebook_lacks():
    """The check below on a command it must refuse (so that it can fail)."""
    (bad,) = _run_commands("```bash\npython -m vrp_utils.run 01_attention -p no_such_thing 3   # a comment\n```\n")
    assert bad == ["01_attention", "-p", "no_such_thing", "3"]
    assert "no parameter named 'no_such_thing'" in " ".join(_run_command_problems(bad))
    assert "expects an int" in " ".join(_run_command_problems(["01_attention", "-p", "n_boot", "many"]))
    assert "not found" in " ".join(_run_command_problems(["99_nothing", "-p", "seed", "1"]))
    assert _run_command_problems(["01_attention", "-p", "n_boot", "2000", "--into-book"]) == []


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("*.md")))
def test_each_chapter_ends_with_rerun_commands_the_runner_accepts(name):
    """Each chapter closes with "Re-run it": commands with new parameters, every parameter one that the
    notebook's parameters cell has, with a value of its type, and the command naming this chapter."""
    text = (REPO_ROOT / "notebooks" / f"{name}.md").read_text()
    section = _rerun_section(text)
    assert section is not None, f"{name}: no '## Re-run it' section"
    assert text.rstrip().endswith(section.rstrip()), f"{name}: 'Re-run it' is not the chapter's last section"
    commands = _run_commands(section)
    assert any("-p" in c for c in commands), f"{name}: 'Re-run it' shows no command with a parameter"
    for args in commands:
        assert args[0] == name, f"{name}: its 'Re-run it' runs {args[0]}"
        assert not _run_command_problems(args), _run_command_problems(args)


@pytest.mark.parametrize("page", ["book/rerun.md", "README.md", "data/README.md"])
def test_rerun_commands_of_the_book_and_readme_are_accepted(page):
    commands = _run_commands((REPO_ROOT / page).read_text())
    assert commands, f"{page} shows no runner command"
    problems = [p for args in commands for p in _run_command_problems(args)]
    assert not problems, problems


# -- Alt text on every figure -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("*.md")))
def test_every_figure_cell_declares_its_alt_text(name):
    """A code cell that shows a figure carries myst-nb's image option ``alt`` (cell metadata ``mystnb.image.alt``),
    a description of what the figure shows: a sentence, not a file name."""
    from vrp_utils import run

    notebook = run.read_notebook(REPO_ROOT / "notebooks" / f"{name}.md")
    figures = [c for c in notebook.cells if c.cell_type == "code" and "plt.show()" in c.source]
    for cell in figures:
        alt = ((cell.metadata.get("mystnb") or {}).get("image") or {}).get("alt", "")
        assert len(alt.split()) >= 12, f"{name}: a figure cell without a real alt text: {cell.source[:80]!r}"


def test_status_page_says_which_zoo_made_each_chapters_numbers(tmp_path):
    """A model whose weights are the release's is named as released; any other (a retrain) is flagged."""
    from vrp_utils.models.loading import fingerprint_files
    from vrp_utils.paths import ZOO_DIR

    released = fingerprint_files(ZOO_DIR / "zoo-llava")
    record = {"notebook": "01_attention", "source": "notebooks/01_attention.md", "parameters": {}, "overridden": [],
              "results": {}, "finished_utc": "2026-01-01T00:00:00Z", "duration_s": 3.0,
              "inputs": {"models": {"zoo-llava": released, "data/zoo-retrain/zoo-llava": "0123abcd0123abcd"}}}
    (tmp_path / "01_attention.json").write_text(json.dumps(record))
    page = book.write_status(tmp_path, tmp_path / "status.md", benchmarks_dir=tmp_path / "none").read_text()
    assert f"| 01_attention | zoo-llava | `{released}` | released zoo (zoo-llava) |" in page
    assert "| 01_attention | data/zoo-retrain/zoo-llava | `0123abcd0123abcd` | **not the released zoo**" in page
    assert "The released zoo (`zoo/`, published 20" in page


class _Outputs(HTMLParser):
    """The text of every rendered cell output (``div.cell_output``) of a chapter page, and whether its inputs are hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[str] = []
        self.inputs_shown = 0
        self._depth = 0  # open <div>s inside the current output; 0: outside any

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and self._depth:
            self._depth += 1
        elif tag == "div" and "cell_output" in classes:
            self._depth = 1
            self.outputs.append("")
        if tag == "div" and "cell_input" in classes:
            self.inputs_shown += 1

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.outputs[-1] += data


#: What no rendered output may contain (issue 23): progress bars, loading messages, the runner's bookkeeping, warnings,
#: tracebacks and Python reprs of a table.
OUTPUT_NOISE = ("Loading weights", "Writing model shards", "it/s]", "results published", "inputs declared", "Warning",
                "Traceback", "dtype: float64", "[5 rows x")


def _output_noise(html: str) -> list[str]:
    parsed = _Outputs()
    parsed.feed(html)
    return [f"{noise!r} in: {text.strip()[:160]!r}" for text in parsed.outputs for noise in OUTPUT_NOISE if noise in text]


def test_the_noise_check_reads_rendered_outputs_only():
    page = ('<div class="cell_input"><pre>warnings.filterwarnings("ignore")  # Warning</pre></div>'
            '<div class="cell_output docutils container"><div class="output stderr"><pre>UserWarning: x\n'
            'Loading weights: 100%|#| 4/4 [00:00, 9.1it/s]</pre></div></div><p>Warning in prose is the author text.</p>')
    found = _output_noise(page)
    assert len(found) == 3 and all("Warning in prose" not in f for f in found), found
    assert _output_noise('<div class="cell_output"><p>0.82 [0.80, 0.84]</p></div>') == []


@pytest.mark.built
def test_chapter_pages_show_no_build_noise():
    """Progress bars, loading messages, the runner's bookkeeping, warnings and tracebacks stay out of every rendered
    output, and no chapter shows a code cell's source unfolded (setup cells are hidden, 00 included)."""
    pages = sorted((HTML / "book" / "generated").glob("0*.html"))
    assert len(pages) == 6
    for page in pages:
        text = page.read_text()
        assert not _output_noise(text), (page.name, _output_noise(text))
        assert "Traceback (most recent call last)" not in text, page.name
        unfolded = re.findall(r'<div class="cell docutils container"(?![^>]*tag_hide-input)(?![^>]*tag_parameters)[^>]*>', text)
        assert not unfolded, f"{page.name}: {len(unfolded)} code cells show their source unfolded"


#: Injected before ``</body>``: once laid out, every table of the article against the article's content width (and
#: whether an ancestor inside the article scrolls horizontally), and the longest line of every code block that runs
#: past its box instead of wrapping, left as JSON in ``<pre id="vrp-fit">``.
_MEASURE_FIT = """<script>window.addEventListener('load', () => {
  const article = document.querySelector('article') || document.querySelector('main') || document.body;
  const width = article.getBoundingClientRect().width;
  const tables = [...article.querySelectorAll('table')].map((table, i) => {
    let scroller = null;
    for (let el = table.parentElement; el && el !== article; el = el.parentElement) {
      const o = getComputedStyle(el).overflowX;
      if (o === 'auto' || o === 'scroll') { scroller = el; break; }
    }
    return {index: i, table: table.getBoundingClientRect().width, content: width,
            scroller: scroller ? scroller.className : null,
            scroller_width: scroller ? scroller.getBoundingClientRect().width : null,
            head: (table.querySelector('tr') || table).innerText.slice(0, 80)};
  });
  const code = [...article.querySelectorAll('pre')].filter((pre) => pre.scrollWidth > pre.clientWidth + 1)
    .map((pre) => pre.innerText.split('\\n').sort((a, b) => b.length - a.length)[0].slice(0, 80));
  const out = document.createElement('pre'); out.id = 'vrp-fit'; out.style.whiteSpace = 'pre';
  out.textContent = JSON.stringify({tables, code}); document.body.appendChild(out);
});</script>"""


def _browse_and_measure(page: Path, tmp_path: Path, html: str | None = None) -> tuple[str, set[str], dict | None]:
    """Open ``page`` (or ``html`` served from the page's place, so its links resolve) at 1400 px with
    :data:`_MEASURE_FIT`: its DOM without the measurement, the requested URLs, and the measurement (None where the
    page forwards elsewhere before it is laid out)."""
    probe = page.with_name(f".vrp-fit-{page.name}")
    try:
        probe.write_text((html if html is not None else page.read_text()).replace("</body>", _MEASURE_FIT + "</body>", 1))
        dom, urls = _browse(probe, tmp_path, "--dump-dom", "--window-size=1400,2000")
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="vrp-fit"[^>]*>(.*?)</pre>', dom, re.DOTALL)
    if not found:
        return dom, urls, None
    from html import unescape

    return dom[:found.start()] + dom[found.end():], urls, json.loads(unescape(found.group(1)))


def _measure_tables(page: Path, tmp_path: Path) -> list[dict]:
    fit = _browse_and_measure(page, tmp_path)[2]
    assert fit is not None, f"{page.name}: the measuring script did not run"
    return fit["tables"]


def _cut_off(rows: list[dict]) -> list[str]:
    """The measured tables that neither fit the content width nor sit in a scrolling container that fits."""
    bad = []
    for row in rows:
        fits = row["table"] <= row["content"] + 1
        scrolls = row["scroller"] is not None and row["scroller_width"] <= row["content"] + 1
        if not (fits or scrolls):
            bad.append(f"table {row['index']} ({row['head']!r}) is {row['table']:.0f} px wide in {row['content']:.0f} px "
                       "and does not scroll")
    return bad


def test_the_table_fit_check_catches_a_table_cut_off(tmp_path):
    """The check above on a constructed page: a wide table outside a scroller is caught, inside one it is not."""
    wide = "<table><tr>" + "<td>0.82&nbsp;[0.80,&nbsp;0.84]</td>" * 40 + "</tr></table>"
    page = tmp_path / "page.html"
    page.write_text(f"<html><body><article style='width:800px'>{wide}<div style='overflow-x:auto'>{wide}</div>"
                    "<table><tr><td>narrow</td></tr></table></article></body></html>")
    rows = _measure_tables(page, tmp_path)
    assert len(rows) == 3 and [r["index"] for r in rows if _cut_off([r])] == [0], rows


# -- Tables that fit the screen ---------------------------------------------------------------------

#: Run in the page after it loads: open every folded block, then measure each table against the article column.
_MEASURE_TABLES = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  const article = document.querySelector("article.bd-article") || document.querySelector("main");
  const box = article.getBoundingClientRect();
  const tables = [...document.querySelectorAll("table")].map((t) => {
    const r = t.getBoundingClientRect();
    return {left: r.left, right: r.right, width: t.scrollWidth, head: (t.rows[0] || {}).textContent || ""};
  });
  const out = document.createElement("pre");
  out.id = "measured-tables";
  out.textContent = JSON.stringify({left: box.left, right: box.right, tables});
  document.body.appendChild(out);
});
</script>"""


def _table_widths(html: str, base: Path, tmp_path: Path, width: int = 1400) -> dict:
    """The article column's edges and each table's, in a ``width`` px window, with every ``<details>`` open, for a
    built page's ``html`` copied to ``tmp_path`` with a ``<base>`` at ``base`` (its directory in the build, which
    is not written to)."""
    html = html.replace("<head>", f'<head><base href="{base.resolve().as_uri()}/">', 1)
    html = html.replace("</body>", _MEASURE_TABLES + "</body>", 1)
    probe = tmp_path / "measured.html"
    probe.write_text(html)
    dom, _ = _browse(probe, tmp_path, "--dump-dom", f"--window-size={width},1600")
    found = re.search(r'<pre id="measured-tables"[^>]*>(.*?)</pre>', dom, re.DOTALL)
    assert found, "the measuring script did not run"
    from html import unescape

    return json.loads(unescape(found.group(1)))


def _overflowing(measured: dict) -> list[str]:
    return [f"table {i + 1} ({t['head'].strip()[:60]!r}): {t['width']:.0f} px, right edge {t['right']:.0f} > "
            f"{measured['right']:.0f}" for i, t in enumerate(measured["tables"])
            if t["right"] > measured["right"] + 1 or t["width"] > measured["right"] - measured["left"] + 1]


@pytest.mark.built
@pytest.mark.parametrize("page", ["book/generated/paper_vs_reproduction.html", "book/generated/status.html"])
def test_every_table_fits_the_content_column_at_1400_px(page, tmp_path):
    """At 1400 px, with every folded block open, no table of the page is wider than the article column (none
    needs the theme's sideways scrolling). The check, on the same page with a table that cannot wrap, fails."""
    path = HTML / page
    assert path.is_file(), f"{path} missing: run `make book`"
    measured = _table_widths(path.read_text(), path.parent, tmp_path)
    assert measured["tables"], f"{page}: no table measured"
    assert not _overflowing(measured), f"{page}: " + "; ".join(_overflowing(measured))

    wide = "<table><tr>" + "".join(f"<td>unbreakable_cell_number_{i:02d}</td>" for i in range(12)) + "</tr></table>"
    control = path.read_text().replace('<article class="bd-article">', f'<article class="bd-article">{wide}', 1)
    (tmp_path / "control").mkdir()
    assert _overflowing(_table_widths(control, path.parent, tmp_path / "control")), "the width check cannot fail"


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("*.md")))
def test_every_chapter_declares_the_inputs_it_read(name):
    """The status page lists each chapter's inputs from its ``publish_inputs`` call: every chapter makes one, with
    the models it read (the feature stores' ``declared_inputs``, or chapter 00's own fingerprints)."""
    from vrp_utils import run

    source = "\n".join(c.source for c in run.read_notebook(REPO_ROOT / "notebooks" / f"{name}.md").cells
                       if c.cell_type == "code")
    assert re.search(r"^publish_inputs\((\*\*declared_inputs\(|\n\s+data=)", source, re.MULTILINE), \
        f"{name}: declares no inputs (the status page would say 'not declared by this notebook')"
    assert "models=" in source or "declared_inputs(" in source, f"{name}: declares no models"


@pytest.mark.built
def test_the_code_wrap_check_catches_code_running_off_the_column(tmp_path):
    """The chapters' code blocks wrap at 1400 px (checked on every page above) because of the book's stylesheet: on a
    chapter without it, the same measurement finds code running past its box."""
    pages = sorted((HTML / "book" / "generated").glob("0*.html"))
    assert len(pages) == 6
    unstyled = re.sub(r'<link[^>]+vrp\.css[^>]*>', "", pages[1].read_text())
    assert unstyled != pages[1].read_text(), "the book's stylesheet is not linked"
    fit = _browse_and_measure(pages[1], tmp_path, unstyled)[2]
    assert fit is not None and fit["code"], "the check cannot fail"
