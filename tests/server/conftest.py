"""Fixtures of the server tests: each test's own DP ledgers and kept factors, no client left over."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_clients(tmp_path, monkeypatch):
    """Clients' ledger and kept-factor files in this test's folder (never ``~/.cache``), and the
    ClientApp's cache of clients empty before and after the test (in-process runs all use run id 1)."""
    from tests.server.local_grid import forget_clients

    monkeypatch.setenv("FEDLORA_LEDGER_DIR", str(tmp_path / "ledgers"))
    forget_clients()
    yield
    forget_clients()
