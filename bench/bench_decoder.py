"""
Benchmark decoder.py on this machine (CPU, fp32).

load:      time of `GPT.from_pretrained(dir)` on a full-size gpt2 checkpoint (124M parameters) written
           exactly like the hub file (bare keys, h.N.attn.bias buffers, no lm_head; ~548 MB safetensors)
           into a temporary directory, which is deleted afterwards. The file is read once first, so the
           runs measure warm-page-cache loading (parsing, copying, transposing, building the model),
           not the disk. Reported: median and minimum of --runs loads.
tokenizer: encode speed on the same text (--text-kb of Python standard-library source and docstrings:
           English prose, code, numbers, whitespace runs) with a byte-level BPE of --vocab-size tokens
           trained on that text by `tokenizers`. Compared: ours with a cold cache (a fresh tokenizer),
           ours with a warm cache (the second pass), and transformers' GPT2Tokenizer. Note: transformers 5
           no longer ships the slow pure-Python GPT2Tokenizer; its GPT2Tokenizer is the Rust `tokenizers`
           backend, so the comparison is pure Python against Rust (timed twice, the faster run reported).
           Ids are checked to be equal. The vocabulary is trained on --train-kb of the same source.

    python bench/bench_decoder.py                  # both
    python bench/bench_decoder.py --what load --runs 5
    python bench/bench_decoder.py --what tokenizer --text-kb 500
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoder import GPT, GPTConfig, load_tokenizer, save_pretrained  # noqa: E402


def write_full_gpt2(directory: Path) -> Path:
    """A random gpt2 saved like openai-community/gpt2's model.safetensors."""
    config = GPTConfig.preset("gpt2")
    sd = GPT(config).hf_state_dict()
    n = config.block_size
    causal = torch.tril(torch.ones(n, n)).view(1, 1, n, n)  # the h.N.attn.bias buffer of the hub file
    for layer in range(config.n_layer):
        sd[f"h.{layer}.attn.bias"] = causal
    save_pretrained(directory, config.to_hf(), sd)
    return directory / "model.safetensors"


def bench_load(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_full_gpt2(Path(tmp))
        weights.read_bytes()  # warm the page cache
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            model = GPT.from_pretrained(tmp)
            times.append(time.perf_counter() - start)
            del model
        size = weights.stat().st_size
    result = {"file_mb": size / 1e6, "median_s": statistics.median(times), "min_s": min(times)}
    print(f"from_pretrained, full gpt2 ({result['file_mb']:.0f} MB safetensors, warm page cache): "
          f"median {result['median_s']:.2f} s, min {result['min_s']:.2f} s over {args.runs} runs")
    return result


def stdlib_text(kilobytes: int) -> str:
    """Deterministic English + code text: the standard library's own sources, in sorted order."""
    parts, size = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= kilobytes * 1000:
            break
    return "".join(parts).encode("utf-8")[: kilobytes * 1000].decode("utf-8", errors="ignore")


def bench_tokenizer(args) -> dict:
    import tokenizers
    import transformers

    text = stdlib_text(args.text_kb)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = tokenizers.ByteLevelBPETokenizer()
        trainer.train_from_iterator(stdlib_text(args.train_kb).splitlines(), vocab_size=args.vocab_size, min_frequency=2,
                                    special_tokens=["<|endoftext|>"], show_progress=False)
        trainer.save_model(tmp)
        theirs = transformers.GPT2Tokenizer.from_pretrained(tmp)
        ours = load_tokenizer(tmp)
        timed = {}
        start = time.perf_counter()
        ids = ours.encode(text)
        timed["ours, cold cache"] = time.perf_counter() - start
        start = time.perf_counter()
        assert ours.encode(text) == ids
        timed["ours, warm cache"] = time.perf_counter() - start
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            their_ids = theirs.encode(text, add_special_tokens=False)
            runs.append(time.perf_counter() - start)
        timed["transformers GPT2Tokenizer (Rust backend)"] = min(runs)
    if their_ids != ids:
        raise SystemExit("error: token ids differ from transformers' GPT2Tokenizer")
    kb = len(text.encode("utf-8")) / 1000
    print(f"tokenizer: {kb:.0f} KB of text, {len(ids)} tokens, vocabulary {ours.vocab_size}; ids identical")
    for name, seconds in timed.items():
        print(f"  {name:45s} {seconds:6.3f} s  {kb / seconds:8.0f} KB/s")
    return {"kb": kb, "tokens": len(ids), **timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["load", "tokenizer", "all"], default="all")
    parser.add_argument("--runs", type=int, default=3, help="loads to time (default 3)")
    parser.add_argument("--text-kb", type=int, default=300, help="tokenizer text size in KB (default 300)")
    parser.add_argument("--train-kb", type=int, default=4000, help="BPE training text in KB (default 4000)")
    parser.add_argument("--vocab-size", type=int, default=20000, help="BPE vocabulary size (default 20000)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what in ("load", "all"):
        bench_load(args)
    if args.what in ("tokenizer", "all"):
        bench_tokenizer(args)


if __name__ == "__main__":
    main()
