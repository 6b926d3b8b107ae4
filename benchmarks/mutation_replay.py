"""Replay given mutants against the current tests, without a ``mutmut run`` (quick check of new tests).

    python benchmarks/mutation_replay.py NAMES_FILE_OR_NAME ... -- PYTEST_ARGS ...

Why: ``mutmut run --survivors`` re-collects and re-runs every selected test per mutant through mutmut's
scheduler; while a long run holds ``mutants/`` (its results cache), a new test can still be checked
against the survivors it was written for. This copies mutmut's mutated tree (``mutants/vrp_utils``, made
by the last ``mutmut run``) and the *current* ``tests/`` into a temporary directory, imports the test
files once (as mutmut does before forking its workers, so code that runs at import, such as the
capturing functions ``attention.py`` registers, stays unmutated there too), then forks once per mutant
with ``MUTANT_UNDER_TEST`` set and runs ``pytest -x PYTEST_ARGS``: exit 0 is "survived", anything else
"killed". A names file holds one mutant name a line (``mutation_report.py <module> --names``).

It is a replay, not a score: mutmut's own rerun (``mutation.sh --survivors``) stays the reference.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__)
        return 2
    split = argv.index("--")
    sources, pytest_args = argv[:split], argv[split + 1 :]
    names: list[str] = []
    for source in sources:
        path = Path(source)
        names += [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else [source]
    scratch = Path(tempfile.mkdtemp(prefix="mutation-replay-"))
    shutil.copytree(ROOT / "mutants" / "vrp_utils", scratch / "vrp_utils")
    shutil.copytree(ROOT / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mutants" / "pyproject.toml", scratch / "pyproject.toml")
    os.chdir(scratch)
    sys.path.insert(0, str(scratch))
    os.environ.setdefault("VRP_HYPOTHESIS_PROFILE", "mutation")
    import pytest

    import vrp_utils

    assert Path(vrp_utils.__file__).is_relative_to(scratch), vrp_utils.__file__
    with contextlib.redirect_stdout(io.StringIO()):
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args])
    survived = 0
    for name in names:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: run the tests against this mutant, report pytest's exit code
            os.close(read)
            os.environ["MUTANT_UNDER_TEST"] = name
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *pytest_args])
            os.write(write, str(int(code)).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        code = os.read(read, 16).decode()
        os.close(read)
        verdict = "survived" if code == "0" else "killed"
        survived += verdict == "survived"
        print(f"{verdict:8s} {name}", flush=True)
    print(f"survived: {survived} of {len(names)}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
