"""Benchmark: the micro world's Seal projector trained with other settings, over several projector seeds.

bench_projector_seeds.py changes WorldConfig's projector fields and redoes the whole table, both projectors
included (about 5 minutes a seed). This one changes any train.TrainConfig field of the chain's KL projector
(temperature, weight_decay, lr, max_steps, ...), trains that projector alone for each seed on the chain's
cached corpus, tiny LM and tiny HuBERT, and scores only what a comparison with the chain needs: Seal and the
text oracle at the table's largest k, arbitrary and natural labels, on the table's episodes
(train.seal_cells: the table's seeds and queries). About 2.5 minutes a seed on the 2-core CPU
(430-443 s for three, measured). Nothing is reused between runs: each seed trains afresh into --out (default:
a temporary folder).

With no --set, seed S trains exactly what bench_projector_seeds.py's seed S does: seed 0 is the chain's own
projector, bit for bit, with its table figures. Training is in fp32 on --device; on a GPU with deterministic
kernels (train.make_deterministic), so that a rerun repeats, but a GPU rounds otherwise than the CPU and gives
other figures for the same seed (seed 0 of the chain's recipe on an H200: 71.2% against the CPU's 70.3%).
With --jobs N, N seeds train at a time, each in a process of its own that computes the encoder's features
itself (with --jobs 1 the seeds share them). On an H200 (16 cores), --seeds 12 --jobs 6 --threads 2 --device
cuda trained and scored twelve seeds of an 8,000-clip world in 256 s, and --seeds 4 --jobs 2 beside it gave the
chain's world exactly the figures of the scratch script this path was written from (measured).

The cache's stages must be this world's: a corpus rendered again on another machine differs in its last bits
(an H200 machine with torch 2.11: measured), so a tiny HuBERT carried from the first machine is refused there,
with the digests that differ.

    python bench/bench_seal_variant.py --set temperature=3 --seeds 3
    python bench/bench_seal_variant.py --set weight_decay=0.1 --seeds 3 --json wd.json
    python bench/bench_seal_variant.py --seeds 12 --jobs 6 --threads 2 --device cuda --json gpu.json
    python -c "import sys, train; from bench.bench_seal_variant import main; \
               main(sys.argv[1:], base=train.WorldConfig(n_train=8000))" --seeds 3   # another world's cache
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from bench.bench_lm_draws import parse_settings, seal_on_lm, seal_share  # noqa: E402

# TrainConfig fields that name the models, the data, the loss or the run rather than how the projector learns
FIXED = ("encoder", "lm", "data", "eval_data", "loss", "out_dir", "resume", "seed")


def train_and_score(job: tuple) -> tuple[int, dict]:
    """One projector seed of the variant: trained into `run`, then scored by train.seal_cells. In the main process
    (--jobs 1) `examples` carries the features that the seeds share; a worker process gets None, builds its own,
    runs on `threads` torch threads and shows no progress bars (those of several workers would interleave)."""
    cfg, seed, settings, run, device, threads, examples = job
    corpus = cfg.artifact("corpus")
    in_process = examples is not None
    if not in_process:
        torch.set_num_threads(threads)
        examples = train.world_examples(cfg, corpus)
    print(f"projector seed {seed}: training into {run}" + (f" with {settings}" if settings else ""), flush=True)
    # the settings go last: --set precision=bf16 wins over the fp32 there
    figures = seal_on_lm(cfg, corpus, "tiny-lm", run, device, seed, settings, examples, progress=in_process)
    print(f"projector seed {seed}: " + ", ".join(f"{key} {acc:.1%}" for key, acc in figures.items()), flush=True)
    return seed, figures


def main(argv: list[str] | None = None, base: train.WorldConfig | None = None) -> dict[int, dict]:
    """`base`: the world (default WorldConfig(); the tests give the toy world). Returns {seed: figures}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="projector seeds seed .. seed + N - 1 (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TrainConfig setting of the KL projector, e.g. temperature=3 (repeatable)")
    p.add_argument("--out", type=Path, help="folder for the seeds' projectors (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write every seed's figures to this file")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at a time, one process each (default 1: in this "
                                                       "process, one after the other)")
    p.add_argument("--threads", type=int, default=1, help="with --jobs > 1: torch threads per process (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--seeds, --jobs and --threads must be >= 1, got {args.seeds}, {args.jobs}, {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    settings = parse_settings(args.set, train.TrainConfig, FIXED)
    cfg = base or train.WorldConfig()
    for stage in ("corpus", "lm", "hubert"):
        if why := train.stamp_mismatch(cfg.artifact(stage), cfg, stage):
            raise SystemExit(f"{cfg.artifact(stage)}: no finished {stage} stage of this world ({why}); run `python "
                             f"train.py` first (or point $SEAL_CACHE at a cache that has one)")
    seeds = range(cfg.seed, cfg.seed + args.seeds)
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.out or Path(scratch)).resolve()
        if args.jobs == 1:  # the first seed computes the features, the others reuse them
            examples = train.world_examples(cfg, cfg.artifact("corpus"))
            done = [train_and_score((cfg, s, settings, out / f"seed{s}", args.device, None, examples)) for s in seeds]
        else:  # spawn: CUDA cannot be used in a forked child, and every worker starts from a clean interpreter
            with mp.get_context("spawn").Pool(args.jobs) as pool:
                done = pool.map(train_and_score, [(cfg, s, settings, out / f"seed{s}", args.device, args.threads, None)
                                                  for s in seeds])
    results = dict(done)
    lines = [f"{cfg.n_way}-way {max(cfg.shots)}-shot, test split; Seal (KL) trained with "
             f"{settings or 'the chain settings'}, projector seeds {', '.join(map(str, results))}:"]
    for name in ("arbitrary", "natural"):
        seal = [r[f"Seal (KL), {name}"] for r in results.values()]
        ratios = [seal_share(r, name) for r in results.values()]
        lines.append(f"  {name} labels: Seal " + ", ".join(f"{a:.1%}" for a in seal) + f" (mean {np.mean(seal):.1%}); "
                     "Seal / text oracle " + ", ".join(f"{x:.1%}" for x in ratios) + f" (mean {np.mean(ratios):.1%})")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "device": args.device, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
