"""Tests for decoder.py: GPT-2 parity with transformers, KV cache, padding, checkpoint loading,
tokenizer parity with transformers' GPT2Tokenizer, sentencepiece wrapper and the CLI."""
import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import decoder
from decoder import (
    GPT,
    GPT2Tokenizer,
    GPTConfig,
    SentencePieceTokenizer,
    gpt2_pretokenizer,
    load_checkpoint,
    load_tokenizer,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def hf_model(config: GPTConfig, seed: int = 0):
    """transformers' GPT2LMHeadModel with random weights everywhere: HF initialises the matrices
    randomly but biases to 0 and LayerNorms to 1, so those are randomised too (a mis-mapped bias
    must not hide behind a zero)."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**config.to_hf(), attn_implementation="eager")
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1 if "ln" in name and name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
    return model


def hub_state_dict(model, config: GPTConfig) -> dict:
    """The state dict as the real hub file stores it: bare keys, the causal-mask buffer
    h.N.attn.bias (F32 [1, 1, n_positions, n_positions]), no lm_head."""
    sd = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    mask = torch.tril(torch.ones(config.block_size, config.block_size)).view(1, 1, config.block_size, config.block_size)
    for n in range(config.n_layer):
        sd[f"h.{n}.attn.bias"] = mask
    return sd


WEIGHT_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "prefixed": "model.safetensors"}


def save_variants(root: Path, model, config: GPTConfig, variants) -> None:
    """Save the oracle like the hub file ("safetensors" and "bin": bare keys, attn.bias buffers,
    no lm_head) or like a GPT2LMHeadModel save ("prefixed": `transformer.` keys and lm_head.weight)."""
    hub = hub_state_dict(model, config)
    for variant in variants:
        directory = root / variant
        if variant == "safetensors":
            save_pretrained(directory, config.to_hf(), hub)
        elif variant == "bin":
            directory.mkdir()
            (directory / "config.json").write_text(json.dumps(config.to_hf()))
            torch.save(hub, directory / "pytorch_model.bin")
        else:
            save_pretrained(directory, config.to_hf(), {k: v.contiguous() for k, v in model.state_dict().items()})


def assert_logits_match(oracle, directory: Path, variant: str, lengths) -> None:
    ours = GPT.from_pretrained(str(directory))
    assert WEIGHT_FILES[variant] in load_checkpoint(str(directory))[2]  # the file we meant to test
    g = torch.Generator().manual_seed(1)
    for T in lengths:
        idx = torch.randint(0, oracle.config.vocab_size, (1, T), generator=g)
        with torch.no_grad():
            want = oracle(idx).logits
            got = ours(idx)
        assert got.shape == want.shape == (1, T, oracle.config.vocab_size)
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, f"{variant}, T={T}: max abs diff {diff}"


def test_logits_match_transformers_full_gpt2_hub_file(tmp_path):
    """The real gpt2 shapes and file layout (12 layers, 768 wide, 50257 tokens, 1024 positions)."""
    config = GPTConfig.preset("gpt2")
    oracle = hf_model(config)
    save_variants(tmp_path, oracle, config, ["safetensors"])
    assert_logits_match(oracle, tmp_path / "safetensors", "safetensors", lengths=(1, 9, 40))


@pytest.mark.parametrize("variant", ["bin", "prefixed"])
def test_logits_match_transformers_other_layouts(tmp_path, variant):
    """pytorch_model.bin, and `transformer.` keys + lm_head, at gpt2's widths with 2 layers
    (the slow test below repeats this at full depth)."""
    config = GPTConfig(n_layer=2)
    oracle = hf_model(config)
    save_variants(tmp_path, oracle, config, [variant])
    assert_logits_match(oracle, tmp_path / variant, variant, lengths=(1, 9, 40))


@pytest.mark.slow
def test_logits_match_transformers_full_gpt2_all_layouts_full_context(tmp_path):
    config = GPTConfig.preset("gpt2")
    oracle = hf_model(config)
    save_variants(tmp_path, oracle, config, list(WEIGHT_FILES))
    for variant in WEIGHT_FILES:
        assert_logits_match(oracle, tmp_path / variant, variant, lengths=(1, 300, 1024))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=97)
    return GPT(config).eval()


def test_kv_cache_incremental_equals_full(tiny):
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = tiny(idx)
        logits, cache = tiny(idx[:, :5], use_cache=True)
        steps = [logits]
        for t in range(5, 20, 3):  # chunks of 3 tokens, then 2; odd chunks with explicit positions
            positions = torch.arange(t, min(t + 3, 20)).expand(3, -1) if t % 2 else None
            logits, cache = tiny(idx[:, t : t + 3], position_ids=positions, kv_cache=cache, use_cache=True)
            steps.append(logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_is_not_modified_by_forward(tiny):
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        _, cache = tiny(idx, use_cache=True)
        keys = [k.clone() for k in cache.keys]
        _, longer = tiny(idx[:, :2], kv_cache=cache, use_cache=True)
    assert cache.length == 8 and longer.length == 10
    assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys))


def test_shared_prefix_repeat_interleave_equals_full_forwards(tiny):
    """Few-shot scoring: two padded prompts, each encoded once, each continued by 3 candidates
    of different lengths (right padded); every candidate row equals its sequence run alone."""
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 6)]
    cands = [torch.randint(0, 97, (n,)) for n in (1, 4, 3)]
    P, N, Tc = max(len(p) for p in prompts), len(cands), max(len(c) for c in cands)
    prompt_ids = torch.zeros(2, P, dtype=torch.long)
    prompt_mask = torch.zeros(2, P, dtype=torch.bool)
    for b, p in enumerate(prompts):  # left padding
        prompt_ids[b, P - len(p) :] = p
        prompt_mask[b, P - len(p) :] = True
    cand_ids = torch.zeros(2 * N, Tc, dtype=torch.long)
    cand_mask = torch.zeros(2 * N, Tc, dtype=torch.bool)
    for r in range(2 * N):  # right padding; row b*N + j = prompt b, candidate j
        c = cands[r % N]
        cand_ids[r, : len(c)] = c
        cand_mask[r, : len(c)] = True
    with torch.no_grad():
        _, cache = tiny(prompt_ids, attention_mask=prompt_mask, use_cache=True)
        mask = torch.cat([prompt_mask.repeat_interleave(N, dim=0), cand_mask], dim=1)
        got = tiny(cand_ids, attention_mask=mask, kv_cache=cache.repeat_interleave(N))  # (2N, Tc, V)
        for r in range(2 * N):
            p, c = prompts[r // N], cands[r % N]
            alone = tiny(torch.cat([p, c])[None])[0, len(p) :]
            torch.testing.assert_close(got[r, : len(c)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(tiny, side):
    seqs = [torch.randint(0, 97, (n,)) for n in (11, 4, 8)]
    T = max(len(s) for s in seqs)
    idx = torch.full((3, T), 5, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        idx[b, cols] = s
        mask[b, cols] = True
    with torch.no_grad():
        batch = tiny(idx, attention_mask=mask)
        hidden = tiny(idx, attention_mask=mask, return_hidden=True)
        for b, s in enumerate(seqs):
            cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(batch[b, cols], tiny(s[None])[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(hidden[b, cols], tiny(s[None], return_hidden=True)[0], atol=1e-5, rtol=0)
    assert torch.isfinite(batch).all()


def test_inputs_embeds_equal_token_ids(tiny):
    idx = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = tiny(idx, attention_mask=mask)
        got = tiny(inputs_embeds=tiny.wte(idx), position_ids=positions, attention_mask=mask)
        assert torch.equal(got, want)
        # Embeddings after a cached token prefix (how a speech prefix is continued by text).
        _, cache = tiny(inputs_embeds=tiny.wte(idx[:, :4]), attention_mask=mask[:, :4], use_cache=True)
        rest = tiny(idx[:, 4:], attention_mask=mask, kv_cache=cache)
    torch.testing.assert_close(rest, want[:, 4:], atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="block_size=48"):
        tiny(torch.zeros(1, 49, dtype=torch.long))
    _, cache = tiny(torch.zeros(1, 40, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="40 cached"):
        tiny(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exactly one"):
        tiny()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny.generate(torch.zeros(1, 40, dtype=torch.long), 9)


def test_generate_greedy_matches_step_by_step_argmax(tiny):
    idx = torch.randint(0, 97, (2, 5))
    out = tiny.generate(idx, 7, temperature=0)
    expect = idx
    with torch.no_grad():
        for _ in range(7):  # no cache: the full forward every step
            expect = torch.cat([expect, tiny(expect)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expect)
    # top-k = 1 sampling is greedy; sampling is reproducible with a seeded generator.
    assert torch.equal(tiny.generate(idx, 7, temperature=1.0, top_k=1), expect)
    a = tiny.generate(idx, 7, generator=torch.Generator().manual_seed(3))
    b = tiny.generate(idx, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # eos: rows stop, generation ends once every row emitted it.
    eos = int(expect[0, 5])
    out = tiny.generate(idx[:1], 7, temperature=0, eos_token_id=eos)
    assert out.shape == (1, 6) and out[0, -1] == eos


def test_generate_left_padded_batch_equals_rows_alone(tiny):
    prompts = [torch.randint(0, 97, (n,)) for n in (6, 2, 4)]
    idx = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, 6 - len(p) :], mask[b, 6 - len(p) :] = p, True
    out = tiny.generate(idx, 5, temperature=0, attention_mask=mask)
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, 6:], tiny.generate(p[None], 5, temperature=0)[0, len(p) :])


def test_checkpoint_key_errors_name_the_keys(tmp_path, tiny):
    config = tiny.config
    good = tiny.hf_state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "h.1.mlp.c_fc.bias"}, "h.1.mlp.c_fc.bias"),
        "unexpected": ({**good, "h.2.ln_1.weight": torch.ones(32)}, "h.2.ln_1.weight"),
        "shape": ({**good, "h.0.attn.c_attn.weight": torch.zeros(96, 32)}, r"h\.0\.attn\.c_attn\.weight.*\(96, 32\), expected \(32, 96\)"),
        "lm_head": ({**good, "lm_head.weight": torch.randn(97, 32)}, "lm_head.weight differs"),
    }
    for name, (sd, message) in cases.items():
        save_pretrained(tmp_path / name, config.to_hf(), sd)
        with pytest.raises(ValueError, match=message):
            GPT.from_pretrained(str(tmp_path / name))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        GPTConfig.from_hf({**config.to_hf(), "activation_function": "relu"})


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    again = GPT.from_pretrained(str(tmp_path / "m"))
    assert again.config == tiny.config and not again.training
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.device.type == "cpu" for p in again.parameters())
    oracle = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(idx), tiny(idx))
        torch.testing.assert_close(oracle(idx).logits, tiny(idx), atol=1e-5, rtol=0)
    assert GPTConfig.from_hf(json.loads((tmp_path / "m" / "config.json").read_text())) == tiny.config
    assert GPTConfig.from_hf(transformers.GPT2Config(**tiny.config.to_hf()).to_dict()) == tiny.config


def test_presets():
    assert [(c.n_layer, c.n_head, c.n_embd) for c in map(GPTConfig.preset, ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])] == [
        (12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)]
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.preset("gpt5")


# ---------------------------------------------------------------------------------------------
# Tokenizers

SCRIPTS = [
    "Hello world", "naïve café", "Ünïcödé ßtraße", "Привет, мир", "Γειά σου κόσμε", "שלום עולם",
    "مرحبا بالعالم", "नमस्ते दुनिया", "こんにちは世界", "你好，世界", "안녕하세요 세계", "สวัสดีชาวโลก",
    "Բարեւ", "ሰላም", "ᚠᚢᚦ", "ꦲꦤꦕꦫꦏ", "Ⅻ Ⅳ ⅷ", "x² + y³ = ½", "①②③", "٣٤٥ ١٢", "१२३", "๑๒๓",
    "🙂🚀👍🏽 👨‍👩‍👧", "💯 🇫🇷", "e\u0301 a\u0308", "\u200bzero\u200dwidth", "snake_case __init__",
    "$1,234.56 €12 ¥7 £3", "3.14159 1e-10 0x1F", "2024-06-01T12:00:00Z", "https://example.com/a?b=c&d=e",
    "user@mail.org", "C++ & C# | Rust -> Go", "«quotes» „Gänse“ “curly” ‘single’", "...!!!???", "—–-",
    "\ttab\tseparated\t", "line\nbreak\r\nwindows", "  two  spaces   three", "trailing   ", "   leading",
    "\n\n\nnewlines", "mixed \t \n whitespace", "\u3000ideographic\u00a0nbsp\u2009thin", "\x1c\x1d\x1e\x1f seps",
    "don't I'll we've they're she's I'm he'd", "DON'T SHE'S", "rock 'n' roll", "'s 't 're 've 'm 'll 'd",
    "it''s", "l'amour d'été", "12345678901234567890", "a1b2c3", "ABCabc123___", "<|endoftext|>",
    "before<|endoftext|>after", "x <|endoftext|> y<|endoftext|><|endoftext|>", "<|endoftext", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def tokenizer_corpus(n: int, seed: int = 0) -> list[str]:
    """n varied strings: the fixed SCRIPTS, then random mixes of their fragments, random code points
    from many blocks, digit runs, whitespace runs and contractions."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2150, 0x218F), (0x2460, 0x24FF),
              (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F)]
    pieces = [" ", "  ", "\t", "\n", " \n ", "'s", "'ll", "'d", "'re", "'ve", "'m", "'t", "123", " 42", "_", "__",
              "!?", "...", " -", "<|endoftext|>", "\x1c", "\u00a0", "\u3000"]
    out = list(SCRIPTS)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            if kind < 0.35:
                s = rng.choice(SCRIPTS)
                i, j = sorted(rng.sample(range(len(s) + 1), 2)) if len(s) > 1 else (0, len(s))
                parts.append(s[i:j])
            elif kind < 0.6:
                lo, hi = rng.choice(blocks)
                chars = [chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))]
                parts.append("".join(c for c in chars if unicodedata.category(c) not in ("Cn", "Cs")))
            elif kind < 0.8:
                parts.append(rng.choice(pieces))
            else:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 12))))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE vocabulary trained with `tokenizers` on the varied corpus, saved like the
    hub files (vocab.json + merges.txt with a #version first line)."""
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator(tokenizer_corpus(3000, seed=1) * 3, vocab_size=2000, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(str(directory))
    assert (directory / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    return directory


def test_pretokenizer_matches_the_regex_module():
    """Our stdlib-`re` pattern splits exactly like GPT-2's original \\p{L}/\\p{N} pattern
    (run by the `regex` module) on every code point of Unicode 14 and on the corpus."""
    regex = pytest.importorskip("regex")
    original = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ours = gpt2_pretokenizer()
    assigned = [chr(c) for c in range(sys.maxunicode + 1)
                if unicodedata.category(chr(c)) not in ("Cn", "Cs")
                and regex.match(r"\p{Cn}", chr(c)) is None]  # skip code points newer than Python's Unicode
    # Every code point alone, between letters, between digits and next to spaces.
    for text in ["".join(assigned), " ".join(assigned), "a".join(assigned), "1".join(assigned)]:
        assert ours.findall(text) == original.findall(text)
    for text in tokenizer_corpus(1000):
        assert ours.findall(text) == original.findall(text), repr(text)


def test_bpe_tokenizer_matches_transformers_gpt2tokenizer(bpe_dir):
    oracle = transformers.GPT2Tokenizer.from_pretrained(str(bpe_dir))
    ours = load_tokenizer(str(bpe_dir))
    assert isinstance(ours, GPT2Tokenizer)
    assert ours.eot_id == oracle.convert_tokens_to_ids("<|endoftext|>") == 0
    assert ours.vocab_size == len(oracle)
    corpus = tokenizer_corpus(1200, seed=2)
    assert sum("<|endoftext|>" in s for s in corpus) > 10
    for text in corpus:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(ids) == text
    assert ours.encode("a<|endoftext|>b") == [*ours.encode("a"), ours.eot_id, *ours.encode("b")]
    # A cut inside a multi-byte character decodes to U+FFFD instead of failing.
    ids = ours.encode("€")
    if len(ids) > 1:
        assert "\ufffd" in ours.decode(ids[:1])


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text(
        "\n".join(f"turn the {w} on in the {r}" for w in ["lights", "music", "heat", "lamp"] for r in ["kitchen", "bedroom"]) * 20
    )
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 60 and tok.eot_id == 2
    for text in ["turn the lights on in the kitchen", "music in the bedroom", "heat"]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == text


def test_cli_continues_a_prompt(tmp_path, bpe_dir):
    tok = load_tokenizer(str(bpe_dir))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)
    files = {name: (bpe_dir / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    GPT(config).save_pretrained(tmp_path / "lm", extra_files=files)
    run = subprocess.run([sys.executable, "decoder.py", "--lm", str(tmp_path / "lm"), "--prompt", "Hello world",
                          "--max-new-tokens", "5", "--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Hello world") and len(run.stdout.strip()) > len("Hello world")


def test_cli_reports_user_errors_without_traceback(tmp_path, tiny, capsys):
    with pytest.raises(SystemExit) as exit:
        decoder.main(["--lm", str(tmp_path / "nope"), "--prompt", "x"])
    assert exit.value.code == 2 and capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope'}: no such directory")
    tiny.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(SystemExit) as exit:
        decoder.main(["--lm", str(tmp_path / "no-tokenizer"), "--prompt", "x"])
    assert exit.value.code == 2 and "vocab.json" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_full_gpt2_loads_in_under_5_seconds():
    run = subprocess.run([sys.executable, "bench/bench_decoder.py", "--what", "load", "--runs", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    seconds = float(re.search(r"median ([0-9.]+) s", run.stdout).group(1))
    assert seconds < 5.0, run.stdout
