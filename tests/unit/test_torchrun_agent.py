"""launch/torchrun_agent.py's changes to torchrun, checked on torch's own classes."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from tests.conftest import REPO


def test_a_membership_restart_gives_the_ranks_the_shutdown_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node joining an elastic job restarts the ranks: they get --shutdown_timeout to save, not 30 s."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    spec = importlib.util.spec_from_file_location("torchrun_agent", REPO / "launch" / "torchrun_agent.py")
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    monkeypatch.setattr(LocalElasticAgent, "_stop_workers", LocalElasticAgent._stop_workers)  # restored after
    timeouts: list[int] = []
    fake = SimpleNamespace(_shutdown_timeout=900, _shutdown=lambda timeout=30: timeouts.append(timeout))
    LocalElasticAgent._stop_workers(fake, None)
    assert timeouts == [30]  # torch's own: _shutdown() with its default grace
    agent.stop_with_shutdown_timeout()
    LocalElasticAgent._stop_workers(fake, None)
    assert timeouts == [30, 900]
