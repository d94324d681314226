"""Benchmark (needs a CUDA GPU): one full-size Seal training step in each precision, and the fused KL on the GPU.

1. The step of train.py at real shapes: hubert-base and gpt2 with random weights, a batch of --batch clips of
   --seconds, the projector at rate 4 (50 soft tokens per 4 s clip), o = t = --text-tokens tokens, AdamW on the
   projector with the fused kernel, precision chosen by train.precision_policy and applied by train.autocast
   (fp16 with a GradScaler). Modes, as in bench_step.py: `encoder` runs the frozen encoder and the teacher at
   every step (train.py --cache none); `cached+teacher` starts from cached encoder features and teacher states
   (train.py's default). For each it prints the median step time, clips per second, the peak GPU memory of a
   step above what the models and inputs hold, and the first step's loss, the same batch in every precision.
2. The KL on N target tokens and the gpt2 vocabulary (V = 50257), forward + backward: projector.fused_kl_loss
   (chunks of 512 rows of logits) against materialized logits + F.kl_div, in fp32 and bf16 hidden states.

Times: CUDA-synchronized wall clock, median of --iters steps after --warmup. Memory: torch.cuda.max_memory_allocated
after a reset, minus what was allocated before the step.

    python bench/bench_cuda.py                       # batch 16 and 64, fp32 / bf16 / fp16, both modes
    python bench/bench_cuda.py --batch 32 --precisions bf16 --modes cached+teacher
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_kl import naive_kl  # noqa: E402  (same folder)
from decoder import GPT, GPTConfig  # noqa: E402
from encoder import HuBERT, HuBERTConfig  # noqa: E402
from projector import Projector, ProjectorConfig, fused_kl_loss  # noqa: E402
from seal import Seal, SealConfig  # noqa: E402
from train import autocast, precision_policy  # noqa: E402

SAMPLE_RATE = 16_000
GPT2_VOCAB = 50257


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds of fn() over iters calls after warmup calls, peak MiB of one call above the memory before it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_steps(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)
    encoder, lm = HuBERT(HuBERTConfig.preset("hubert-base")), GPT(GPTConfig.preset("gpt2"))
    print(f"step: hubert-base + gpt2, random weights, {args.seconds:g} s clips, o = t = {args.text_tokens} tokens")
    print(f"{'batch':>5} {'mode':15} {'precision':9} {'ms/step':>8} {'clips/s':>8} {'peak MiB':>9} {'loss':>10}")
    for B in args.batch:
        g = torch.Generator().manual_seed(0)
        wav = (0.1 * torch.randn(B, int(args.seconds * SAMPLE_RATE), generator=g)).to(device)
        texts = torch.randint(0, GPT2_VOCAB, (B, args.text_tokens), generator=g).tolist()
        for mode in args.modes:
            for precision in args.precisions:
                torch.manual_seed(0)  # the same projector in every precision
                projector = Projector(ProjectorConfig(in_dim=768, out_dim=768, rate=4, hidden_dim=2048))
                seal = Seal(encoder, projector, lm, config=SealConfig(projector=projector.config)).to(device)
                seal.sep_ids = [25, 220]  # a 2-token separator
                amp_dtype, use_scaler = precision_policy(device, precision)
                optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-4, fused=True)
                scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
                with torch.no_grad(), autocast(device, amp_dtype):  # what train.fill_caches stores
                    feats, lengths = seal.encode(wav)
                    feats, teacher = feats.float(), seal.teacher_hidden(texts).float()
                losses = []

                def step() -> None:
                    with autocast(device, amp_dtype):
                        if mode == "encoder":
                            loss, _ = seal.loss(*seal.encode(wav), texts)
                        else:
                            loss, _ = seal.loss(feats, lengths, texts, teacher_hidden=teacher)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))

                seconds, peak = timed(step, args.warmup, args.iters)
                print(f"{B:5d} {mode:15} {precision:9} {1000 * seconds:8.1f} {B / seconds:8.1f} {peak:9.0f} "
                      f"{losses[0]:10.5f}", flush=True)
                del seal, projector, optimizer, feats, teacher


def bench_kl(args: argparse.Namespace, device: torch.device) -> None:
    print(f"KL: N = {args.kl_tokens} tokens, V = {GPT2_VOCAB}, C = 768, forward + backward to the student states")
    print(f"{'dtype':8} {'variant':6} {'ms':>8} {'peak MiB':>9}")
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(GPT2_VOCAB, 768, device=device, generator=g) * 0.05
    for dtype in (torch.float32, torch.bfloat16):
        h_s = torch.randn(args.kl_tokens, 768, device=device, generator=g).to(dtype).requires_grad_()
        h_t = torch.randn(args.kl_tokens, 768, device=device, generator=g).to(dtype)
        for name, kl in (("naive", lambda: naive_kl(h_s, h_t, w.to(dtype), 2.0)),
                         ("fused", lambda: fused_kl_loss(h_s, h_t, w.to(dtype), temperature=2.0))):
            def step() -> None:
                kl().backward()
                h_s.grad = None

            seconds, peak = timed(step, args.warmup, args.iters)
            print(f"{str(dtype).removeprefix('torch.'):8} {name:6} {1000 * seconds:8.2f} {peak:9.0f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="clips per step (default 16 64)")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4 s)")
    p.add_argument("--text-tokens", type=int, default=16, help="tokens in t (= o), default 16")
    p.add_argument("--modes", nargs="+", default=["encoder", "cached+teacher"], choices=["encoder", "cached+teacher"],
                   help="encoder: run the encoder and teacher every step; cached+teacher: train.py's default (both)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"],
                   help="train.py --precision values to compare (default all three)")
    p.add_argument("--kl-tokens", type=int, default=4096, help="tokens in the KL benchmark (default 4096)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (default 10)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}")
    bench_steps(args, device)
    bench_kl(args, device)


if __name__ == "__main__":
    main()
