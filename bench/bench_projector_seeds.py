"""Benchmark: how much the micro world's few-shot table moves with the projectors' training seed.

`python train.py` trains its two projectors once (their seed is WorldConfig.seed), and the ± of its table is
over evaluation seeds only: other episodes and queries for the same models. Training the projector again with
another seed (another initialization and batch order) moves Seal's figures by several points, as much as
anything tried on the recipe (bench/EXPERIMENTS.md). This trains both projectors, Seal (KL) and PSRT (CE),
with seeds seed .. seed + N - 1 on the chain's cached corpus, tiny LM and tiny HuBERT (unchanged), scores each
pair with the chain's own table (train.world_table: the same episodes for every seed), and prints the table
with mean ± std over the training seeds, then each seed's Seal / text-oracle ratio at the largest k.

The chain's own seed is not trained again: its projectors are linked from the cache when their settings
match. Each other seed takes about as long as the chain's projectors and table (about 5 minutes at the
default sizes on the 2-core CPU; 4:51-5:17 measured). Results go to $SEAL_CACHE/micro-world/projector-seeds/seed<S>/
(projectors and table.json), a finished seed is reused on a rerun, and the chain's own folders are never written
(`python fewshot.py` without --ckpt still evaluates the chain's Seal projector, not the newest seed's).

    python bench/bench_projector_seeds.py                      # seeds 0, 1, 2 of the chain's recipe
    python bench/bench_projector_seeds.py --seeds 5 --json seeds.json
    python bench/bench_projector_seeds.py --set seal_steps=1600 --out /tmp/steps1600   # a variant
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from bench.bench_lm_draws import parse_settings  # noqa: E402

# WorldConfig fields this benchmark may change: the projectors' stamp group (train.STAMP_GROUPS) and the
# table's. The corpus, LM and encoder settings are refused: the chain would rebuild those stages, in place.
PROJECTOR_FIELDS = train.STAMP_GROUPS["projector"] + train.STAMP_GROUPS["table"]


def link_chain_projectors(cfg: train.WorldConfig, folder: Path) -> bool:
    """Link the chain's finished projectors into `folder` if they were trained with cfg's settings."""
    chain = cfg.world_dir
    for name in train.PROJECTOR_FOLDERS.values():
        link = folder / name
        if link.is_symlink():  # an earlier run's link, perhaps to projectors of other settings
            link.unlink()
    usable = all(train.stamp_matches(chain / name, cfg, "projector") and (chain / name / train.PROJECTOR_NAME).is_file()
                 for name in train.PROJECTOR_FOLDERS.values())
    if usable:
        folder.mkdir(parents=True, exist_ok=True)
        for name in train.PROJECTOR_FOLDERS.values():
            if not (folder / name).exists():
                (folder / name).symlink_to((chain / name).resolve(), target_is_directory=True)
    return usable


def aggregate(tables: dict[int, dict]) -> dict:
    """Per (labels, row, k): the accuracy of each training seed (its mean over evaluation seeds), and their
    mean and std over the training seeds."""
    cells: dict[tuple, dict[int, float]] = {}
    for seed, table in tables.items():
        for r in table["results"]:
            cells.setdefault((r["labels"], r["row"], r["k"]), {})[seed] = r["accuracy"]
    return {key: dict(by_seed=by_seed, accuracy=float(np.mean(list(by_seed.values()))),
                      std=float(np.std(list(by_seed.values())))) for key, by_seed in cells.items()}


def summarize(tables: dict[int, dict], shots: list[int]) -> str:
    """The table (mean ± std over training seeds) and each seed's Seal / text-oracle ratio at max(shots)."""
    first = next(iter(tables.values()))
    cells = aggregate(tables)
    table = dict(n_way=first["n_way"], chance=first["chance"], queries=first["queries"], seeds=first["seeds"],
                 results=[dict(labels=l, row=r, k=k, **{n: c[n] for n in ("accuracy", "std")})
                          for (l, r, k), c in cells.items()])
    rows = train.format_table(table, shots).split("\n")[1:]  # its first line names evaluation seeds only
    lines = [f"{first['n_way']}-way k-shot intent accuracy, synthetic FSC-style test split (unseen voices); mean ± std "
             f"over {len(tables)} projector training seeds ({', '.join(map(str, tables))}), each the mean of "
             f"{first['seeds']} evaluation seeds x {first['queries']} queries; chance {first['chance']:.0%}", *rows, ""]
    k = max(shots)
    for labels in ("natural", "arbitrary"):
        oracle, seal = cells[(labels, "text oracle", k)], cells[(labels, "Seal (KL)", k)]
        ratios = [seal["by_seed"][s] / oracle["by_seed"][s] for s in tables]
        lines.append(f"Seal / text oracle at k = {k}, {labels} labels: "
                     + ", ".join(f"{x:.1%}" for x in ratios) + f" (mean {np.mean(ratios):.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, base: train.WorldConfig | None = None) -> dict[int, dict]:
    """`base`: the world's settings before --set (default WorldConfig(); the tests give the toy world's)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="projector seeds seed .. seed + N - 1 (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a WorldConfig setting of the projectors or the table, e.g. seal_steps=1600 (repeatable; "
                        "the corpus, LM and encoder stay the cache's)")
    p.add_argument("--out", type=Path, help="folder for the seeds' projectors and tables "
                                            "(default $SEAL_CACHE/micro-world/projector-seeds)")
    p.add_argument("--json", type=Path, help="also write every seed's table and the aggregate to this file")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    settings = parse_settings(args.set)
    refused = [name for name in settings if not name.startswith(PROJECTOR_FIELDS)]
    if refused:
        raise SystemExit(f"--set {', '.join(refused)}: this benchmark only changes the projectors' and the table's "
                         f"settings ({', '.join(f + '*' if f.endswith('_') else f for f in PROJECTOR_FIELDS)}); "
                         f"for the corpus, LM or encoder, build that world with `python train.py` first")
    cfg = dataclasses.replace(base or train.WorldConfig(), **settings)
    out = args.out or cfg.world_dir / "projector-seeds"

    # the chain's first stages, built if missing (as `python train.py` would), and the features of the train
    # split, computed once for every projector and table
    corpus = train.world_corpus(cfg)
    train.world_lm(cfg, corpus)
    train.world_hubert(cfg, corpus)
    examples = train.world_examples(cfg, corpus)
    tables = {}
    for seed in range(cfg.seed, cfg.seed + args.seeds):
        folder = out / f"seed{seed}"
        reused = seed == cfg.seed and link_chain_projectors(cfg, folder)
        print(f"projector seed {seed}: " + ("the chain's projectors" if reused else f"training into {folder}"))
        for loss in train.PROJECTOR_FOLDERS:
            train.world_projector(cfg, corpus, loss, examples, folder=folder, seed=seed)
        tables[seed] = train.world_table(cfg, corpus, examples[0], folder=folder, seed=seed)
    print(summarize(tables, list(cfg.shots)))
    if args.json:
        cells = [dict(labels=l, row=r, k=k, **c) for (l, r, k), c in aggregate(tables).items()]
        args.json.write_text(json.dumps({"settings": settings, "tables": tables, "aggregate": cells}, indent=1))
    return tables


if __name__ == "__main__":
    main()
