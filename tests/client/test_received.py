"""``tamiyo_client.received``: what the client keeps of what it received."""

from __future__ import annotations

from tamiyo_client.received import ClientStats


def test_stats_print_counters_and_percentiles_not_every_latency() -> None:
    """``print(client.stats)`` is a natural debugging step inside a training job: it
    must not dump up to 100,000 latencies into the log."""
    stats = ClientStats(decisions=3)
    assert "latency=n/a over 0" in repr(stats)
    stats.latencies_ms.extend(float(i) for i in range(1, 10_001))
    text = repr(stats)
    assert len(text) < 1_000
    assert "decisions=3" in text
    assert "frames_sent=0" in text
    assert "p50 5001.00 ms, p99 9900.00 ms" in text
    assert "over 10000" in text
