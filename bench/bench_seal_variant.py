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
projector, bit for bit, with its table figures.

    python bench/bench_seal_variant.py --set temperature=3 --seeds 3
    python bench/bench_seal_variant.py --set weight_decay=0.1 --seeds 3 --json wd.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from bench.bench_lm_draws import parse_settings  # noqa: E402
from seal import Seal  # noqa: E402

# TrainConfig fields that name the models, the data, the loss or the run rather than how the projector learns
FIXED = ("encoder", "lm", "data", "eval_data", "loss", "out_dir", "resume", "seed")


def main(argv: list[str] | None = None, base: train.WorldConfig | None = None) -> dict[int, dict]:
    """`base`: the world (default WorldConfig(); the tests give the toy world). Returns {seed: figures}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="projector seeds seed .. seed + N - 1 (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TrainConfig setting of the KL projector, e.g. temperature=3 (repeatable)")
    p.add_argument("--out", type=Path, help="folder for the seeds' projectors (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write every seed's figures to this file")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    settings = parse_settings(args.set, train.TrainConfig, FIXED)
    cfg = base or train.WorldConfig()
    for stage in ("corpus", "lm", "hubert"):
        if not train.stamp_matches(cfg.artifact(stage), cfg, stage):
            raise SystemExit(f"{cfg.artifact(stage)}: no finished {stage} stage of this world; run `python train.py` "
                             f"first (or point $SEAL_CACHE at a cache that has one)")
    corpus = cfg.artifact("corpus")
    examples = train.world_examples(cfg, corpus)  # the first seed computes the features, the others reuse them
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        for seed in range(cfg.seed, cfg.seed + args.seeds):
            run = out / f"seed{seed}"
            tc = dataclasses.replace(train.world_train_config(cfg, corpus, "kl", seed=seed), out_dir=str(run),
                                     resume=False, **settings)
            print(f"projector seed {seed}: training into {run}" + (f" with {settings}" if settings else ""))
            train.train(tc, examples=examples)
            seal = Seal.from_pretrained(run / train.PROJECTOR_NAME).eval()
            figures = train.seal_cells(cfg, corpus, seal, examples[0])
            results[seed] = figures
            print(f"projector seed {seed}: " + ", ".join(f"{key} {acc:.1%}" for key, acc in figures.items()))
    lines = [f"{cfg.n_way}-way {max(cfg.shots)}-shot, test split; Seal (KL) trained with "
             f"{settings or 'the chain settings'}, projector seeds {', '.join(map(str, results))}:"]
    for name in ("arbitrary", "natural"):
        seal = [r[f"Seal (KL), {name}"] for r in results.values()]
        ratios = [r[f"Seal (KL), {name}"] / r[f"text oracle, {name}"] for r in results.values()]
        lines.append(f"  {name} labels: Seal " + ", ".join(f"{a:.1%}" for a in seal) + f" (mean {np.mean(seal):.1%}); "
                     "Seal / text oracle " + ", ".join(f"{x:.1%}" for x in ratios) + f" (mean {np.mean(ratios):.1%})")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
