"""Model passes side by side: the chapters' one way to spread independent extraction passes over processes.

Each pass (a masked, ablated, sampled or untrained-twin extraction) runs in a worker process of its own with
one torch thread: on 2 cores two single-threaded passes beat one pass on two contending threads, and one
thread per pass keeps the answers independent of the machine's core count. Passes of *every* model go into
one pool, so a worker never idles while a model with an odd number of passes finishes (3 passes per model
on 2 workers left a quarter of the pool idle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def side_by_side(function: Callable[..., T], calls: Sequence[tuple], jobs: int = 1) -> list[T]:
    """``[function(*args) for args in calls]``, ``jobs`` worker processes at a time (joblib), results in order.

    ``function`` must be importable at module level (the workers import it); with ``jobs <= 1`` or a single
    call everything runs here, in this process.
    """
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    calls = list(calls)
    if jobs == 1 or len(calls) <= 1:
        return [function(*args) for args in calls]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=min(jobs, len(calls)))(delayed(function)(*args) for args in calls)

