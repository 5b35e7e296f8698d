"""A training loop with the client attached runs at the same speed whether the server
is up, slow, or down.

One real model trained in one loop, in the five modes of ``bench.client`` (the same
harness as ``make bench``), interleaved in short segments so machine noise hits all
alike: ``bare`` (the model without KasminaLayers), ``telemetry`` (KasminaLayers, a frame
built every step, no client: the no-client baseline), and ``up`` / ``slow`` / ``down``
(that loop plus a ``ProcessTamiyoClient``, the streaming client in a sidecar process, to
a real server process, to the same server behind a slow narrow TCP proxy, or to a port
where nothing listens).

Asserted, as ratios of median step times measured in the same run (medians over rounds
of per-round ratios, ``bench.client.paired_ratio``; step time = wall minus the time the
thread sat runnable waiting for a CPU, kept within [CPU time, wall], so waits on the
client's locks or the GIL count and time stolen by other processes does not):

- up, slow and down are each within ``MAX_RATIO`` = 1.10 (issue #8) of the no-client
  baseline. With the client on a thread of the training process (``BlockingTamiyoClient``)
  clean-clone CI measured up 1.09-1.27: the client thread took the GIL whenever a torch op
  released it, and a GIL holder preempted by another process stalled the training thread
  for its whole time slice. The sidecar runs in its own process; the training thread only
  packs a frame and writes it to a pipe (``bench.client`` rows ``thread-*`` are the A/B);
- the telemetry itself stays within ``MAX_TELEMETRY_RATIO`` of the bare model: before
  the KasminaLayer hot-path work it cost 2.7x on this model (hooks and ~40 torch ops per
  layer per step), now ~1.05-1.13x; the bound catches a return to per-step torch work.

Up to 3 measurements: a timing test on a shared 2-core box sees bursts of foreign load;
a real per-step cost shows in every attempt.
"""

from __future__ import annotations

from bench.client import CLIENT_MODES, measure, rig, summarize, with_threads

MAX_RATIO = 1.10  # client modes vs the no-client baseline (issue #8)
MODES = ("bare", "telemetry", *CLIENT_MODES)
# Rounds of 20-step segments per attempt (was 10): a steadier median. The sidecar client's
# own cost on the training thread is ~0.1 ms a step (~3 %: a pipe write, a poll); runs on
# 2026-11-22 at load avg 3-7 under nice 19 measured 1.05-1.14 per attempt, and 11 of 12
# runs passed (the failure, at load ~6, was before own times were kept >= CPU time).
ROUNDS = 16
MAX_TELEMETRY_RATIO = 1.25  # KasminaLayers + a frame every step vs the bare model


def test_training_speed_is_the_same_whether_server_is_up_slow_or_down() -> None:
    def run() -> None:
        with rig(modes=MODES) as r:
            detail = ""
            ok = False
            for attempt in range(3):
                rows = {row["mode"]: row for row in summarize(measure(r, ROUNDS, 20, MODES))}
                ratios = {m: rows[m]["vs_loop"] for m in CLIENT_MODES}
                tele = rows["telemetry"]["ratio"]
                detail = " ".join(
                    f"{m}: {row['own_us']:.0f} µs (cpu {row['cpu_us']:.0f}, wall"
                    f" {row['wall_us']:.0f}, x{row['ratio']:.3f} bare);"
                    for m, row in rows.items()
                )
                ok = all(v <= MAX_RATIO for v in ratios.values()) and tele <= MAX_TELEMETRY_RATIO
                if ok:
                    break
                print(f"attempt {attempt}: vs no-client {ratios}, telemetry x{tele}: {detail}")
            # The three modes were really different:
            up, slow, down = (r.clients[m] for m in CLIENT_MODES)
            assert up.stats.decisions > 0
            assert not down.connected
            assert down.stats.frames_sent == 0
            assert down.frames_coalesced > 0
            up_p50 = up.stats.latency_percentile(50)
            slow_p50 = slow.stats.latency_percentile(50)
            assert up_p50 is not None
            assert slow_p50 is None or slow_p50 > 5 * up_p50  # decisions came late, if at all
            for mode, ratio in ratios.items():
                assert ratio <= MAX_RATIO, f"{mode}: {ratio:.3f}x the no-client loop: {detail}"
            assert tele <= MAX_TELEMETRY_RATIO, f"telemetry x{tele:.3f} the bare model: {detail}"
            print(f"vs no-client {ratios}; telemetry x{tele:.3f} bare: {detail}")

    with_threads(1, run)
