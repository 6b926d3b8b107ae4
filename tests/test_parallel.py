"""`side_by_side`: the one pool the chapters' model passes share."""

from __future__ import annotations

import os

import pytest

from vrp_utils.analysis.parallel import side_by_side


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def test_results_in_call_order_from_worker_processes():
    calls = [(x,) for x in range(7)]
    pooled = side_by_side(_pid_and_square, calls, jobs=2)
    assert [square for _, square in pooled] == [x * x for x in range(7)]
    assert os.getpid() not in {pid for pid, _ in pooled}  # really other processes
    here = side_by_side(_pid_and_square, calls, jobs=1)
    assert {pid for pid, _ in here} == {os.getpid()} and [s for _, s in here] == [s for _, s in pooled]
    assert side_by_side(_pid_and_square, [(3,)], jobs=2) == [(os.getpid(), 9)]  # one call: no pool to start
    assert side_by_side(_pid_and_square, [], jobs=2) == []


@pytest.mark.parametrize("jobs", [0, -1, 1.5, "2", True])
def test_bad_jobs_are_refused(jobs):
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        side_by_side(_pid_and_square, [(1,)], jobs=jobs)
