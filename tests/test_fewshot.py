"""Tests for fewshot.py: the cached batched scorer against the naive oracle, demo selection,
calibration, statistics, a tiny world where text-mode few-shot must beat chance, and bad input."""
import importlib.util
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

import fewshot
from decoder import GPT, GPTConfig
from encoder import HuBERT, HuBERTConfig
from fewshot import (FewShot, RunConfig, Split, Template, kate_neighbours, label_text, rank_scores,
                     rank_scores_naive, select_demos, t_quantile)
from projector import Projector, ProjectorConfig
from seal import Seal, SealConfig, build_prompt

LABELS = ["activate lights kitchen", "bring juice none", "decrease heat bedroom", "activate music none"]


class WordTokenizer:
    """Whitespace-separated words and newlines as tokens (spaces are implicit): a tokenizer that
    splits exactly at the places fewshot.py cuts text, small enough to train an LM on in seconds."""

    def __init__(self, words):
        self.vocab = ["<eot>", "\n", "=>", "N/A"] + sorted(set(words) - {"=>", "N/A"})
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.eot_id = 0
        self.vocab_size = len(self.vocab)

    def encode(self, text):
        return [self.ids[w] for w in re.findall(r"\n|[^\s]+", text)]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)


def tiny_lm(vocab_size, block_size=256, n_layer=2, n_embd=32):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_embd=n_embd)).eval()


def make_split(n, name, seed, with_audio=True):
    """n utterances over LABELS; transcripts are label words plus noise words; audio is random noise."""
    rng = random.Random(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    texts = [f"please {y} now" for y in labels]
    g = torch.Generator().manual_seed(seed)
    wavs = [0.1 * torch.randn(int(16000 * rng.uniform(0.2, 0.45)), generator=g) for _ in range(n)]
    return Split(texts, labels, (lambda i: wavs[i]) if with_audio else None, name)


def all_words():
    return {w for y in LABELS for w in y.split()} | {"please", "now"}


@pytest.fixture(scope="module")
def speech_world():
    """A random tiny Seal (hubert-tiny, projector, 2-layer GPT) with word-level text."""
    tok = WordTokenizer(all_words())
    lm = tiny_lm(tok.vocab_size)
    torch.manual_seed(1)
    encoder = HuBERT(HuBERTConfig.preset("hubert-tiny")).eval()
    projector = Projector(ProjectorConfig(in_dim=encoder.config.n_embd, out_dim=32, rate=4, hidden_dim=48))
    seal = Seal(encoder, projector, lm, tok, SealConfig(encoder="hubert-tiny", lm="tiny", projector=projector.config))
    return FewShot(lm, tok, make_split(12, "train", 0), make_split(6, "test", 1), seal=seal.eval())


# -----------------------------------------------------------------------------------------------
# The scorer


def test_cached_scorer_matches_naive_loglikelihoods():
    lm = tiny_lm(97, n_embd=48)
    g = torch.Generator().manual_seed(1)
    # Queries of different lengths (so padding matters), with text and speech-like segments.
    rows = [[torch.randint(0, 97, (n,), generator=g).tolist(), torch.randn(m, 48, generator=g)]
            for n, m in ((20, 7), (35, 2), (3, 11))]
    prompt = build_prompt(rows, lm.wte)
    candidates = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 3, 2, 5, 3)]
    # ... and labels that share prefixes, as FSC's do ("activate lights kitchen" / "activate lights none").
    candidates += [candidates[3][:3] + [7, 8], candidates[3][:1] + [9], candidates[3][:4] + [11]]
    cached, naive = rank_scores(lm, prompt, candidates), rank_scores_naive(lm, prompt, candidates)
    assert cached.shape == (3, 8)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=0)
    # ... and they are real log-likelihoods: the naive one checked against a direct formula.
    x = torch.tensor(rows[0][0])
    with torch.no_grad():
        full = torch.cat([lm.wte(x), rows[0][1], lm.wte(torch.tensor(candidates[3]))])[None]
        logp = lm(inputs_embeds=full)[0].log_softmax(-1)
    P = len(x) + rows[0][1].shape[0]
    direct = sum(logp[P - 1 + j, t] for j, t in enumerate(candidates[3]))
    assert abs(direct.item() - naive[0, 3].item()) < 1e-4


def test_candidate_trie_packs_shared_prefixes():
    trie = fewshot.CandidateTrie.build([[5, 6, 7], [5, 6, 8], [5, 9], [4]])
    # Fed nodes (every proper prefix once): (5,), (5, 6). The first tokens come from the prompt.
    assert trie.tokens.tolist() == [5, 6] and trie.depth.tolist() == [0, 1]
    assert trie.visible.tolist() == [[True, False], [True, True]]
    assert trie.first.tolist() == [5, 5, 5, 4]
    pairs = sorted(zip(trie.owner.tolist(), trie.node.tolist(), trie.target.tolist()))
    assert pairs == [(0, 0, 6), (0, 1, 7), (1, 0, 6), (1, 1, 8), (2, 0, 9)]


def test_full_attention_mask_equals_padding_mask():
    # decoder.py's 4-D attention_mask (used by rank_scores) against its usual 2-D padding mask.
    lm = tiny_lm(50)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (2, 6), generator=g)
    pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    full = torch.ones(6, 6, dtype=torch.bool).tril() & pad[:, None, :]
    full |= torch.eye(6, dtype=torch.bool)  # every position sees itself, as the 2-D path does
    pos = (pad.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = lm(x, attention_mask=pad)
        b = lm(x, attention_mask=full[:, None], position_ids=pos)
    torch.testing.assert_close(a[pad], b[pad])
    with pytest.raises(ValueError, match="explicit position_ids"):
        lm(x, attention_mask=full[:, None])


@pytest.mark.parametrize("select", ["random", "kate"])
@pytest.mark.parametrize("mode", ["speech", "text", "none"])
def test_run_with_cached_and_naive_scorer_gives_identical_predictions(speech_world, mode, select):
    config = RunConfig(k=2, mode=mode, select=select, batch_size=4)
    fast = speech_world.run(config, seed=3, scorer=rank_scores)
    slow = speech_world.run(config, seed=3, scorer=rank_scores_naive)
    assert fast["predictions"] == slow["predictions"]
    assert fast["demos"] == slow["demos"]


def test_calibration_and_length_norm_with_both_scorers(speech_world):
    for scoring, length_norm in (("rank", False), ("rank", True), ("generate", False)):
        config = RunConfig(k=2, mode="speech", select="fixed", calibrate=True, scoring=scoring,
                           length_norm=length_norm, batch_size=3)
        fast = speech_world.run(config, seed=0, scorer=rank_scores)
        slow = speech_world.run(config, seed=0, scorer=rank_scores_naive)
        assert fast["predictions"] == slow["predictions"]


def test_calibration_divides_out_the_content_free_prior():
    # Scores that prefer label 0 everywhere; the content-free input prefers it just as much.
    scores = torch.tensor([[0.0, -1.0, -2.0]])
    cf = torch.tensor([[[0.0, -3.0, -3.0]]])
    cal = fewshot.calibrated(scores, cf)
    assert cal.argmax(-1).item() == 1  # label 1 is far more likely than its prior says
    # A uniform content-free distribution changes nothing.
    same = fewshot.calibrated(scores, torch.zeros(1, 1, 3))
    assert same.argmax(-1).item() == 0


def test_generate_greedy_matches_full_forward_argmax():
    lm = tiny_lm(50)
    g = torch.Generator().manual_seed(2)
    rows = [[torch.randint(0, 50, (n,), generator=g).tolist()] for n in (4, 9)]
    out = fewshot.generate_greedy(lm, build_prompt(rows, lm.wte), max_new_tokens=5, stop=[49, 48])
    for row, new in zip(rows, out):  # one row at a time, no cache: the same greedy tokens
        ids = torch.tensor(row[0])[None]
        expect = []
        for _ in range(5):
            t = int(lm(ids)[0, -1].argmax())
            expect.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
            if expect[-2:] == [49, 48]:
                expect = expect[:-2]
                break
        assert new == expect


def test_speech_bank_batch_equals_items_one_by_one(speech_world):
    # The bank pads each batch of waveforms to a multiple of data.WAV_PAD_MULTIPLE (for speed): an
    # utterance's soft tokens and pooled features must not depend on what it was batched with.
    seal, split = speech_world.seal, speech_world.train
    batched, single = fewshot.SpeechBank(seal, split, batch_size=6), fewshot.SpeechBank(seal, split, batch_size=1)
    ids = list(range(len(split)))
    torch.testing.assert_close(batched.features(ids), single.features(ids), atol=1e-5, rtol=1e-4)
    for a, b in zip(batched.soft_tokens(ids), single.soft_tokens(ids)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------------------------
# Demonstrations


def test_kate_returns_true_nearest_neighbours_nearest_last():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 0.5]])
    query = torch.tensor([[1.0, 0.2]])
    # Cosine with (1, .2): pool 4 (0.995), pool 0 (0.981), pool 2 (0.832); nearest last. By Euclidean
    # distance pool 4 would be far (4.0): the direction counts, not the length.
    assert kate_neighbours(query, pool, 3).tolist() == [[2, 0, 4]]
    # Brute force on random data.
    g = torch.Generator().manual_seed(0)
    pool, query = torch.randn(50, 8, generator=g), torch.randn(6, 8, generator=g)
    got = kate_neighbours(query, pool, 4)
    for q in range(6):
        sims = [F.cosine_similarity(query[q], pool[j], dim=0).item() for j in range(50)]
        assert got[q].tolist() == sorted(range(50), key=lambda j: sims[j])[-4:]
    # select_demos maps pool positions back to train indices.
    demos = select_demos("kate", 2, [10, 11, 12, 13, 14], 1, random.Random(0),
                         pool_features=torch.eye(5), query_features=torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]]))
    assert demos == [[13, 12]]


def test_fixed_demos_are_shared_and_random_demos_differ():
    pool = list(range(100))
    fixed = select_demos("fixed", 5, pool, 20, random.Random(0))
    assert all(d == fixed[0] for d in fixed) and len(set(fixed[0])) == 5
    assert select_demos("fixed", 5, pool, 20, random.Random(1))[0] != fixed[0]  # but per seed
    rand = select_demos("random", 5, pool, 20, random.Random(0))
    assert len({tuple(d) for d in rand}) > 15 and all(len(set(d)) == 5 for d in rand)


def test_balanced_pool_and_demos_come_from_train(speech_world):
    pool = fewshot.balanced_pool(speech_world.train.labels, 2, random.Random(0))
    counts = {y: sum(speech_world.train.labels[i] == y for i in pool) for y in LABELS}
    assert set(counts.values()) == {2}
    r = speech_world.run(RunConfig(k=3, mode="text", pool_per_class=2), seed=0)
    assert all(j in range(len(speech_world.train)) for d in r["demos"] for j in d)


# -----------------------------------------------------------------------------------------------
# A tiny world in which text few-shot works (and could fail)


def test_text_mode_beats_chance_on_a_trivial_task():
    """Train a tiny GPT on lines 'wX => label\\n' where each of 8 input words has one label. The
    label must be read off the line's input two tokens back: a broken prompt, wrong positions or a
    scorer off by one token would leave the model at chance (1/8)."""
    inputs = [f"w{i}" for i in range(8)]
    names = ["red", "green", "blue", "cyan", "gold", "pink", "gray", "teal"]
    label_of = dict(zip(inputs, names))
    tok = WordTokenizer(inputs + names)
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(300):
        docs = ["".join(f"{w} => {label_of[w]}\n" for w in rng.choices(inputs, k=6)) for _ in range(16)]
        x = torch.tensor([tok.encode(d) for d in docs])
        loss = F.cross_entropy(lm(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.eval()
    train = Split(inputs * 3, [label_of[w] for w in inputs * 3], name="train")
    test = Split(inputs, [label_of[w] for w in inputs], name="test")
    world = FewShot(lm, tok, train, test)
    for scoring in ("rank", "generate"):
        acc = world.run(RunConfig(k=3, mode="text", scoring=scoring, select="random"), seed=0)["accuracy"]
        assert acc >= 0.75, (scoring, acc)  # chance is 0.125
    # An untrained LM of the same shape has no idea.
    torch.manual_seed(1)
    untrained = FewShot(GPT(lm.config).eval(), tok, train, test)
    assert untrained.run(RunConfig(k=3, mode="text"), seed=0)["accuracy"] <= 0.5


# -----------------------------------------------------------------------------------------------
# Labels, template, statistics


def test_label_text_and_template():
    assert label_text("fsc", ("activate", "lights", "kitchen")) == "activate lights kitchen"
    assert label_text("fsc", "change language_none_none") == "change language none none"
    assert label_text("slurp", ("iot", "hue_lightoff")) == "iot hue lightoff"
    assert fewshot.normalize("  Activate the lights, kitchen!\n") == "activate the lights kitchen"
    t = Template.parse("{input} => {label}\n")
    assert (t.before, t.between, t.label_lead, t.after) == ("", " =>", " ", "\n")
    assert t.candidate("bring juice none") == " bring juice none\n"
    for bad in ("{input} => {label}", "{label} {input}\n", "=> {label}\n", "{input}{input} {label}\n"):
        with pytest.raises(ValueError, match="template"):
            Template.parse(bad)


def test_t_quantile_and_confidence_interval():
    # Textbook two-sided 95% critical values of Student's t.
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert abs(t_quantile(0.975, df) - value) < 2e-3
    mean, half = fewshot.mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert fewshot.mean_ci([0.4]) == (0.4, None)


def test_summary_per_label_and_confusions():
    runs = [dict(accuracy=0.5, predictions=["a", "b", "a", "a"], gold=["a", "a", "b", "a"], dropped_demos=0)]
    s = fewshot.summarize(runs, ["a", "b"])
    assert s["per_label"] == {"a": 2 / 3, "b": 0.0}
    assert {(c["gold"], c["predicted"]) for c in s["confusions"]} == {("a", "b"), ("b", "a")}


# -----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors(speech_world):
    tok, lm = speech_world.tokenizer, speech_world.lm
    with pytest.raises(ValueError, match="train pool holds only 12"):
        speech_world.run(RunConfig(k=13, mode="text"))
    with pytest.raises(ValueError, match="demo label.*not in the label set"):
        FewShot(lm, tok, make_split(8, "train", 0), make_split(4, "test", 1), labels=LABELS[:2] + LABELS[3:])
    with pytest.raises(ValueError, match="split is empty"):
        FewShot(lm, tok, Split([], [], name="train"), make_split(4, "test", 1))
    with pytest.raises(ValueError, match="needs a Seal"):
        FewShot(lm, tok, make_split(8, "train", 0, with_audio=False), make_split(4, "test", 1)).run(RunConfig(k=1))


def test_prompt_longer_than_context_refused_or_truncated():
    tok = WordTokenizer(all_words())
    lm = tiny_lm(tok.vocab_size, block_size=32)
    world = FewShot(lm, tok, make_split(8, "train", 0, with_audio=False), make_split(3, "test", 1, with_audio=False))
    # A demo line is 10 tokens ("please x y z now", "=>", " x y z\n"), the query 6, and the 4 labels'
    # trie has 11 nodes (a, b, d; al, am, bj, dh; alk, amn, bjn, dhb): 32 - 11 = 21 positions for the prompt.
    assert len(world.trie.tokens) == 11
    with pytest.raises(ValueError, match="exceeds the LM's context of 32"):
        world.run(RunConfig(k=4, mode="text", select="fixed"))
    r = world.run(RunConfig(k=4, mode="text", select="fixed", truncate=True))
    assert r["dropped_demos"] == 3 * 3  # one demo kept per query: 10 + 6 = 16 <= 21 < 26


def save_tiny_seal(root):
    """A random tiny Seal on disk: LM (byte-level tokenizer, no merges), encoder, projector checkpoint."""
    from decoder import bytes_to_unicode

    lm_dir, enc_dir = root / "lm", root / "enc"
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=1024, vocab_size=256, n_layer=1, n_head=2, n_embd=32))
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    lm.save_pretrained(lm_dir, extra_files={"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"})
    encoder = HuBERT(HuBERTConfig.preset("hubert-tiny"))
    encoder.save_pretrained(enc_dir)
    projector = Projector(ProjectorConfig(in_dim=64, out_dim=32, rate=4, hidden_dim=16))
    seal = Seal(encoder, projector, lm, None, SealConfig(encoder=str(enc_dir), lm=str(lm_dir), projector=projector.config))
    ckpt = root / "run" / "projector.safetensors"
    ckpt.parent.mkdir(parents=True)
    seal.save_projector(ckpt)
    return ckpt, lm_dir


def write_fsc_layout(root, n_train=6, n_test=4, intents=(("activate", "lights", "kitchen"), ("bring", "juice", "none"),
                                                          ("decrease", "heat", "bedroom"))):
    """A tiny folder in the real FSC layout (index CSVs + 16 kHz WAVs of noise)."""
    from data import write_wav

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = [",path,speakerId,transcription,action,object,location"]
        for i in range(n):
            a, o, l = intents[i % len(intents)]
            path = f"wavs/speakers/s{i % 2}/{split}{i}.wav"
            write_wav(root / path, 0.1 * torch.randn(4000 + 800 * i, generator=g))
            lines.append(f"{i},{path},s{i % 2},{a} the {o} {l},{a},{o},{l}")
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{split}_data.csv").write_text("\n".join(lines) + "\n")
    return root


def test_cli_end_to_end_json_and_defaults(tmp_path, capsys, monkeypatch):
    ckpt, _ = save_tiny_seal(tmp_path)
    fsc = write_fsc_layout(tmp_path / "synthetic" / "fluent_speech_commands_dataset")
    out = tmp_path / "results.json"
    report = fewshot.main(["--ckpt", str(ckpt), "--data-dir", str(fsc), "--k", "0", "2", "--mode", "speech", "text",
                           "--seeds", "2", "--out", str(out), "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert "SYNTHETIC" not in printed and "speech k=2: accuracy" in printed
    saved = json.loads(out.read_text())
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert out.with_suffix(".png").is_file() == has_matplotlib  # accuracy vs k, when matplotlib is installed
    assert set(saved["accuracy"]) == {"speech k=0", "speech k=2", "text k=0", "text k=2"}
    assert len(saved["labels"]) == 31 and "bring juice none" in saved["labels"]  # FSC's intents, all ranked
    run = saved["results"][1]
    assert (run["mode"], run["k"], len(run["per_seed"])) == ("speech", 2, 2) and run["ci95"] is not None
    assert all(0 <= a <= 1 for a in run["per_label"].values())
    assert report["results"][1]["runs"][0]["demos"][0][0] in range(6)  # demos index the train split
    # Without --ckpt / --data-dir: the newest micro-world checkpoint and synthetic set under $SEAL_CACHE.
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    single = fewshot.main(["--k", "1", "--limit", "2"])
    printed = capsys.readouterr().out
    assert "SYNTHETIC FSC-style set" in printed and str(fsc) in printed
    assert isinstance(single["accuracy"], float) and single["checkpoint"] == str(ckpt) and single["queries"] == 2


def test_default_checkpoint_is_the_chains_own(tmp_path, monkeypatch):
    # bench/bench_projector_seeds.py trains other Seal projectors in the same cache, after the chain's: the
    # command the chain prints must still evaluate the chain's, and the newest one only when there is none.
    import os
    import shutil

    ckpt, _ = save_tiny_seal(tmp_path / "models")
    cache = tmp_path / "cache"
    chain = cache / "micro-world" / "seal-fsc" / "projector.safetensors"
    seed = cache / "micro-world" / "projector-seeds" / "seed1" / "seal-fsc" / "projector.safetensors"
    for path, mtime in ((chain, 1_000_000), (seed, 2_000_000)):
        path.parent.mkdir(parents=True)
        shutil.copy(ckpt, path)
        os.utime(path, (mtime, mtime))
    monkeypatch.setenv("SEAL_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert fewshot.find_micro_world("fsc")[0] == chain
    chain.unlink()
    assert fewshot.find_micro_world("fsc")[0] == seed


def test_cli_bad_input_messages(tmp_path, capsys):
    ckpt, lm_dir = save_tiny_seal(tmp_path)
    fsc = write_fsc_layout(tmp_path / "fsc")
    empty = write_fsc_layout(tmp_path / "empty", n_test=0)

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            fewshot.main(list(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err  # after the progress bar
        return err

    assert "trained for lm" in error("--ckpt", str(ckpt), "--lm", "gpt2", "--data-dir", str(fsc))
    assert "trained for encoder" in error("--ckpt", str(ckpt), "--encoder", "hubert-base", "--data-dir", str(fsc))
    assert "train pool holds only 6" in error("--ckpt", str(ckpt), "--data-dir", str(fsc), "--k", "7")
    assert "split is empty" in error("--ckpt", str(ckpt), "--data-dir", str(empty))
    odd = write_fsc_layout(tmp_path / "odd", intents=(("activate", "lights", "kitchen"), ("fly", "kite", "garden")))
    assert "demo label(s) ['fly kite garden'] not in the label set of 31" in error("--ckpt", str(ckpt), "--data-dir", str(odd))
    assert "exceeds the LM's context" in error("--lm", str(lm_dir), "--mode", "text", "--data-dir", str(fsc),
                                               "--k", "5", "--template", "{input}" + " " * 200 + "=> {label}\n")
    assert "Fluent Speech Commands not found" in error("--ckpt", str(ckpt), "--data-dir", str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_benchmark_cached_scorer_is_10x_faster_than_naive(tmp_path):
    """The bar of the few-shot issue: FSC (31 labels), k=5, micro-world-size LM, identical predictions."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench/bench_fewshot.py", "--queries", "16", "--naive-queries", "4",
                    "--rounds", "1", "--json", str(out)], check=True)
    result = json.loads(out.read_text())
    assert result["identical_predictions"] and result["labels"] == 31 and result["k"] == 5
    assert result["cpu_speedup"] >= 10, result
