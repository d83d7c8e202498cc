"""``make demo``'s entry point: exit code 0 and the summary, twice in a row."""

from __future__ import annotations

import io

import pytest

from nvo3 import demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_twice_and_cleans_up() -> None:
    for insecure in (False, True):  # secured by default; --insecure for debugging
        out = io.StringIO()
        assert demo.main(out=out, insecure=insecure) == 0
        text = out.getvalue()
        assert ("INSECURE" in text) == insecure
        assert ("TLS + NKeys + etcd RBAC" in text) != insecure
        assert "demo ok: 2 VNs, 4 agents, 6 VNICs" in text
        assert "refused: mac_conflict,ip_required" in text
        assert "migrations: same-NVE 0 IMA writes, cross-NVE 2 claims" in text
        assert "check lost=0 stale=0" in text
        assert "/nvo3/vn/name/" in text
        assert "/nvo3/map/" in text
