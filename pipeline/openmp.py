"""How torch's OpenMP threads wait at barriers: the default that the CLI and the Dask workers set.

Read by libgomp when torch loads, so it must be in the environment before the first ``import torch``
of a process. Measured on the 2-core machine (docs/benchmarks.md, "Threads and oversubscription"):
threads that spin until they are woken (libgomp's default) collapse a distillation step 3–20× as soon
as another process shares the cores; threads that sleep at once (``OMP_WAIT_POLICY=PASSIVE``) never
collapse but, on a quiet machine, leave the second core nearly useless (15.0 steps/s with two threads,
14.9 with one, 21.1 spinning); a short spin (``GOMP_SPINCOUNT=1000``) keeps most of the quiet speed
(18.2) and does not collapse under contention.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SPIN_COUNT", "openmp_wait_defaults"]

#: libgomp's spin count before a waiting thread sleeps (its default is 300 000, 30 billion with OMP_WAIT_POLICY=ACTIVE)
SPIN_COUNT = "1000"


def openmp_wait_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so that OpenMP threads spin briefly, then sleep.

    Nothing when the user chose already (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set).
    """
    if environ.get("OMP_WAIT_POLICY") or environ.get("GOMP_SPINCOUNT"):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}
