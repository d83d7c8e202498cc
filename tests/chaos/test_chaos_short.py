"""The short chaos run (one round per fault) that ``make test`` includes.

``make chaos`` runs the long one (``nvo3 chaos --rounds 50``); results and
seeds are in docs/reliability.md.
"""

from __future__ import annotations

import io

import pytest

from nvo3 import chaos

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_short_chaos_run_loses_nothing_and_leaves_nothing_stale() -> None:
    out = io.StringIO()
    rc = chaos.main(rounds=len(chaos.FAULTS), seed=7, out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert f"{len(chaos.FAULTS)} rounds, 0 with lost/stale/wrong-VNI" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert {row[1] for row in rows} == set(chaos.FAULTS)
    pause = next(row for row in rows if row[1] == "nve_pause")
    assert int(pause[-1]) > 0, "the compaction re-list path must have run"
