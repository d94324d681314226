"""
Benchmark encoder.py's HuBERT against transformers' HubertModel on this machine (CPU, fp32).

speed:  one utterance of --seconds (default 10 s), both models with the same random weights, same thread
        count, under torch.inference_mode. After a warm-up call each, the two models run interleaved
        (ours, theirs, ours, theirs, ...) so that load from other processes hits both alike; the median and
        the minimum of --runs calls are reported.
memory: peak resident memory of one forward on a batch (default 8 x 4 s). Each measurement runs in a fresh
        subprocess: it builds the model and the input, resets the resident-memory high-water mark (Linux
        /proc/self/clear_refs) and notes the current RSS, runs one forward, and reads the high-water mark
        (VmHWM). The difference is the extra memory the forward needed at its peak (activations and
        temporaries); the baseline (interpreter, torch, weights, input) is reported too. torch's CPU
        allocator hands large blocks back to the OS when they are freed, so RSS follows the live tensors.

    python bench/bench_encoder.py                      # both, hubert-base
    python bench/bench_encoder.py --what speed --threads 2 --runs 7
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_kl import peak_since_mib, start_peak_window  # noqa: E402  (same folder: the memory probe)
from encoder import SAMPLE_RATE, HuBERT, HuBERTConfig  # noqa: E402


def build(config_name: str, attn: str) -> tuple[HuBERT, torch.nn.Module]:
    """Our model and transformers' at the same config, with the same (random) weights."""
    from transformers import HubertConfig, HubertModel

    config = HuBERTConfig.preset(config_name)
    theirs = HubertModel(HubertConfig(**config.to_hf(), attn_implementation=attn)).eval()
    ours = HuBERT(config).eval()
    ours.load_hf_state_dict(theirs.state_dict())
    return ours, theirs


def run(model: torch.nn.Module, wav: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if isinstance(model, HuBERT):
        return model(wav, lengths)[0]
    mask = None if lengths is None else (torch.arange(wav.size(1)) < lengths[:, None]).long()
    return model(wav, attention_mask=mask).last_hidden_state


def bench_speed(args) -> None:
    torch.manual_seed(0)
    ours, theirs = build(args.config, args.attn)
    wav = 0.1 * torch.randn(1, int(args.seconds * SAMPLE_RATE))
    times = {"ours": [], "theirs": []}
    with torch.inference_mode():
        diff = (run(ours, wav, None) - run(theirs, wav, None)).abs().max().item()  # also the warm-up
        for _ in range(args.runs):
            for name, model in (("ours", ours), ("theirs", theirs)):
                start = time.perf_counter()
                run(model, wav, None)
                times[name].append(time.perf_counter() - start)
    print(f"speed: {args.config}, 1 x {args.seconds:g} s, {torch.get_num_threads()} threads, fp32, "
          f"transformers attn={args.attn}, {args.runs} interleaved runs (max abs diff {diff:.2e})")
    for name, t in times.items():
        print(f"  {name:7s} median {statistics.median(t) * 1000:7.0f} ms   min {min(t) * 1000:7.0f} ms")
    ratio = statistics.median(times["ours"]) / statistics.median(times["theirs"])
    print(f"  ours / theirs (median) = {ratio:.3f}")


def memory_worker(args) -> None:
    """Runs in a fresh process: prints a JSON line with the resident memory before and at the peak of one forward.
    Only the measured model is built (its weights do not matter for memory)."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HuBERTConfig.preset(args.config)
    if args.impl == "ours":
        model = HuBERT(config).eval()
    else:
        model = HubertModel(HubertConfig(**config.to_hf(), attn_implementation=args.attn)).eval()
    wav = 0.1 * torch.randn(args.batch, int(args.seconds * SAMPLE_RATE))
    lengths = torch.full((args.batch,), wav.size(1))
    lengths[1::2] -= SAMPLE_RATE // 2  # half the rows 0.5 s shorter: a realistic padded batch
    gc.collect()
    before = start_peak_window()
    with torch.inference_mode():
        run(model, wav, lengths)
    print(json.dumps({"before_mib": before, "forward_mib": peak_since_mib(before)}))


def bench_memory(args) -> None:
    print(f"memory: {args.config}, batch {args.batch} x {args.seconds:g} s (odd rows 0.5 s shorter), fp32, "
          f"peak RSS in fresh processes")
    for impl in ("ours", "theirs"):
        cmd = [sys.executable, __file__, "--worker", "memory", "--impl", impl, "--config", args.config,
               "--batch", str(args.batch), "--seconds", str(args.seconds), "--threads", str(args.threads),
               "--attn", args.attn]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"  {impl:7s} baseline {result['before_mib']:5.0f} MiB   peak {result['before_mib'] + result['forward_mib']:5.0f}"
              f" MiB   the forward's own peak: {result['forward_mib']:4.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["speed", "memory", "all"], default="all")
    parser.add_argument("--config", default="hubert-base", help="HuBERTConfig preset (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="input length in seconds (default: 10 for speed, 4 for memory)")
    parser.add_argument("--batch", type=int, default=8, help="memory: batch size (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="speed: timed calls per model (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, the same for both models (default: %(default)s)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers' attention implementation (default: %(default)s, its own default)")
    parser.add_argument("--worker", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        args.seconds = args.seconds or 4.0
        return memory_worker(args)
    if args.what in ("speed", "all"):
        bench_speed(argparse.Namespace(**{**vars(args), "seconds": args.seconds or 10.0}))
    if args.what in ("memory", "all"):
        bench_memory(argparse.Namespace(**{**vars(args), "seconds": args.seconds or 4.0}))


if __name__ == "__main__":
    main()
