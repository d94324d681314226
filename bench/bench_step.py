"""Benchmark: one full-size Seal training step, ours vs the same step built from transformers.

Both sides: hubert-base and gpt2 shapes with random weights, a batch of 4 clips of 4 s, the same
projector (rate 4 -> 50 soft tokens per clip), o = t = 16 tokens, separator 2 tokens, AdamW on the
projector only. The step is: encoder (frozen, no grad) -> projector -> student LM on
[speech][sep][o] -> teacher LM on [t][sep][o] (no grad) -> KL on the positions predicting o ->
backward -> optimizer step.

- ours: encoder.HuBERT, decoder.GPT and seal.Seal.loss (fused chunked KL from hidden states,
  logits only where o is predicted);
- reference: transformers' HubertModel and GPT2LMHeadModel (full logits) with F.kl_div.

Modes: `encoder` runs the encoder every step (train.py --cache none); `cached` starts from
precomputed encoder features (both sides). Ours is also measured with `+teacher`, train.py's
default, where the teacher's hidden states at the o positions are cached too (--cache-teacher).

Every measurement runs in a fresh subprocess: peak memory is the peak RSS during the first step
minus the RSS just before it (high-water mark reset via Linux /proc/self/clear_refs; models,
inputs and caches already exist); time is the median of the following steps. The
variants run interleaved, round after round, because other processes share the machine.

    python bench/bench_step.py                   # 3 rounds, 2 timed steps each, 2 threads
    python bench/bench_step.py --rounds 1 --iters 1
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
from bench_kl import report_step  # noqa: E402  (same folder: the memory probe)

SAMPLE_RATE = 16_000
VARIANTS = [("ours", "encoder"), ("reference", "encoder"), ("ours", "encoder+teacher"),
            ("ours", "cached"), ("reference", "cached"), ("ours", "cached+teacher")]


def worker(args: argparse.Namespace) -> None:
    from projector import Projector, ProjectorConfig

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, S = args.batch, int(args.seconds * SAMPLE_RATE)
    wav = 0.1 * torch.randn(B, S)
    text = torch.randint(0, 50256, (B, args.text_tokens))  # t (and o = t)
    sep = torch.randint(0, 50256, (args.sep_tokens,))
    projector = Projector(ProjectorConfig(in_dim=768, out_dim=768, rate=4, hidden_dim=2048))
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    cached = args.mode.startswith("cached")

    if args.impl == "ours":
        from decoder import GPT, GPTConfig
        from encoder import HuBERT, HuBERTConfig
        from seal import Seal, SealConfig

        seal = Seal(HuBERT(HuBERTConfig.preset("hubert-base")), projector, GPT(GPTConfig.preset("gpt2")),
                    config=SealConfig(projector=projector.config))
        seal.sep_ids = sep.tolist()
        texts = text.tolist()
        feats, lengths = seal.encode(wav) if cached else (None, None)
        teacher = seal.teacher_hidden(texts) if args.mode.endswith("+teacher") else None

        def loss_fn() -> torch.Tensor:
            f, n = (feats, lengths) if cached else seal.encode(wav)
            return seal.loss(f, n, texts, teacher_hidden=teacher)[0]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel, HubertConfig, HubertModel

        hubert = HubertModel(HubertConfig()).eval().requires_grad_(False)
        gpt2 = GPT2LMHeadModel(GPT2Config()).eval().requires_grad_(False)
        wte = gpt2.get_input_embeddings()
        n_o = args.text_tokens
        with torch.no_grad():
            feats = hubert(wav).last_hidden_state if cached else None  # (B, T, 768)
        teacher_ids = torch.cat([text, sep.expand(B, -1), text], dim=1)  # [t][sep][o]

        def loss_fn() -> torch.Tensor:
            with torch.no_grad():
                f = feats if cached else hubert(wav).last_hidden_state
                t_logits = gpt2(input_ids=teacher_ids).logits[:, -n_o - 1 : -1]  # (B, n_o, V)
            soft, _ = projector(f)  # (B, T', 768)
            embeds = torch.cat([soft, wte(sep).expand(B, -1, -1), wte(text)], dim=1)  # [speech][sep][o]
            s_logits = gpt2(inputs_embeds=embeds).logits[:, -n_o - 1 : -1]  # (B, n_o, V)
            V = s_logits.shape[-1]
            return F.kl_div(F.log_softmax(s_logits.reshape(-1, V), -1), F.log_softmax(t_logits.reshape(-1, V), -1),
                            log_target=True, reduction="batchmean")

    def step() -> float:
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    report_step(step, args.iters)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="clips per batch (default 4)")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4 s)")
    p.add_argument("--text-tokens", type=int, default=16, help="tokens in t (= o)")
    p.add_argument("--sep-tokens", type=int, default=2, help="tokens in the separator")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants")
    p.add_argument("--iters", type=int, default=2, help="timed steps per worker after the first")
    p.add_argument("--modes", default="encoder,encoder+teacher,cached,cached+teacher",
                   help="comma-separated subset of the modes")
    p.add_argument("--impl", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["encoder", "encoder+teacher", "cached", "cached+teacher"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:
        return worker(args)

    passthrough = list(argv if argv is not None else sys.argv[1:])
    variants = [(impl, mode) for impl, mode in VARIANTS if mode in args.modes.split(",")]
    results: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for impl, mode in variants:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--impl", impl, "--mode", mode],
                                 check=True, capture_output=True, text=True).stdout
            results[(impl, mode)].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {impl} {mode}: {results[(impl, mode)][-1]}", file=sys.stderr)
    med = {v: {k: statistics.median(x[k] for x in results[v]) for k in ("peak_mib", "time_s")} for v in variants}
    print(f"batch {args.batch} x {args.seconds:g} s, o = {args.text_tokens} tokens, threads={args.threads}, "
          f"median of {args.rounds} rounds")
    for impl, mode in variants:
        m = med[(impl, mode)]
        print(f"{impl:9s} {mode:15s} {m['time_s']:7.2f} s/step  peak +{m['peak_mib']:6.0f} MiB")
    for ours_mode, ref_mode in (("encoder", "encoder"), ("encoder+teacher", "encoder"), ("cached", "cached"),
                                ("cached+teacher", "cached")):
        if ("ours", ours_mode) not in med or ("reference", ref_mode) not in med:
            continue
        o, r = med[("ours", ours_mode)], med[("reference", ref_mode)]
        # Ratios within each round (the two ran back to back) are less exposed to load drift.
        per_round = [a["time_s"] / b["time_s"] for a, b in zip(results[("ours", ours_mode)], results[("reference", ref_mode)])]
        print(f"ours {ours_mode} vs reference {ref_mode}: time {o['time_s'] / r['time_s']:.2f}x "
              f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}), peak memory {o['peak_mib'] / r['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
