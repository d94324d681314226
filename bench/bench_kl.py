"""Benchmark: fused KL (projector.fused_kl_loss) vs materialized logits + F.kl_div.

Both variants compute the same loss from student/teacher final hidden states (N, C) and a tied
embedding (V, C), forward + backward (gradient to the student hidden states; the embedding is
frozen as in Seal unless --weight-grad). The naive variant builds both (N, V) logit tensors.

Memory: every measurement runs in a fresh subprocess; peak memory is the process's peak RSS during
one forward+backward minus its RSS just before (the high-water mark is reset first, Linux
/proc/self/clear_refs), after the inputs are allocated. Time: median
over --rounds, the two variants run interleaved (naive, fused, naive, ...) so that load from other
processes on the machine hits both alike.

    python bench/bench_kl.py                      # N=2048, V=50257, C=768, 1 thread
    python bench/bench_kl.py --tokens 512 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from projector import fused_kl_loss  # noqa: E402


def naive_kl(h_s: torch.Tensor, h_t: torch.Tensor, w: torch.Tensor, T: float) -> torch.Tensor:
    s = h_s @ w.T  # (N, V)
    with torch.no_grad():
        t = h_t @ w.T  # (N, V)
    per_token = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    return per_token.mean() * T * T


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak_window() -> float:
    """Reset the peak-RSS high-water mark (Linux: write 5 to clear_refs); return the current RSS in MiB.
    Without the reset, earlier work (model building, feature caching) would hide the step's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak_since_mib(rss_before: float) -> float:
    return _status_mib("VmHWM") - rss_before


def report_step(step, iters: int) -> None:
    """Run `step` (a callable returning its own seconds) 1 + iters times and print one JSON line: the
    first call's peak memory, and the median time of the calls after it (the first one if iters is 0)."""
    before = start_peak_window()
    times = [step()]  # the first call is also the memory measurement
    peak = peak_since_mib(before)
    times += [step() for _ in range(iters)]
    print(json.dumps({"peak_mib": peak, "time_s": statistics.median(times[1:] or times)}))


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    h_s = torch.randn(args.tokens, args.hidden, requires_grad=True)
    h_t = torch.randn(args.tokens, args.hidden)
    w = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_(args.weight_grad)

    def step() -> float:
        t0 = time.perf_counter()
        if args.worker == "naive":
            loss = naive_kl(h_s, h_t, w, args.temperature)
        else:
            loss = fused_kl_loss(h_s, h_t, w, temperature=args.temperature, chunk_size=args.chunk_size)
        loss.backward()
        h_s.grad = w.grad = None
        return time.perf_counter() - t0

    report_step(step, args.iters)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens N (default 2048)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary V (default GPT-2's 50257)")
    p.add_argument("--hidden", type=int, default=768, help="hidden width C (default 768)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=256, help="fused variant's tokens per chunk")
    p.add_argument("--weight-grad", action="store_true", help="also differentiate w.r.t. the embedding")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved (naive, fused) subprocess pairs")
    p.add_argument("--iters", type=int, default=2, help="timed steps per worker after the first")
    p.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    results: dict[str, list[dict]] = {"naive": [], "fused": []}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for r in range(args.rounds):
        for variant in ("naive", "fused"):
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--worker", variant], check=True, capture_output=True, text=True
            ).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {variant}: {results[variant][-1]}", file=sys.stderr)
    summary = {
        v: {k: statistics.median(x[k] for x in results[v]) for k in ("peak_mib", "time_s")} for v in results
    }
    n, f = summary["naive"], summary["fused"]
    print(f"N={args.tokens} V={args.vocab} C={args.hidden} T={args.temperature} threads={args.threads} "
          f"chunk={args.chunk_size} weight_grad={args.weight_grad}")
    print(f"naive (2 logit tensors + F.kl_div): peak +{n['peak_mib']:.0f} MiB, {n['time_s']:.3f} s fwd+bwd")
    print(f"fused_kl_loss:                      peak +{f['peak_mib']:.0f} MiB, {f['time_s']:.3f} s fwd+bwd")
    print(f"memory ratio naive/fused: {n['peak_mib'] / max(f['peak_mib'], 1e-9):.1f}x; "
          f"time ratio fused/naive: {f['time_s'] / n['time_s']:.2f}x")


if __name__ == "__main__":
    main()
