"""``make demo``: train a small real PyTorch model with Tamiyo attached and show it.

Starts a Tamiyo server process on a free local port (or uses ``--target``), trains the
demo model (``tamiyo_client.demo_task``) twice from the same seed, without and with
Tamiyo, prints every decision as it arrives with its latency, and ends with a summary.
Writes ``loss.png`` (both validation-loss curves, adaptations marked), ``summary.json``
and, when it started one, ``server.log`` under ``--out`` (default ``demo-results/``).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from tamiyo.cli_text import HelpFormatter, describe
from tamiyo.config import ClientConfig, DemoConfig
from tamiyo.v1 import decision_pb2
from tamiyo_client.client import ReceivedDecision
from tamiyo_client.demo_task import (
    FAULT_LAYER,
    RunResult,
    TeacherTask,
    attach,
    fault_step,
    make_student,
    run,
)
from tamiyo_client.host import ApplyResult
from tamiyo_client.process import ProcessTamiyoClient
from tamiyo_client.security import add_security_args, security_from_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(out: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real server process (``python -m tamiyo_server``) on a free loopback port."""
    port = _free_port()
    log = (out / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tamiyo_server", "--port", str(port), "--metrics-port", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"127.0.0.1:{port}"


def _action(d: decision_pb2.AdaptationDecision) -> str:
    return decision_pb2.AdaptationAction.Name(d.action).removeprefix("ADAPTATION_ACTION_")


def _rule(d: decision_pb2.AdaptationDecision) -> str:
    return decision_pb2.DecisionRule.Name(d.rule).removeprefix("DECISION_RULE_")


def print_decision(step: int, r: ReceivedDecision, result: ApplyResult) -> None:
    d = r.decision
    client_ms = f"{r.latency_ms:6.2f}" if r.latency_ms is not None else "   n/a"
    line = (
        f"[step {step:5d}] {_action(d):11s} conf {d.confidence:.2f} rule {_rule(d):20s}"
        f" client {client_ms} ms  server {d.server_latency_us / 1000:5.2f} ms"
    )
    if d.degraded:
        line += "  (degraded)"
    if d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL:
        verdict = "applied" if result.applied else f"NOT applied: {result.detail}"
        line += (
            f"\n              -> {d.kernel_id} into {d.target_layer_id}[{d.seed_index}]: {verdict}"
        )
        if d.reason:
            line += f"\n              reason: {d.reason}"
    print(line, flush=True)


def plot(baseline: RunResult, tamiyo: RunResult, path: Path, broken: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for res, label in ((baseline, "without Tamiyo"), (tamiyo, "with Tamiyo")):
        steps, losses = zip(*res.curve, strict=True)
        ax.plot(steps, losses, label=label)
    ax.axvline(broken, color="red", ls="--", lw=1, label="fault: hidden block damaged")
    for i, (step, result) in enumerate(tamiyo.applied):
        ax.axvline(step, color="grey", ls=":", lw=1, label="adaptation" if i == 0 else None)
        ax.annotate(result.layer_id, (step, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation MSE (log)")
    ax.set_title("Teacher-student MLP; one block breaks mid-run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fault_findings(
    applied: list[dict[str, Any]], fault_layer: str, fault_step: int
) -> tuple[int | None, list[dict[str, Any]]]:
    """Did the policy find the broken block? The step of the first kernel into
    ``fault_layer`` at or after ``fault_step`` (None: never), and the false positives:
    every kernel into another layer, or into that one before it broke."""
    repairs = [a["step"] for a in applied if a["layer"] == fault_layer and a["step"] >= fault_step]
    wrong = [a for a in applied if a["layer"] != fault_layer or a["step"] < fault_step]
    return min(repairs, default=None), wrong


def summarize(
    cfg: DemoConfig, baseline: RunResult, tamiyo: RunResult, client: ProcessTamiyoClient
) -> dict[str, Any]:
    stats = client.stats
    decisions = [r.decision for r in tamiyo.decisions]
    server_ms = sorted(d.server_latency_us / 1000 for d in decisions)
    broken = fault_step(cfg)
    after = [d for d in decisions if d.frame_step >= broken and not d.degraded]
    applied: list[dict[str, Any]] = [
        {"step": s, "layer": r.layer_id, "seed": r.seed_index, "kernel": r.kernel_id}
        for s, r in tamiyo.applied
    ]
    repaired_at, false_positives = fault_findings(applied, FAULT_LAYER, broken)
    return {
        "config": asdict(cfg),
        "fault_step": broken,
        "policy_version": client.policy_version,
        "decision_deadline_ms": client.decision_deadline_ms,
        "decisions": len(decisions),
        "decisions_by_action": dict(Counter(_action(d) for d in decisions)),
        "decisions_by_rule": dict(Counter(_rule(d) for d in decisions)),
        "degraded_decisions": sum(d.degraded for d in decisions),
        "adaptations_applied": applied,
        # Did the policy find the broken block? The first kernel into it after the
        # fault (None: never), and every other adaptation: a kernel into a healthy
        # layer, or into the broken one before it broke, is a false positive.
        "fault_layer": FAULT_LAYER,
        "fault_repaired_at": repaired_at,
        "false_positives": false_positives,
        "adaptations_refused": sum(1 for r in tamiyo.decisions if r.decision.action == 2)
        - len(tamiyo.applied),
        "adaptations_by_policy": sum(
            d.rule == decision_pb2.DECISION_RULE_POLICY
            and d.action == decision_pb2.ADAPTATION_ACTION_LOAD_KERNEL
            for d in decisions
        ),
        # The network's P(adapt) (a decision's confidence) after the fault, for the
        # summary's explanation when it never reached the confidence threshold.
        "max_confidence_after_fault": max((d.confidence for d in after), default=None),
        "extra_parameters": tamiyo.extra_parameters,
        "outcome_rewards": dict(tamiyo.rewards),
        "final_val_loss": {"without": baseline.curve[-1][1], "with": tamiyo.curve[-1][1]},
        # The short-term recovery (reward horizon after the fault) and the whole tail.
        "val_loss_after_fault": {
            "step": broken + cfg.reward_after_steps,
            "without": _at(baseline.curve, broken + cfg.reward_after_steps),
            "with": _at(tamiyo.curve, broken + cfg.reward_after_steps),
        },
        "mean_val_loss_after_fault": {
            "without": _mean_after(baseline.curve, broken),
            "with": _mean_after(tamiyo.curve, broken),
        },
        "best_val_loss": {
            "without": min(v for _, v in baseline.curve),
            "with": min(v for _, v in tamiyo.curve),
        },
        "client_latency_ms": {
            "p50": stats.latency_percentile(50),
            "p99": stats.latency_percentile(99),
        },
        "server_latency_ms_p50": server_ms[len(server_ms) // 2] if server_ms else None,
        "frames": {"submitted": stats.frames_submitted, "sent": stats.frames_sent},
        "frames_coalesced": client.frames_coalesced,
        "frames_shed": stats.frames_shed,
        # asks dropped while the server's pushback lasted (the frame went without one)
        "decision_requests_deferred": stats.decision_requests_deferred,
        "stream_errors": stats.stream_errors,
        "sessions": stats.sessions,
        "train_seconds": {"without": baseline.seconds, "with": tamiyo.seconds},
        "curves": {"without": baseline.curve, "with": tamiyo.curve},
    }


def _at(curve: list[tuple[int, float]], step: int) -> float | None:
    """The first curve point at or after ``step``."""
    return next((v for s, v in curve if s >= step), None)


def _mean_after(curve: list[tuple[int, float]], step: int) -> float | None:
    """Mean validation loss at the curve points from ``step`` on: how fast a run
    recovered from the fault, not only where it ended."""
    after = [v for s, v in curve if s >= step]
    return sum(after) / len(after) if after else None


def print_summary(s: dict[str, Any], out: Path) -> None:
    lat = s["client_latency_ms"]

    def ms(v: float | None) -> str:
        return f"{v:.2f} ms" if v is not None else "n/a"

    print("\n==== Tamiyo demo summary ====")
    print(f"policy                 {s['policy_version']}")
    print(f"decisions              {s['decisions']}  by action {s['decisions_by_action']}")
    print(f"                       by rule {s['decisions_by_rule']}")
    n_applied, extra = len(s["adaptations_applied"]), s["extra_parameters"]
    print(f"adaptations applied    {n_applied} (+{extra} parameters),"
          f" refused {s['adaptations_refused']}")  # fmt: skip
    for a in s["adaptations_applied"]:
        print(f"    step {a['step']:5d}: {a['kernel']} into {a['layer']}[{a['seed']}]")
    print(f"fault                  step {s['fault_step']}: {s['fault_layer']} block's bias"
          f" set to {s['config']['damage_bias']}")  # fmt: skip
    fixed, wrong = s["fault_repaired_at"], s["false_positives"]
    found = (f"yes, step {fixed} ({fixed - s['fault_step']} steps after the fault)"
             if fixed is not None else "no")  # fmt: skip
    print(f"broken block adapted   {found}")
    print(f"false positives        {len(wrong)}"
          + "".join(f"; {a['layer']} at step {a['step']}" for a in wrong)
          + (" (a kernel into a healthy layer, or before the fault)" if wrong else ""))  # fmt: skip
    if s["adaptations_by_policy"]:
        print(f"                       {s['adaptations_by_policy']} adaptation(s) chosen by"
              " the served policy network (rule POLICY)")  # fmt: skip
    else:
        conf = s["max_confidence_after_fault"]
        seen = f"{conf:.2f}" if conf is not None else "n/a"
        print("                       the served policy chose no adaptation: its P(adapt)"
              f" after the fault peaked at {seen}, under the rules' confidence threshold"
              " (0.5 by default), or a later rule vetoed it (see 'by rule')")  # fmt: skip
    fv, bv = s["final_val_loss"], s["best_val_loss"]
    print(f"final val loss         without {fv['without']:.4f}   with {fv['with']:.4f}")
    print(f"best val loss          without {bv['without']:.4f}   with {bv['with']:.4f}")
    va = s["val_loss_after_fault"]
    if va["without"] is not None and va["with"] is not None:
        print(f"val loss at step {va['step']:<5d}   without {va['without']:.4f}"
              f"   with {va['with']:.4f}   (reward horizon after the fault)")  # fmt: skip
    mv = s["mean_val_loss_after_fault"]
    if mv["without"] is not None and mv["with"] is not None:
        print(f"mean val loss from the fault on  without {mv['without']:.4f}"
              f"   with {mv['with']:.4f}")  # fmt: skip
    print(f"decision latency       client p50 {ms(lat['p50'])}  p99 {ms(lat['p99'])};"
          f" server p50 {ms(s['server_latency_ms_p50'])}")  # fmt: skip
    t = s["train_seconds"]
    print(f"training time          without {t['without']:.1f} s   with {t['with']:.1f} s")
    print(f"frames                 {s['frames']}, coalesced {s['frames_coalesced']},"
          f" shed {s['frames_shed']}, stream errors {s['stream_errors']}")  # fmt: skip
    print(f"plot                   {out / 'loss.png'}")
    print(f"summary                {out / 'summary.json'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tamiyo-demo", description=describe(__doc__), formatter_class=HelpFormatter
    )
    p.add_argument("--target", help="use a running server (host:port) instead of starting one")
    p.add_argument("--out", default="demo-results", help="where the plot and summary go")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps per run")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="data, weights and fault")
    add_security_args(p)
    p.add_argument(
        "--connect-timeout-s", type=float, default=60.0, help="give up on the server after (s)"
    )
    a = p.parse_args(argv)
    cfg = replace(DemoConfig(), steps=a.steps, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # leave the other core to the server
    security = security_from_args(a)

    proc = None
    target = a.target
    if target is None:
        proc, target = start_server(out)
        print(f"started a Tamiyo server on {target} (log: {out / 'server.log'})")
    try:
        task = TeacherTask(cfg)
        print(f"1/2 training {cfg.steps} steps without Tamiyo ...", flush=True)
        baseline = run(cfg, task, None, attach(make_student(cfg), cfg))
        host = attach(make_student(cfg), cfg)
        print("host topology:\n  " + host.topology_summary().replace("\n", "\n  "))
        client = ProcessTamiyoClient(
            host.session_open(),
            replace(ClientConfig(), target=target, decision_deadline_ms=cfg.decision_deadline_ms),
            security,
        )
        t0 = time.monotonic()
        client.start()
        while not client.wait_connected(1.0):
            dead = proc is not None and proc.poll() is not None
            # fatal_error (a wrong token, an incompatible server): it will never connect,
            # so say why now rather than after --connect-timeout-s (QA 16, L1)
            fatal = client.fatal_error
            if dead or fatal or time.monotonic() - t0 > a.connect_timeout_s:
                why = "the server process exited" if dead else fatal or client.last_error
                why = why or f"no session within {a.connect_timeout_s:.0f} s"
                print(f"could not reach Tamiyo at {target}: {why}", file=sys.stderr)
                if proc is not None:
                    tail = (out / "server.log").read_text(errors="replace")[-2000:]
                    print(f"--- server.log (tail) ---\n{tail}", file=sys.stderr)
                client.close()
                return 1
        print(
            f"connected in {time.monotonic() - t0:.1f} s, session {client.session_id},"
            f" policy {client.policy_version},"
            f" decision deadline {client.decision_deadline_ms} ms"
        )
        print(f"2/2 training {cfg.steps} steps with Tamiyo (decisions as they arrive):")
        try:
            tamiyo = run(cfg, task, client, host, print_decision)
            client.wait_for(lambda: client.pending() == 0, 2.0)  # last outcomes
        finally:
            client.close()
        summary = summarize(cfg, baseline, tamiyo, client)
        plot(baseline, tamiyo, out / "loss.png", fault_step(cfg))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, out)
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
