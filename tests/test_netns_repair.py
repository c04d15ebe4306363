"""Repair on network namespaces (issue 15): delivered == sent after each fault within the
reliability interval, and a fault beyond it counted exactly as unrepairable. Needs root,
``ip netns`` and ``nft`` (tests/netns_lab.py); skipped otherwise."""

from __future__ import annotations

import pytest

from . import netns_repair
from .netns_lab import unavailable

why = unavailable()
pytestmark = [pytest.mark.skipif(why is not None, reason=why or ""), pytest.mark.timeout(180)]


def _check_whole(rows: list[netns_repair.RepairRow]) -> None:
    for row in rows:
        print(f"\n{row.markdown()}")
        assert row.delivered == row.sent, f"not repaired: {row}"
        assert row.unrepairable == 0 and row.duplicates == 0, row


def test_partition_3s_within_a_60s_interval() -> None:
    _check_whole(netns_repair.partition(3, 60))


@pytest.mark.parametrize("host", ["subscriber's", "publisher's"])
def test_proxy_sigkill_and_restart_at_3k(host: str) -> None:
    rows = netns_repair.proxy_restart(host)
    _check_whole(rows)
    assert any(row.repaired > 0 for row in rows), "the restart lost nothing: proves nothing"


def test_subscriber_stopped_5s_past_its_high_water_mark() -> None:
    rows = netns_repair.stopped_subscriber()
    _check_whole(rows)
    assert rows[0].repaired > 0, "nothing was dropped: the test proves nothing"


def test_a_fault_longer_than_the_interval_is_counted_exactly() -> None:
    (row,) = netns_repair.beyond_the_interval()
    print(f"\n{row.markdown()}")
    assert row.lost > 0 and row.unrepairable == row.lost and row.duplicates == 0, row
