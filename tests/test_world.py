"""The micro world (train.py, `python train.py` with no flags): MFCC against an independent numpy
computation, the HuBERT pre-training helpers, and a scaled-down run of the whole chain."""
import contextlib
import dataclasses
import hashlib
import io
import json
import random
import shutil

import numpy as np
import pytest
import torch

import data
import train
from data import MFCC_DIM, mfcc
from encoder import kmeans, span_mask
from test_train import metrics  # a run folder's metrics.jsonl, one dict per line


def numpy_mfcc(x, sr=16000, win=400, hop=320, n_fft=512, n_mels=40, n_ceps=13, fmin=20.0, fmax=8000.0):
    """MFCC written independently in numpy, loop by loop, in float64 (the oracle for data.mfcc)."""
    x = np.asarray(x, dtype=np.float64)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis
    n = 1 + (len(x) - win) // hop
    window = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / (win - 1))  # symmetric Hamming
    frames = np.stack([x[i * hop: i * hop + win] * window for i in range(n)])
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, len(bins)))
    for m in range(n_mels):
        lo, c, hi = edges[m: m + 3]
        for j, f in enumerate(bins):
            if lo < f <= c:
                fb[m, j] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[m, j] = (hi - f) / (hi - c)
    log_mel = np.log(power @ fb.T + 1e-6)
    ceps = np.zeros((n, n_ceps))
    for k in range(n_ceps):
        for i in range(n_mels):
            ceps[:, k] += log_mel[:, i] * np.cos(np.pi * k * (2 * i + 1) / (2 * n_mels))
        ceps[:, k] *= np.sqrt((1.0 if k == 0 else 2.0) / n_mels)

    def delta(c):
        p = np.concatenate([c[:1], c[:1], c, c[-1:], c[-1:]])
        return np.stack([((p[t + 3] - p[t + 1]) + 2 * (p[t + 4] - p[t])) / 10.0 for t in range(len(c))])

    d = delta(ceps)
    return np.concatenate([ceps, d, delta(d)], axis=1)


def test_mfcc_matches_numpy():
    t = np.arange(int(16000 * 1.3)) / 16000
    x = 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    ours = mfcc(torch.tensor(x, dtype=torch.float32)).numpy()
    ref = numpy_mfcc(x)
    assert ours.shape == ref.shape == ((len(x) - 400) // 320 + 1, MFCC_DIM)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


def test_mfcc_rejects_short_input():
    with pytest.raises(ValueError, match="400 samples"):
        mfcc(torch.zeros(100))


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([m + 0.3 * torch.randn(200, 2, generator=g) for m in means])
    c = kmeans(x, 3, seed=1)
    # every true mean has a centroid within 0.2 (the cluster mean of 200 points with std 0.3)
    assert torch.cdist(means, c).min(1).values.max() < 0.2


def test_span_mask_spans_and_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([200, 50])
    m = span_mask(lengths, 200, generator=g)
    assert not m[1, 50:].any()  # padding is never masked
    assert 0.2 < m[0].float().mean() < 0.8  # about half of the real frames
    runs = [len(r) for r in "".join("1" if v else "0" for v in m[0].tolist()).split("0") if r]
    assert min(runs[:-1]) >= 10  # spans are at least MASK_SPAN long (the last may be cut by the end)


def test_lm_corpus_episodes_are_consistent():
    corpus = data.LMCorpus(data.fsc_grammar(), seed=0)
    intent_of = {t: it.label for it in corpus.grammar.intents for t in it.templates}
    n_episodes = 0
    for _ in range(300):
        segs = corpus.document()
        if len(segs) < 6 or segs[1] != data.FEWSHOT_SEPARATOR:
            continue
        pairs = [(segs[i], segs[i + 2]) for i in range(0, len(segs), 3)]
        label_of = {}
        for text, label in pairs:  # one intent -> one label within a document, and vice versa
            intent = intent_of[text[0].lower() + text[1:]]
            assert label_of.setdefault(intent, label) == label
        assert len(set(label_of.values())) == len(label_of)
        n_episodes += 1
    assert n_episodes > 50


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    """The toy-sized chain, built once for the tests below. Returns its cache folder, its table, the batch sizes
    that went through the frozen encoder, what it printed, and its figures as built (later tests rebuild stages)."""
    from seal import Seal

    cache = tmp_path_factory.mktemp("quick-world")
    encoded = []
    real_encode = Seal.encode

    def counting_encode(self, wav, lengths=None):
        encoded.append(len(wav))
        return real_encode(self, wav, lengths)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("SEAL_CACHE", str(cache))
        mp.setattr(Seal, "encode", counting_encode)
        table = train.run_micro_world([], train.WorldConfig.quick())
    world = cache / "micro-world"
    last = {name: {k: v for r in metrics(world / name) for k, v in r.items() if k in ("loss", "eval_kl")}
            for name in ("seal-fsc", "psrt-fsc")}
    draws = json.loads((cache / "tiny-lm" / "draws.json").read_text())
    return dict(cache=cache, table=table, encoded=encoded, printed=printed.getvalue(), last=last, draws=draws)


# The toy chain's figures on the 2-core CPU machine, with the pinned espeakng-loader (the same at 1 and 2 torch
# threads). Every stage feeds them: speech synthesis, tokenizer, LM draws, HuBERT, both projectors, the few-shot
# scorer. A change that moves them changed what the chain computes: if that was meant (or a dependency such as
# sentencepiece changed its output), check the new figures and replace these with what the failure prints.
QUICK_WORLD_GOLDEN = {
    # the LM stage's check per draw (2-way 1-shot, natural labels): the first two under the bar, so the quick
    # chain also exercises the fallback draws and their lower noise
    "draws": [(1.5, 2 / 3), (0.75, 2 / 3), (0.75, 1.0)],
    # the last training loss and held-out KL of each projector (5 steps)
    "seal-fsc": {"loss": 0.274333, "eval_kl": 0.132034},
    "psrt-fsc": {"loss": 2.262168, "eval_kl": 0.113267},
    # few-shot accuracy per (labels, row): k = 0, 1; one seed x 40 queries
    "table": {
        ("natural", "text oracle"): (0.975, 0.875), ("natural", "Seal (KL)"): (0.4, 0.5),
        ("natural", "PSRT (CE)"): (0.425, 0.475), ("natural", "untrained projector"): (0.45, 0.5),
        ("arbitrary", "text oracle"): (0.45, 0.45), ("arbitrary", "Seal (KL)"): (0.45, 0.425),
        ("arbitrary", "PSRT (CE)"): (0.45, 0.425), ("arbitrary", "untrained projector"): (0.45, 0.4),
    },
}


def test_quick_world_golden(quick_world):
    """llama2.c's golden test, for the whole chain: the toy world's figures are pinned (QUICK_WORLD_GOLDEN).
    Losses to 1e-4 (thread counts move them by about 1e-6); accuracies to one query of 40 (a rounding
    difference on another CPU may flip one)."""
    golden = QUICK_WORLD_GOLDEN
    cells = {(r["labels"], r["row"], r["k"]): r["accuracy"] for r in quick_world["table"]["results"]}
    actual = {
        "draws": [(d["lm_noise"], d["check"]) for d in quick_world["draws"]],
        **quick_world["last"],
        "table": {key: tuple(cells[(*key, k)] for k in (0, 1)) for key in golden["table"]},
    }
    assert actual["draws"] == pytest.approx(golden["draws"], abs=1e-9), actual
    for name in ("seal-fsc", "psrt-fsc"):
        assert actual[name] == pytest.approx(golden[name], rel=1e-4), actual
    for key, accs in golden["table"].items():
        assert actual["table"][key] == pytest.approx(accs, abs=1 / 40 + 1e-9), (key, actual)


def test_bench_projector_seeds(quick_world, monkeypatch, capsys):
    """bench/bench_projector_seeds.py: the chain's seed reuses the chain's projectors and gives the chain's table;
    another seed trains projectors of its own; the aggregate is over training seeds; the chain's folders are
    left as they were. (Runs before test_quick_world_chain, which rebuilds the toy world's encoder.)"""
    from bench.bench_projector_seeds import aggregate, main

    cache, world = quick_world["cache"], quick_world["cache"] / "micro-world"
    monkeypatch.setenv("SEAL_CACHE", str(cache))
    chain_table = (world / "table.json").read_text()
    json_path = cache / "seeds.json"
    tables = main(["--seeds", "2", "--json", str(json_path)], base=train.WorldConfig.quick())
    assert tables[0] == quick_world["table"]  # the chain's seed: the same projectors, the same episodes
    assert (world / "projector-seeds" / "seed0" / "seal-fsc").resolve() == (world / "seal-fsc").resolve()
    seeds = world / "projector-seeds"
    for name in ("seal-fsc", "psrt-fsc"):
        ours, chain = (train.read_projector(f / name / train.PROJECTOR_NAME)[1] for f in (seeds / "seed1", world))
        assert not (seeds / "seed1" / name).is_symlink()
        assert any(not torch.equal(ours[k], chain[k]) for k in chain), name  # seed 1 trained its own
    assert (world / "table.json").read_text() == chain_table
    cells = aggregate(tables)
    seal = cells[("arbitrary", "Seal (KL)", 1)]
    by_seed = [t_["accuracy"] for s in (0, 1) for t_ in tables[s]["results"]
               if (t_["labels"], t_["row"], t_["k"]) == ("arbitrary", "Seal (KL)", 1)]
    assert list(seal["by_seed"].values()) == by_seed
    assert seal["accuracy"] == pytest.approx(np.mean(by_seed)) and seal["std"] == pytest.approx(np.std(by_seed))
    printed = capsys.readouterr().out
    assert "mean ± std over 2 projector training seeds (0, 1)" in printed
    assert "Seal / text oracle at k = 1, arbitrary labels: " in printed
    saved = json.loads(json_path.read_text())
    assert saved["tables"]["1"] == tables[1] and len(saved["aggregate"]) == len(tables[0]["results"])
    # a rerun reuses seed 1's finished projectors
    before = (seeds / "seed1" / "seal-fsc" / train.PROJECTOR_NAME).stat().st_mtime_ns
    assert main(["--seeds", "2"], base=train.WorldConfig.quick()) == tables
    assert (seeds / "seed1" / "seal-fsc" / train.PROJECTOR_NAME).stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="--set lm_noise: this benchmark only changes"):
        main(["--set", "lm_noise=1.0"], base=train.WorldConfig.quick())


def test_bench_seal_variant(quick_world, monkeypatch, capsys, tmp_path):
    """bench/bench_seal_variant.py retrains the chain's KL projector (seed 0: the same figures as the table) and
    with changed settings; it refuses fields that are not the projector's training and a cache without a world."""
    from bench.bench_seal_variant import main

    monkeypatch.setenv("SEAL_CACHE", str(quick_world["cache"]))
    cfg = train.WorldConfig.quick()
    k = max(cfg.shots)
    cell = {(r["row"], r["labels"]): r["accuracy"] for r in quick_world["table"]["results"] if r["k"] == k}
    chain = main(["--seeds", "1"], base=cfg)
    assert chain[0] == {f"{row}, {labels}": cell[row, labels] for row in ("text oracle", "Seal (KL)")
                        for labels in ("arbitrary", "natural")}
    variant = main(["--seeds", "2", "--set", "temperature=3", "--set", "max_steps=4", "--out", str(tmp_path / "runs")],
                   base=cfg)
    assert list(variant) == [0, 1] and (tmp_path / "runs" / "seed1" / train.PROJECTOR_NAME).is_file()
    assert torch.load(tmp_path / "runs" / "seed1" / train.CKPT_NAME, weights_only=True)["config"]["temperature"] == 3.0
    # the same seeds in two worker processes, each computing the features itself: the same figures
    parallel = main(["--seeds", "2", "--set", "temperature=3", "--set", "max_steps=4", "--jobs", "2"], base=cfg)
    assert parallel == variant
    printed = capsys.readouterr().out
    assert "Seal (KL) trained with {'temperature': 3.0, 'max_steps': 4}, projector seeds 0, 1:" in printed
    assert "arbitrary labels: Seal " in printed and "Seal / text oracle " in printed
    with pytest.raises(SystemExit, match="--set 'loss=ce': expected FIELD=VALUE with FIELD a TrainConfig field"):
        main(["--set", "loss=ce"], base=cfg)
    with pytest.raises(SystemExit, match="--set 'lr=fast': 'fast' is not a valid float"):
        main(["--set", "lr=fast"], base=cfg)
    with pytest.raises(SystemExit, match="--seeds, --jobs and --threads must be >= 1, got 3, 0, 1"):
        main(["--jobs", "0"], base=cfg)
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match=r"no finished corpus stage of this world \(no .*world.json\); run `python train.py` first"):
        main([], base=cfg)


def test_bench_lm_draws_trains_seal_on_each_draw(quick_world, monkeypatch, capsys, tmp_path):
    """bench/bench_lm_draws.py --seal saves each draw's LM, trains the chain's Seal projector on it (the cache's
    HuBERT) and reports the cells that train.seal_cells computes from what it saved."""
    from bench.bench_lm_draws import main
    from decoder import GPT
    from seal import Seal

    monkeypatch.setenv("SEAL_CACHE", str(quick_world["cache"]))
    cfg = train.WorldConfig.quick()
    runs = tmp_path / "runs"
    (result,) = main(["--ids", "2", "--jobs", "1", "--seal", "--out", str(runs), "--set", "lm_steps=24"], base=cfg)
    assert result["draw"] == 2 and result["seed"] == 2 * train.LM_DRAW_STRIDE
    assert [s for s, _ in result["checks"]][-1] == 24
    lm = GPT.from_pretrained(str(runs / "draw2" / "tiny-lm"))
    seal = Seal.from_pretrained(runs / "draw2" / "seal-fsc" / train.PROJECTOR_NAME).eval()
    for name, weight in lm.state_dict().items():  # the projector was trained on this draw's LM, not the cache's
        assert torch.equal(seal.decoder.state_dict()[name], weight), name
    assert not torch.equal(seal.decoder.wte.weight, GPT.from_pretrained("tiny-lm").wte.weight)
    assert result["seal"] == train.seal_cells(cfg, cfg.artifact("corpus"), seal)
    printed = capsys.readouterr().out
    assert "| Seal / oracle, arbitrary |" in printed.splitlines()[-5]  # the table's head: one draw, then the counts
    for argv, message in ((["--out", str(runs)], "--out holds the LMs and projectors of --seal"),
                          (["--ids", "1,x"], "--ids '1,x': expected draw numbers separated by commas"),
                          (["--ids", "1,1"], "--ids '1,1': the draws must be distinct")):
        with pytest.raises(SystemExit, match=message):
            main(argv, base=cfg)


def test_quick_world_chain(quick_world, monkeypatch, capsys):
    """Every stage of a toy-sized world leaves a loadable artifact; the text oracle beats chance."""
    from decoder import GPT, load_tokenizer
    from encoder import HuBERT
    from seal import Seal

    tmp_path, table = quick_world["cache"], quick_world["table"]
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    cfg = train.WorldConfig.quick()
    # every utterance is encoded once: both projectors and the table share the train split's features
    assert sum(quick_world["encoded"]) == cfg.n_train + cfg.n_valid + cfg.n_test
    lm, tok = GPT.from_pretrained("tiny-lm"), load_tokenizer("tiny-lm")
    assert lm.config.n_layer == cfg.lm_layers and tok.vocab_size == lm.config.vocab_size
    # the LM stage reported the in-context check of the model it saved
    name, check = train.lm_check(cfg, tmp_path / "micro-world" / "synthetic-fsc", tok)
    assert name == "2-way 1-shot accuracy on text, natural labels"
    assert f"tiny-lm: {name}: {check(lm):.0%} (chance 50%)" in quick_world["printed"]
    assert HuBERT.from_pretrained("tiny-hubert").config.n_layer == cfg.hubert_layers
    for folder in ("seal-fsc", "psrt-fsc"):
        seal = Seal.from_pretrained(tmp_path / "micro-world" / folder / train.PROJECTOR_NAME)
        assert seal.config.lm == "tiny-lm" and seal.config.encoder == "tiny-hubert"
        assert seal.config.temperature == cfg.seal_temperature  # the world's KL temperature reaches train()
    saved = json.loads((tmp_path / "micro-world" / "table.json").read_text())
    assert saved == table
    # the trivial task: 2-way natural labels, which even a 300-step LM has partly learned from text
    oracle = [r["accuracy"] for r in table["results"] if r["row"] == "text oracle" and r["labels"] == "natural"]
    assert sum(oracle) / len(oracle) > table["chance"] + 0.1
    # a rerun finds every artifact, the table included
    def mtimes():
        return {name: (tmp_path / name / "model.safetensors").stat().st_mtime for name in ("tiny-lm", "tiny-hubert")}

    table_path = tmp_path / "micro-world" / "table.json"
    before, table_written = mtimes(), table_path.stat().st_mtime_ns
    quick_stamp = json.loads((tmp_path / "micro-world" / "seal-fsc" / train.STAMP_NAME).read_text())
    assert train.run_micro_world([], cfg) == table
    assert mtimes() == before and table_path.stat().st_mtime_ns == table_written
    # a table is redone when the weights it scored changed, even with the same settings
    seal_weights = tmp_path / "micro-world" / "seal-fsc" / train.PROJECTOR_NAME
    shutil.copy(tmp_path / "micro-world" / "psrt-fsc" / train.PROJECTOR_NAME, seal_weights)
    redone = train.world_table(cfg, tmp_path / "micro-world" / "synthetic-fsc")
    assert table_path.stat().st_mtime_ns != table_written
    assert redone["made_from"]["projectors"]["seal-fsc"] == hashlib.sha256(seal_weights.read_bytes()).hexdigest()
    # an encoder rebuilt with the same settings but other bits (another machine's rounding): the stages that
    # read it (the projectors, the table) are rebuilt, the encoder itself and the LM are kept
    encoder = HuBERT.from_pretrained("tiny-hubert")
    with torch.no_grad():
        encoder.feature_projection.projection.bias.add_(1e-3)
    encoder.save_pretrained(tmp_path / "tiny-hubert")
    edited = mtimes()
    projector_written = seal_weights.stat().st_mtime_ns
    rebuilt = train.run_micro_world([], cfg)
    assert mtimes() == edited and edited["tiny-lm"] == before["tiny-lm"]
    assert seal_weights.stat().st_mtime_ns != projector_written
    printed = capsys.readouterr().out
    assert "seal-fsc: built with other settings than this WorldConfig, or from other upstream artifacts" in printed
    assert "tiny-hubert: built" not in printed  # the encoder's own stamp (settings, corpus) still matches
    stamp = json.loads((tmp_path / "micro-world" / "seal-fsc" / train.STAMP_NAME).read_text())
    assert stamp["inputs"]["hubert"] == train.artifact_digest(tmp_path / "tiny-hubert") != quick_stamp["inputs"]["hubert"]
    assert rebuilt["made_from"]["world"] == train.stage_stamp(cfg, "table")
    # another encoder setting rebuilds the encoder and the projectors after it, not the LM
    changed = dataclasses.replace(cfg, hubert_steps=cfg.hubert_steps + 1)
    train.run_micro_world([], changed)
    after = mtimes()
    assert after["tiny-lm"] == before["tiny-lm"] and after["tiny-hubert"] != before["tiny-hubert"]
    stamp = json.loads((tmp_path / "micro-world" / "seal-fsc" / train.STAMP_NAME).read_text())
    assert stamp["hubert_steps"] == cfg.hubert_steps + 1 and stamp == train.stage_stamp(changed, "projector")
    assert json.loads(table_path.read_text())["made_from"]["world"] == train.stage_stamp(changed, "table")


def test_each_stage_is_stamped_with_its_own_settings():
    """A table setting leaves the corpus, LM, encoder and projectors cached (n_way once rebuilt the corpus, by the
    prefix "n_"); the LM's check settings retrain the LM, since they decide which draw is kept."""
    cfg = train.WorldConfig()
    table = dataclasses.replace(cfg, n_way=3, shots=(0, 2), table_seeds=5, table_queries=100)
    for stage in ("corpus", "lm", "hubert", "projector"):
        assert table.stamp(stage) == cfg.stamp(stage), stage
    assert table.stamp("table") != cfg.stamp("table")
    check = dataclasses.replace(cfg, lm_check_way=2)
    assert check.stamp("lm") != cfg.stamp("lm") and check.stamp("corpus") == cfg.stamp("corpus")


def test_tokenizer_bytes_do_not_depend_on_the_folder(tmp_path):
    """The LM stage's tokenizer.model is the same file wherever the cache is: sentencepiece records a file prefix in
    the model, which made the bytes (and the digests of the LM's folder in the later stages' stamps) differ."""
    cfg = train.WorldConfig.quick()
    folders = [tmp_path / "a", tmp_path / "somewhere" / "else"]
    for folder in folders:
        folder.mkdir(parents=True)
        tok = train.world_tokenizer(cfg, folder)
    assert tok.vocab_size == cfg.lm_vocab and sorted(p.name for p in folders[1].iterdir()) == ["tokenizer.model"]
    assert (folders[0] / "tokenizer.model").read_bytes() == (folders[1] / "tokenizer.model").read_bytes()
    assert str(tmp_path).encode() not in (folders[0] / "tokenizer.model").read_bytes()


def test_stage_behind_a_link_is_not_deleted(tmp_path):
    """A stage folder that links elsewhere and was built with other settings is refused, not removed."""
    elsewhere = tmp_path / "my-lm"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tiny-lm").symlink_to(elsewhere)
    with pytest.raises(train.UserError, match=r"tiny-lm links to .*my-lm, which was built with other settings .*"
                                              r"\(no .*world.json\); remove the link"):
        train.stage_matches(tmp_path / "tiny-lm", train.WorldConfig.quick(), "lm")
    assert (elsewhere / "model.safetensors").read_bytes() == b"weights"


def test_stamp_mismatch_says_why(tmp_path, monkeypatch):
    """A stage's stamp that does not match names the setting or the upstream artifact that differs, e.g. a HuBERT
    carried to a machine whose corpus was rendered again with other bits."""
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    cfg = train.WorldConfig.quick()
    corpus, hubert = cfg.artifact("corpus"), cfg.artifact("hubert")
    corpus.mkdir(parents=True)
    hubert.mkdir()
    (corpus / "clip.wav").write_bytes(b"RIFF one")
    assert train.stamp_mismatch(hubert, cfg, "hubert") == f"no {hubert / train.STAMP_NAME}"
    train.write_stamp(hubert, cfg, "hubert")
    assert train.stamp_mismatch(hubert, cfg, "hubert") == "" and train.stamp_matches(hubert, cfg, "hubert")
    steps = dataclasses.replace(cfg, hubert_steps=cfg.hubert_steps + 1)
    assert train.stamp_mismatch(hubert, steps, "hubert") == (f"hubert_steps {cfg.hubert_steps} in "
                                                             f"{hubert / train.STAMP_NAME}, {steps.hubert_steps} in "
                                                             f"this WorldConfig")
    (corpus / "clip.wav").write_bytes(b"RIFF two")
    why = train.stamp_mismatch(hubert, cfg, "hubert")
    assert why.startswith("built from a corpus with sha256 ") and f"the cache's {corpus} has " in why
    assert not train.stamp_matches(hubert, cfg, "hubert")
    (hubert / train.STAMP_NAME).write_text(json.dumps(cfg.stamp("hubert")))  # an older version's stamp: no digests
    assert train.stamp_mismatch(hubert, cfg, "hubert").startswith(f"no digest of its corpus recorded, the cache's "
                                                                  f"{corpus} has ")
    lm = cfg.artifact("lm")  # a stage stamped with an upstream digest it does not read is no match either
    lm.mkdir()
    (lm / train.STAMP_NAME).write_text(json.dumps({**cfg.stamp("lm"), "inputs": {"corpus": "ab" * 32}}))
    assert train.stamp_mismatch(lm, cfg, "lm") == "built from a corpus with sha256 abababababab..., which this stage " \
                                                  "does not read"


def test_lm_stage_warns_when_no_draw_learns_in_context(tmp_path, monkeypatch, capsys):
    """An LM that stays at chance in every draw is saved (it cost minutes) but flagged: the world would not be valid."""
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    cfg = dataclasses.replace(train.WorldConfig.quick(), lm_steps=2)
    measured = []
    monkeypatch.setattr(train, "lm_check", lambda cfg, corpus, tok: ("the check", lambda lm: measured.append(lm) or 0.6))
    out = train.world_lm(cfg, tmp_path / "no-corpus-needed")
    assert (out / "model.safetensors").is_file() and len(measured) == 2 * train.LM_DRAWS  # every step of 2, per draw
    draws = json.loads((out / "draws.json").read_text())
    assert [d["seed"] for d in draws] == [train.LM_DRAW_STRIDE * d for d in range(train.LM_DRAWS)]
    fallback = cfg.lm_noise * train.LM_FALLBACK_NOISE
    assert [d["lm_noise"] for d in draws] == [cfg.lm_noise] + [fallback] * (train.LM_DRAWS - 1)
    printed = capsys.readouterr().out
    assert printed.count("tiny-lm: the check: 60% (chance 50%)") == train.LM_DRAWS
    assert "this draw did not learn in context (60%, under 50% of the way from chance to 100%)" in printed
    assert (f"warning: none of {train.LM_DRAWS} draws is a few-shot learner (the best: 60%, under 50% of the way "
            f"from chance to 100%)") in printed and "try another WorldConfig.seed" in printed


def test_lm_stage_trains_another_draw_until_one_learns_in_context(tmp_path, monkeypatch, capsys):
    """Draw 1 stays at chance, draw 2 learns: draw 2 is the stage's LM, and no third draw is trained."""
    from decoder import GPT

    monkeypatch.setenv("SEAL_CACHE", str(tmp_path))
    cfg = dataclasses.replace(train.WorldConfig.quick(), lm_steps=2)
    figures = iter([0.5, 0.55, 0.7, 0.8])  # two checks per draw; 2-way: half-way from chance is 75%
    measured = []
    monkeypatch.setattr(train, "lm_check", lambda cfg, corpus, tok: ("the check", lambda lm: measured.append(
        {k: v.clone() for k, v in lm.state_dict().items()}) or next(figures)))
    noises, train_lm = [], train.train_lm
    monkeypatch.setattr(train, "train_lm", lambda cfg, *a, **k: noises.append(cfg.lm_noise) or train_lm(cfg, *a, **k))
    out = train.world_lm(cfg, tmp_path / "no-corpus-needed")
    assert len(measured) == 4
    fallback = cfg.lm_noise * train.LM_FALLBACK_NOISE
    assert noises == [cfg.lm_noise, fallback] and fallback < cfg.lm_noise  # the second draw, less noise
    assert [d["check"] for d in json.loads((out / "draws.json").read_text())] == [0.55, 0.8]
    saved = GPT.from_pretrained(str(out)).state_dict()
    for name, w in measured[-1].items():  # the second draw's weights at its last check
        assert torch.equal(saved[name], w), name
    printed = capsys.readouterr().out
    assert f"training another (2 of 3) with less embedding noise ({fallback:g} instead of {cfg.lm_noise:g})" in printed
    assert "(3 of 3)" not in printed and "warning" not in printed


def test_few_shot_accuracy_refuses_queries_without_demonstrations():
    from decoder import GPT, GPTConfig
    lm = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    labels = {"train": ["a", "b"] * 3, "valid": ["z"] * 4}
    inputs = {split: [[i] for i in range(len(rows))] for split, rows in labels.items()}
    with pytest.raises(train.UserError, match="no valid utterance has one of the 2 intents with 1 train utterances"):
        train.few_shot_accuracy(lm, None, inputs, labels, ["a", "b"], 2, 1, False, seed=0, n_queries=4,
                                query_split="valid")


def test_micro_world_refuses_training_flags():
    with pytest.raises(train.UserError, match="takes no other flags"):
        train.run_micro_world(["--max-steps", "3"])


def test_tiny_hubert_does_not_depend_on_the_padding_multiple(tmp_path, monkeypatch):
    """WAV_PAD_MULTIPLE is a speed knob: the encoder it trains is the same up to float rounding."""
    from encoder import HuBERT

    cfg = train.WorldConfig.quick()
    weights = []
    for multiple in (1, data.WAV_PAD_MULTIPLE):
        monkeypatch.setenv("SEAL_CACHE", str(tmp_path / str(multiple)))
        monkeypatch.setattr(data, "WAV_PAD_MULTIPLE", multiple)
        out = train.world_hubert(cfg, train.world_corpus(cfg))
        weights.append(HuBERT.from_pretrained(str(out)).state_dict())
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, atol=1e-5, rtol=1e-4, msg=name)


QUICK_LM = ["lm_check_way=2", "lm_check_shots=1", "lm_arbitrary=0", "lm_layers=1", "lm_width=32", "lm_context=128", "lm_steps=24",
            "lm_batch=2", "lm_seq=64"]  # a toy LM and a 2-way natural-label check that the quick corpus can serve


def test_bench_lm_draws_reports_every_check_of_every_draw(tmp_path):
    """bench/bench_lm_draws.py trains the LM stage's draws (seeds 0 and 1,000) in two processes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SEAL_CACHE": str(tmp_path)}
    train_corpus = subprocess.run([sys.executable, "-c", "import train; train.world_corpus(train.WorldConfig.quick())"],
                                  env=env, capture_output=True, text=True)
    assert train_corpus.returncode == 0, train_corpus.stderr
    out = tmp_path / "draws.json"
    args = [a for s in QUICK_LM for a in ("--set", s)]
    run = subprocess.run([sys.executable, "bench/bench_lm_draws.py", "--draws", "2", "--jobs", "2", "--json", str(out),
                          *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["draw"], r["seed"]) for r in results] == [(0, 0), (1, train.LM_DRAW_STRIDE)]
    for r in results:  # LM_CHECKS checks, every 24 // 12 = 2 steps
        assert [s for s, _ in r["checks"]] == list(range(2, 25, 2))
        assert all(0 <= acc <= 1 for _, acc in r["checks"])
    assert "few-shot learners (check at the end >= 75.0%): " in run.stdout and " of 2" in run.stdout
    bad = subprocess.run([sys.executable, "bench/bench_lm_draws.py", "--set", "lm_steps=many"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--set 'lm_steps=many': 'many' is not a valid int" in bad.stderr
    no_hubert = subprocess.run([sys.executable, "bench/bench_lm_draws.py", "--seal"], env=env, capture_output=True,
                               text=True)
    assert no_hubert.returncode != 0 and "no finished tiny HuBERT of this world (no " in no_hubert.stderr
    assert "world.json), which --seal trains" in no_hubert.stderr


def test_bench_lm_draws_summary():
    """The summary's bar is half-way from chance to 100% (62.5% for 4-way), met at the end or not."""
    from bench.bench_lm_draws import summarize

    cfg = train.WorldConfig()
    results = [{"draw": 1, "seed": 1000, "checks": [(250, 0.3), (500, 0.625), (750, 0.5)], "seconds": 9.0},
               {"draw": 0, "seed": 0, "checks": [(250, 0.2), (500, 0.6), (750, 0.94)], "seconds": 10.0}]
    table = summarize(results, cfg)
    assert "| 0 | 0 | 94% | 750 | 10 |" in table.splitlines()[2]  # sorted by draw
    assert "| 1 | 1000 | 50% | 500 | 9 |" in table  # reached the bar at step 500, fell under it by the end
    assert table.endswith("few-shot learners (check at the end >= 62.5%): 1 of 2")
    # with --seal: each draw's Seal as a share of its oracle, and the mean over the learners only
    for r, (oracle, seal) in zip(results, [(0.5, 0.45), (0.8, 0.6)]):
        r["seal"] = {f"{row}, {name}": acc for row, acc in (("text oracle", oracle), ("Seal (KL)", seal))
                     for name in ("arbitrary", "natural")}
    table = summarize(results, cfg)
    assert "| 0 | 0 | 94% | 750 | 10 | 80.0% | 60.0% | 75.0% | 80.0% | 60.0% | 75.0% |" in table.splitlines()[2]
    assert "| 1 | 1000 | 50% | 500 | 9 | 50.0% | 45.0% | 90.0% |" in table
    assert "Seal / text oracle at k = 5, arbitrary labels, over the learners: mean 75.0%, min 75.0%, max 75.0%" in table
