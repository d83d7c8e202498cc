"""The short chaos runs (one round per fault) that ``make test`` includes: on the plain
stack, and on the secured one (TLS, one NKey identity per process, etcd RBAC;
``nvo3 chaos --secured``), where the killed and restarted NATS and etcd members come
back with their secured configuration.

``make chaos`` runs the long one (``nvo3 chaos --rounds 50``); results and
seeds are in docs/reliability.md.
"""

from __future__ import annotations

import io

import pytest

from nvo3 import chaos

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def _short_run(*, secured: bool) -> tuple[str, list[list[str]]]:
    """One round per fault; the printed text and its table rows."""
    out = io.StringIO()
    rc = chaos.main(rounds=len(chaos.FAULTS), seed=7, out=out, secured=secured)
    text = out.getvalue()
    assert rc == 0, text
    assert f"{len(chaos.FAULTS)} rounds, 0 with lost/stale/wrong-VNI" in text
    # How etcd members die is said, by version (SIGTERM on one that kill -9 corrupts).
    assert text.splitlines()[1].startswith("chaos: etcd 3."), text
    assert "diverged" not in text, text  # every round, the members agreed
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert {row[1] for row in rows} == set(chaos.FAULTS), text
    pause = next(row for row in rows if row[1] == "nve_pause")
    assert int(pause[-1]) > 0, "the compaction re-list path must have run"
    return text, rows


def test_short_chaos_run_loses_nothing_and_leaves_nothing_stale() -> None:
    text, _ = _short_run(secured=False)
    assert "secured" not in text.splitlines()[0]


def test_short_secured_chaos_run_loses_nothing_and_leaves_nothing_stale() -> None:
    text, rows = _short_run(secured=True)
    assert text.splitlines()[0].endswith(f"secured ({chaos.SECURED_MODE})"), text
    # A killed NVE's bindings are withdrawn from the other NVE (cleanup_s is "-" when
    # it held none of them, "inf" when they outlived the wait).
    for row in rows:
        if row[1] in ("nve_kill", "nve_restart"):
            assert row[8] != "inf", text
