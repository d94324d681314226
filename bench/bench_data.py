"""Benchmarks for data.py: speech rendering, loader throughput, resampler speed.

    python bench/bench_data.py                     # full size: 2,000 utterances
    python bench/bench_data.py --n 200 --quick     # a smoke run

Bars (issue 4): rendering 2,000 utterances < 1 minute; loaders >= 500 utterances/s from disk;
the resampler's speed against a naive full-length FFT resample.
"""

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402


def fft_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """The naive reference: FFT the whole signal, cut or zero-pad the spectrum, inverse FFT."""
    n_out = math.ceil(x.shape[-1] * new / orig)
    spec = torch.fft.rfft(x)
    keep = min(spec.shape[-1], n_out // 2 + 1)
    out = torch.zeros(*spec.shape[:-1], n_out // 2 + 1, dtype=spec.dtype)
    out[..., :keep] = spec[..., :keep]
    return torch.fft.irfft(out, n=n_out) * (n_out / x.shape[-1])


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the render workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_render_and_load(n: int, seed: int, parallel: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        counts = {"train": n - 2 * (n // 10), "valid": n // 10, "test": n // 10}
        voices = data.split_voices(24, 6, 6, seed=seed)
        t, cpu = time.perf_counter(), cpu_seconds()
        plan_jobs = data.write_fsc(tmp, counts, voices, seed=seed, cache_dir=None, progress=True,
                                   parallel=parallel)
        render_s, render_cpu = time.perf_counter() - t, cpu_seconds() - cpu
        print(f"render + write {n} FSC-style utterances (no cache): {render_s:.1f} s wall "
              f"({n / render_s:.0f} utt/s), {render_cpu:.1f} CPU-s (this process + render workers)")
        root = Path(plan_jobs)
        ds = data.FluentSpeechCommands(root, "train")
        total_audio = 0.0
        t = time.perf_counter()
        for i in range(len(ds)):
            total_audio += len(ds[i]["wav"]) / data.SAMPLE_RATE
        load_s = time.perf_counter() - t
        print(f"FluentSpeechCommands: {len(ds)} items ({total_audio / len(ds):.2f} s each) in {load_s:.2f} s "
              f"= {len(ds) / load_s:.0f} utt/s")
        t = time.perf_counter()
        lengths = ds.lengths()
        print(f"lengths() from headers: {len(lengths) / (time.perf_counter() - t):.0f} files/s")
        cached = data.FluentSpeechCommands(root, "train", cache_dir=Path(tmp) / "decoded")
        for i in range(len(cached)):   # fill the decoded-audio cache
            cached[i]
        t = time.perf_counter()
        for i in range(len(cached)):
            cached[i]
        print(f"FluentSpeechCommands with decoded cache (2nd pass): {len(cached) / (time.perf_counter() - t):.0f} utt/s")
        m = min(300, counts["train"])
        slurp_root = data.write_slurp(tmp, {"train": m // 2}, {"train": voices["train"]}, seed=seed,
                                      recordings=2, progress=True)
        sl = data.Slurp(slurp_root, "train")
        t = time.perf_counter()
        for i in range(len(sl)):
            sl[i]
        print(f"Slurp (FLAC): {len(sl)} recordings = {len(sl) / (time.perf_counter() - t):.0f} utt/s")


def bench_resample(seconds: float, repeats: int) -> None:
    print(f"\nresample {seconds:g} s of noise to 16 kHz (median of {repeats}), float32, 1 thread:")
    print(f"{'rate':>8} {'polyphase ms':>13} {'FFT ms':>8} {'max |diff| in band':>20}")
    for orig in (8000, 22050, 44100, 48000):
        x = torch.randn(int(orig * seconds))
        ours = timed(lambda: data.resample(x, orig, 16000), repeats)
        naive = timed(lambda: fft_resample(x, orig, 16000), repeats)
        # compare on a band-limited signal, where both should agree away from the edges
        t = torch.arange(int(orig * seconds), dtype=torch.float64) / orig
        tone = torch.sin(2 * math.pi * 1234.5 * t)
        a, b = data.resample(tone, orig, 16000), fft_resample(tone, orig, 16000)
        diff = (a - b)[2000:-2000].abs().max().item()
        print(f"{orig:>8} {ours * 1e3:>13.2f} {naive * 1e3:>8.2f} {diff:>20.2e}")
    # FFT length matters for the naive method: a prime length is its worst case
    orig, n = 22050, 220_501
    x = torch.randn(n)
    print(f"prime length {n} at {orig} Hz: polyphase {timed(lambda: data.resample(x, orig, 16000), repeats) * 1e3:.2f} ms, "
          f"FFT {timed(lambda: fft_resample(x, orig, 16000), repeats) * 1e3:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="utterances to render and load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=None, help="concurrent espeak renders (default: CPU count)")
    p.add_argument("--seconds", type=float, default=10.0, help="signal length for the resampler benchmark")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="resampler only on short signals, fewer repeats")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work slows everything)")
    bench_render_and_load(args.n, args.seed, args.parallel)
    bench_resample(2.0 if args.quick else args.seconds, 2 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
