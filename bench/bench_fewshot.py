"""Benchmark: the KV-cached batched label scorer (fewshot.rank_scores) vs the naive scorer
(fewshot.rank_scores_naive: one full forward per (query, label)), on FSC-style 31-label prompts.

Both scorers run the same few-shot evaluation (FewShot.run: k random demonstrations from the train
split, speech soft tokens in the input slots, every one of the 31 FSC labels ranked) and must give
identical predictions. Time: queries per second of the whole run (prompt building included, the
frozen encoder excluded: every utterance's soft tokens are computed once before timing, as a real
evaluation caches them too). The two scorers run interleaved, round after round, so that load from
other processes hits both alike; the median round is reported, as wall-clock queries/s and as the
ratio of CPU time per query (steadier when other processes share the cores).

Models: random weights at the size of the micro world's LM (4 layers, 128 wide, 4 heads, a small
sentencepiece unigram vocabulary trained here on the FSC-style grammar of data.py: labels of 5-16
tokens) or of GPT-2 small (12 x 768, vocabulary 50,257; a word-level sentencepiece model gives
labels of 3-4 tokens, as GPT-2's BPE would). Speech: a random
hubert-tiny and projector (rate 4: 12.5 soft tokens per second) on noise of a spoken command's length.

    python bench/bench_fewshot.py                           # micro size, k=5, 32 queries
    python bench/bench_fewshot.py --size gpt2 --queries 4 --naive-queries 2 --batch-size 1
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from decoder import GPT, GPTConfig, SentencePieceTokenizer  # noqa: E402
from encoder import HuBERT, HuBERTConfig  # noqa: E402
from fewshot import FewShot, RunConfig, Split, label_text, rank_scores, rank_scores_naive  # noqa: E402
from projector import Projector, ProjectorConfig  # noqa: E402
from seal import Seal, SealConfig  # noqa: E402

SECONDS_PER_CHAR = 0.065  # a synthetic clip's length per transcript character (~15 chars/s, FSC-like)
SIZES = {
    "micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=512),  # the micro world's LM (REFERENCE.md)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),  # GPT-2 small
}


def sentencepiece_tokenizer(lines: list[str], directory: Path, model_type: str) -> SentencePieceTokenizer:
    """unigram: a 320-piece vocabulary like the micro world's (labels of 5-16 tokens); word: whole
    words, so that a label is 3-4 tokens as with GPT-2's BPE (" activate", " lights", " kitchen", "\n")."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
                                   model_type=model_type, character_coverage=1.0, user_defined_symbols=["\n"],
                                   minloglevel=2, hard_vocab_limit=False)
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def build(args: argparse.Namespace, tmp: Path) -> tuple[FewShot, list[int]]:
    grammar = data.fsc_grammar()
    train_pairs = list(data.iter_commands(grammar, seed=0, n=args.train))
    test_pairs = list(data.iter_commands(grammar, seed=1, n=args.queries))
    tok = sentencepiece_tokenizer([f"{t} => {label_text('fsc', y)}" for t, y in train_pairs], tmp,
                                  args.tokenizer or ("unigram" if args.size == "micro" else "word"))
    torch.manual_seed(0)
    lm = GPT(GPTConfig(**{"vocab_size": tok.vocab_size, **SIZES[args.size]})).eval()
    encoder = HuBERT(HuBERTConfig.preset("hubert-tiny")).eval()
    projector = Projector(ProjectorConfig(in_dim=encoder.config.n_embd, out_dim=lm.config.n_embd, rate=4,
                                          hidden_dim=256))
    seal = Seal(encoder, projector, lm, tok, SealConfig(encoder="hubert-tiny", lm=args.size, projector=projector.config))

    def split(pairs, name, seed):
        g = torch.Generator().manual_seed(seed)
        wavs = [0.1 * torch.randn(int(16000 * SECONDS_PER_CHAR * len(t)), generator=g) for t, _ in pairs]
        return Split([t for t, _ in pairs], [label_text("fsc", y) for _, y in pairs], lambda i: wavs[i], name)

    fewshot = FewShot(lm, tok, split(train_pairs, "train", 0), split(test_pairs, "test", 1), seal=seal.eval())
    return fewshot, list(range(args.queries))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="micro", help="LM size (random weights)")
    p.add_argument("--tokenizer", choices=("unigram", "word"),
                   help="sentencepiece model type (default: unigram for micro, word for gpt2)")
    p.add_argument("--k", type=int, default=5, help="demonstrations per prompt")
    p.add_argument("--mode", choices=("speech", "text"), default="speech", help="input slot content")
    p.add_argument("--queries", type=int, default=32, help="test queries for the cached scorer")
    p.add_argument("--naive-queries", type=int, default=8, help="the first N of them also go through the naive scorer")
    p.add_argument("--train", type=int, default=400, help="train utterances (demo pool)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward (cached scorer)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not 0 < args.naive_queries <= args.queries:
        p.error("--naive-queries must be in 1..--queries")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        fewshot, queries = build(args, Path(tmp))
    config = RunConfig(k=args.k, mode=args.mode, select="random", batch_size=args.batch_size)
    naive_config = RunConfig(k=args.k, mode=args.mode, select="random", batch_size=1)
    t0 = time.perf_counter()
    fewshot.run(config, seed=0, queries=queries)  # warm-up: encodes every utterance's speech once
    warmup = time.perf_counter() - t0

    def timed(*run_args, **run_kwargs) -> tuple[dict, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fewshot.run(*run_args, **run_kwargs)
        return result, time.perf_counter() - wall, time.process_time() - cpu

    fast_t, slow_t, fast_cpu, slow_cpu = [], [], [], []
    for _ in range(args.rounds):
        slow, wall, cpu = timed(naive_config, seed=0, queries=queries[: args.naive_queries], scorer=rank_scores_naive)
        slow_t.append(wall)
        slow_cpu.append(cpu)
        fast, wall, cpu = timed(config, seed=0, queries=queries, scorer=rank_scores)
        fast_t.append(wall)
        fast_cpu.append(cpu)
    identical = fast["predictions"][: args.naive_queries] == slow["predictions"]
    fast_qps = args.queries / statistics.median(fast_t)
    slow_qps = args.naive_queries / statistics.median(slow_t)
    # On a shared machine the wall clock also counts other processes; CPU time counts only ours.
    cpu_speedup = (statistics.median(slow_cpu) / args.naive_queries) / (statistics.median(fast_cpu) / args.queries)
    lengths = [sum(len(s) for s in fewshot.segments(d, fewshot._input(fewshot.test, q, args.mode, True), args.mode))
               for q, d in zip(queries, fast["demos"])]
    result = dict(
        size=args.size, n_params=sum(p.numel() for p in fewshot.lm.parameters()), k=args.k, mode=args.mode,
        labels=len(fewshot.labels), label_tokens=[min(map(len, fewshot.candidates)), max(map(len, fewshot.candidates))],
        prompt_positions=[min(lengths), round(statistics.mean(lengths)), max(lengths)],
        threads=args.threads, batch_size=args.batch_size, cached_qps=round(fast_qps, 3), naive_qps=round(slow_qps, 3),
        speedup=round(fast_qps / slow_qps, 1), cpu_speedup=round(cpu_speedup, 1), identical_predictions=identical,
        warmup_s=round(warmup, 1), trie_nodes=len(fewshot.trie.tokens),
        rounds=dict(cached_s=[round(t, 3) for t in fast_t], naive_s=[round(t, 3) for t in slow_t],
                    cached_cpu_s=[round(t, 3) for t in fast_cpu], naive_cpu_s=[round(t, 3) for t in slow_cpu]),
    )
    print(json.dumps(result, indent=1))
    print(f"{args.size} LM, FSC {result['labels']} labels, k={args.k} ({args.mode}): cached {fast_qps:.2f} queries/s, "
          f"naive {slow_qps:.2f} queries/s -> {fast_qps / slow_qps:.1f}x (CPU time: {cpu_speedup:.1f}x), "
          f"predictions identical: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not identical:
        sys.exit("error: the cached and naive scorers disagree")


if __name__ == "__main__":
    main()
