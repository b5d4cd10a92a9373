"""The OpenMP waiting default: a short spin unless the user chose, in the CLI's and the workers' environment."""

from __future__ import annotations

import pytest

from calodistill.pipeline.openmp import SPIN_COUNT, openmp_wait_defaults
from calodistill.pipeline.orchestration.cluster import worker_environ


def test_defaults_spin_briefly_unless_the_user_chose() -> None:
    assert openmp_wait_defaults({}) == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert openmp_wait_defaults({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert openmp_wait_defaults({"GOMP_SPINCOUNT": "5"}) == {}


@pytest.mark.parametrize("user", [{}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_worker_environment_follows_the_user(monkeypatch: pytest.MonkeyPatch, user: dict[str, str]) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for key, value in user.items():
        monkeypatch.setenv(key, value)
    env = worker_environ()["distributed.nanny.pre-spawn-environ"]
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    expected = user or {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert {k: env[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in env} == expected
