"""Benchmark: how reliably a recipe of the micro world's tiny LM learns in context, over its random draws.

The LM stage (train.py, stage 2) learns in context late and suddenly, and whether it does so within
WorldConfig.lm_steps depends on the random draws (bench/EXPERIMENTS.md, "When in-context learning
appears"). This trains draws 0..N-1 of train.train_lm with the stage's seeds (draw d: WorldConfig.seed +
1,000 d, its own initialization, documents and noise; the tokenizer trained as the stage trains it), in
parallel worker processes. Every draw keeps the recipe as given, so that the recipe is what is measured: the
stage itself trains the draws after its first with less noise (train.LM_FALLBACK_NOISE). It prints each
draw's check as it is measured (train.lm_check: 4-way 5-shot accuracy on text, arbitrary labels, 100 queries
of the valid split, LM_CHECKS times per draw), then a summary: the check at the end of each draw, the first
step at which it reached a few-shot learner's bar (half-way from chance to 100%, train.LM_FEW_SHOT_MIN), and
how many draws end above it. `--set` changes the recipe: any WorldConfig field, e.g. `--set lm_noise=0.75
--set lm_heads=2`.

With --seal, each draw's LM is saved and the chain's Seal projector (its settings and seed, the cache's tiny
HuBERT) is trained on it, then scored as the table scores it (train.seal_cells: the text oracle and Seal at the
table's largest k, arbitrary and natural labels). This measures what the LM recipe does to Seal, over draws,
not only whether the LM learns in context: at the default sizes the projector adds about 2.5 minutes a draw on
the 2-core CPU (on the chain's own LM, its fp32 run gives the chain's table cells exactly: 163 s on two threads,
measured).

It reads the micro world's corpus (stage 1, for the check's utterances; with --seal, the tiny HuBERT too) from
$SEAL_CACHE and writes nothing there: build it first with `python train.py` (or at least its first stage). At
the default sizes, two draws at a time on the 2-core CPU, one thread each, took 16-17 minutes; on an H200 (16
cores), 14 draws at a time took 127-136 s, and with --seal 110-113 s for each LM and 162-171 s for each
projector and its scores, 301 s in all (measured). A GPU trains other draws than the CPU (its random numbers
differ: train.train_lm). There the workers train with torch's deterministic algorithms
(train.make_deterministic), so that a rerun repeats each LM and projector. The sweeps recorded in
bench/EXPERIMENTS.md ran without them, and some of their draws came out otherwise in another session ("Seal
over many LM draws").

    python bench/bench_lm_draws.py --draws 2                          # the chain's recipe, draws 0 and 1
    python bench/bench_lm_draws.py --draws 4 --set lm_noise=0.75      # a variant, two draws at a time
    python bench/bench_lm_draws.py --draws 14 --jobs 14 --device cuda --json draws.json
    python bench/bench_lm_draws.py --ids 6,9,10 --jobs 3 --device cuda --seal --set lm_noise=1.0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import queue as queues
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from decoder import load_tokenizer  # noqa: E402
from seal import Seal  # noqa: E402


def parse_settings(pairs: list[str], config: type = train.WorldConfig, fixed: tuple[str, ...] = ()) -> dict:
    """["lm_noise=0.75", "lm_heads=2"] -> overrides of `config`'s fields (WorldConfig unless given; those in `fixed`
    refused), each value read as its field's type."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(config) if f.name not in fixed}
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in kinds:
            other = f" other than {', '.join(fixed)}" if fixed else ""
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD a {config.__name__} field{other} "
                             f"({', '.join(kinds)})")
        kind = kinds[name]
        try:
            if kind is tuple:
                out[name] = tuple(int(v) for v in value.split(","))
            elif kind is bool:
                out[name] = value.lower() in ("1", "true", "yes")
            else:
                out[name] = kind(value)
        except ValueError:
            raise SystemExit(f"--set {pair!r}: {value!r} is not a valid {kind.__name__}") from None
    return out


def run_draw(job: tuple) -> dict:
    """Worker: one draw of train_lm, its checks sent to the main process as they are measured; with `out` (--seal),
    the draw's LM is saved to out/draw<d>/tiny-lm and the chain's Seal projector is trained and scored on it."""
    cfg, draw, corpus, device, threads, queue, out = job
    torch.set_num_threads(threads)
    # On a GPU, deterministic kernels: a rerun of a draw repeats its LM and projector bit for bit (each worker is
    # a fresh process, so this comes before its first CUDA matmul).
    train.make_deterministic(torch.device(device))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) if out is None else out / f"draw{draw}" / "tiny-lm"
        folder.mkdir(parents=True, exist_ok=True)
        tok = train.world_tokenizer(cfg, folder)
        _, check = train.lm_check(cfg, corpus, tok)
        steps, checks = train.lm_check_steps(cfg), []

        def logged(model) -> float:
            acc = check(model)
            checks.append((steps[len(checks)], acc))
            queue.put((draw, *checks[-1]))
            return acc

        t0 = time.time()
        model, _ = train.train_lm(cfg, tok, logged, draw, device=device, progress=False)
        result = {"draw": draw, "seed": train.lm_draw_seed(cfg, draw), "checks": checks, "seconds": time.time() - t0}
        if out is not None:
            model.cpu().save_pretrained(folder)  # config.json and model.safetensors beside its tokenizer.model
            t0 = time.time()
            result["seal"] = seal_on_lm(cfg, corpus, folder, out / f"draw{draw}" / "seal-fsc", device)
            result["seal_seconds"] = time.time() - t0
            print(f"draw {draw}, Seal: " + ", ".join(f"{key} {acc:.1%}" for key, acc in result["seal"].items())
                  + f" ({result['seal_seconds']:.0f} s)", flush=True)  # as it comes: a run cut short keeps it
    return result


def seal_on_lm(cfg: train.WorldConfig, corpus: Path, lm: Path | str, out: Path, device: str, seed: int | None = None,
               settings: dict | None = None, examples: tuple | None = None, progress: bool = False) -> dict[str, float]:
    """The chain's Seal projector (its settings, the cache's tiny HuBERT) trained on the LM at `lm` (a folder, or
    "tiny-lm") into `out`, in fp32 on `device` (on a GPU with deterministic kernels), then scored as the table
    scores it: train.seal_cells. `seed`: the projector's (cfg.seed unless given); `settings`: TrainConfig changes,
    applied last (bench_seal_variant.py's --set); `examples`: train and held-out examples whose encoder features
    are shared between calls (built here when not given)."""
    tc = dataclasses.replace(train.world_train_config(cfg, corpus, "kl", seed=seed), lm=str(lm), out_dir=str(out),
                             resume=False, device=device, precision="fp32", deterministic=True, progress=progress)
    tc = dataclasses.replace(tc, **(settings or {}))
    if examples is None:
        examples = train.load_data(tc, load_tokenizer(str(lm)))
    train.train(tc, examples=examples)
    seal = Seal.from_pretrained(out / train.PROJECTOR_NAME).eval()
    return train.seal_cells(cfg, corpus, seal, examples[0])


def seal_share(cells: dict[str, float], labels: str) -> float:
    """Seal's accuracy as a share of the text oracle's, from seal_on_lm's cells; `labels`: "arbitrary" or
    "natural". The micro world's target is 80% at the table's largest k."""
    return cells[f"Seal (KL), {labels}"] / cells[f"text oracle, {labels}"]


def summarize(results: list[dict], cfg: train.WorldConfig) -> str:
    """A markdown table, one row per draw, and the count of few-shot learners; with --seal, each draw's text oracle
    and Seal at the table's largest k, and Seal's mean share of the oracle over the few-shot learners."""
    chance = 1 / cfg.lm_check_way
    bar = chance + train.LM_FEW_SHOT_MIN * (1 - chance)
    sealed = all("seal" in r for r in results)
    labels = ("arbitrary", "natural")
    head = "| draw | seed | check at the end | first step at or above the bar | seconds |"
    if sealed:
        head += "".join(f" oracle, {name} | Seal, {name} | Seal / oracle, {name} |" for name in labels)
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in sorted(results, key=lambda r: r["draw"]):
        first = next((s for s, a in r["checks"] if a >= bar), None)
        line = (f"| {r['draw']} | {r['seed']} | {r['checks'][-1][1]:.0%} | "
                f"{'-' if first is None else f'{first:,}'} | {r['seconds']:.0f} |")
        if sealed:
            cells = r["seal"]
            line += "".join(f" {cells[f'text oracle, {name}']:.1%} | {cells[f'Seal (KL), {name}']:.1%} | "
                            f"{seal_share(cells, name):.1%} |" for name in labels)
        lines.append(line)
    learners = [r for r in results if r["checks"][-1][1] >= bar]
    lines.append(f"\nfew-shot learners (check at the end >= {bar:.1%}): {len(learners)} of {len(results)}")
    if sealed and learners:
        k = max(cfg.shots)
        for name in labels:
            ratios = [seal_share(r["seal"], name) for r in learners]
            lines.append(f"Seal / text oracle at k = {k}, {name} labels, over the learners: "
                         f"mean {np.mean(ratios):.1%}, min {min(ratios):.1%}, max {max(ratios):.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, base: train.WorldConfig | None = None) -> list[dict]:
    """`base`: the world whose recipe --set changes (default WorldConfig(); the tests give the toy world)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=2, help="draws 0..N-1 to train (default 2)")
    p.add_argument("--first", type=int, default=0, help="the first draw's index (default 0, the chain's own draw)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a WorldConfig setting, e.g. lm_noise=0.75 (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="draws trained at a time, one process each (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--ids", metavar="D,D,...",
                   help="train these draws instead (e.g. 6,9,10), ignoring --draws and --first")
    p.add_argument("--seal", action="store_true",
                   help="also train the chain's Seal projector on each draw's LM and score it with the text oracle "
                        "(the table's cells at its largest k; needs the cache's tiny HuBERT)")
    p.add_argument("--out", type=Path, help="with --seal: where each draw's LM and projector go, as draw<d>/tiny-lm "
                                            "and draw<d>/seal-fsc (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results (every check of every draw) to this file")
    args = p.parse_args(argv)
    if args.draws < 1 or args.jobs < 1 or args.threads < 1 or args.first < 0:
        raise SystemExit("--draws, --jobs and --threads must be >= 1, --first >= 0")
    if args.out and not args.seal:
        raise SystemExit("--out holds the LMs and projectors of --seal: give --seal too")
    try:
        draws = [int(d) for d in args.ids.split(",")] if args.ids else list(range(args.first, args.first + args.draws))
    except ValueError:
        raise SystemExit(f"--ids {args.ids!r}: expected draw numbers separated by commas, e.g. 6,9,10") from None
    if min(draws) < 0 or len(set(draws)) < len(draws):
        raise SystemExit(f"--ids {args.ids!r}: the draws must be distinct and >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    settings = parse_settings(args.set)
    cfg = dataclasses.replace(base or train.WorldConfig(), **settings)
    corpus = cfg.artifact("corpus")
    if not (corpus / train.STAMP_NAME).is_file():
        raise SystemExit(f"no micro-world corpus at {corpus}: run `python train.py` first (its first stage "
                         f"writes it), or point $SEAL_CACHE at a cache that has one")

    if args.seal and (why := train.stamp_mismatch(cfg.artifact("hubert"), cfg, "hubert")):
        raise SystemExit(f"{cfg.artifact('hubert')}: no finished tiny HuBERT of this world ({why}), which --seal "
                         f"trains the projectors with: run `python train.py` first (or point $SEAL_CACHE at a cache "
                         f"that has one)")
    steps = train.lm_check_steps(cfg)
    with_seal = ", each with a Seal projector" if args.seal else ""
    print(f"{len(draws)} draws of the tiny LM ({cfg.lm_steps:,} steps each){with_seal}, {args.jobs} at a time on "
          f"{args.device}; settings changed: {settings or 'none'}")
    # spawn: CUDA cannot be used in a forked child, and every worker starts from a clean interpreter
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch, ctx.Manager() as manager, ctx.Pool(args.jobs) as pool:
        queue = manager.Queue()
        out = (args.out or Path(scratch)).resolve() if args.seal else None
        jobs = [(cfg, d, corpus, args.device, args.threads, queue, out) for d in draws]
        pending = pool.map_async(run_draw, jobs)
        with tqdm(total=len(draws) * len(steps), desc="checks", unit="check") as bar:
            while not (pending.ready() and queue.empty()):
                try:
                    draw, step, acc = queue.get(timeout=1)
                except queues.Empty:
                    continue
                bar.write(f"draw {draw}, step {step:,}: {acc:.0%}")
                bar.update(1)
        results = pending.get()  # re-raises a worker's exception here
        pool.close()
        pool.join()
    print(summarize(results, cfg))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "device": args.device,
                                         "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
