"""train.py end to end on a tiny world: the KL falls, frozen parts stay frozen, resume is exact,
Ctrl-C and NaN are handled, DDP with 2 CPU processes equals one process."""
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_module
from data import write_wav
from decoder import GPT, GPTConfig, bytes_to_unicode
from encoder import HuBERT, HuBERTConfig
from seal import Seal
from train import TrainConfig, build_seal, epoch_batches, lr_at, main, precision_policy

REPO = Path(__file__).resolve().parent.parent
WORDS = ["turn", "on", "off", "the", "lights", "music", "lamp", "kitchen", "bring", "shoes", "up", "down"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: a second thread buys nothing and, on a shared 2-core machine, makes
    # every op wait for a busy core (measured: 65 s -> 23 s for the training test under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_byte_lm(path: Path, block_size: int, g: torch.Generator) -> None:
    """A tiny GPT with a byte-level vocabulary (one token per byte), saved with its tokenizer files."""
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=block_size, vocab_size=256, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # larger weights than GPT-2's init, so that the next-token distributions depend on the context
        lm.wte.weight.normal_(0, 1.0, generator=g)
        for block in lm.h:
            block.attn.c_attn.weight.normal_(0, 0.2, generator=g)
            block.attn.c_proj.weight.normal_(0, 0.2, generator=g)
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    lm.save_pretrained(path, extra_files={"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"})


def repeats_manifest(world: dict, path: Path) -> str:
    """The fixture's clips under 6 transcripts said 4 times each, so that match rows (--match-rows) can be drawn."""
    lines = [json.dumps({"audio": str(world["root"] / f"u{i}.wav"), "text": " ".join(WORDS[i % 6: i % 6 + 3])})
             for i in range(24)]
    path.write_text("\n".join(lines) + "\n")
    return f"manifest:{path}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny LM (byte-level vocabulary), a tiny HuBERT and a manifest of 24 noise 'utterances'."""
    root = tmp_path_factory.mktemp("world")
    g = torch.Generator().manual_seed(0)
    save_byte_lm(root / "lm", 128, g)
    HuBERT(HuBERTConfig.preset("hubert-tiny")).save_pretrained(root / "enc")
    lines = []
    for i in range(24):
        n = int(torch.randint(4000, 8000, (1,), generator=g))
        write_wav(root / f"u{i}.wav", 0.1 * torch.randn(n, generator=g))
        text = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (3,), generator=g).tolist())
        lines.append(json.dumps({"audio": f"u{i}.wav", "text": text}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "lm": str(root / "lm"), "enc": str(root / "enc"), "data": f"manifest:{root / 'manifest.jsonl'}"}


def argv(world: dict, out: Path, *extra: str) -> list[str]:
    # On the CPU even where a GPU is visible: these tests compare against CPU tensors and exact resumes
    # (test_cuda.py runs train() on the GPU, with "--device cuda" among `extra`, which wins).
    return ["--encoder", world["enc"], "--lm", world["lm"], "--data", world["data"], "--out-dir", str(out), "--device", "cpu",
            "--rate", "2", "--projector-hidden", "64", "--batch-size", "8", "--eval-size", "8", "--lr", "3e-3",
            "--warmup-steps", "3", "--no-progress", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_schedule_batches_and_precision():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.55) and lr_at(14, cfg) == pytest.approx(0.1)
    sizes = list(range(100))
    a, b = epoch_batches(sizes, 8, seed=1, epoch=0), epoch_batches(sizes, 8, seed=1, epoch=1)
    assert a == epoch_batches(sizes, 8, seed=1, epoch=0) and a != b
    assert all(len(x) == 8 for x in a) and len({i for x in a for i in x}) == 96
    assert precision_policy(torch.device("cpu")) == (None, False)
    assert precision_policy(torch.device("cpu"), "fp16") == (torch.float16, True)


def test_match_episodes_tie_one_word_to_each_transcript_and_hold_out_the_last_clip():
    groups = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17]]
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    rows = train_module.match_episodes(groups, 20, random.Random(0))
    assert rows == train_module.match_episodes(groups, 20, random.Random(0))  # a pure function of the RNG
    for row in rows:
        *lines, (query, word) = row
        words = {group_of[i]: w for i, w in lines}
        assert len({group_of[i] for i, _ in lines}) == train_module.MATCH_WAY == len(set(words.values()))
        assert all(words[group_of[i]] == w for i, w in lines)  # one word per transcript
        assert words[group_of[query]] == word and query not in {i for i, _ in lines}  # a clip no line uses
        counts = [sum(group_of[i] == g for i, _ in lines) for g in words]
        assert all(1 <= c <= train_module.MATCH_SHOTS for c in counts)


def test_match_rows_need_repeated_transcripts(world, tmp_path, capsys):
    # the fixture's 24 transcripts are all different: nothing to match, a clear error before training
    with pytest.raises(SystemExit):
        main(argv(world, tmp_path / "m", "--match-rows", "1", "--max-steps", "2"))
    assert "--match-rows needs --loss kl and 4 transcripts said in >= 2 clips each" in capsys.readouterr().err
    # with repeated transcripts, but rows of up to 16 clips that cannot fit the LM's 128 positions: refused up front
    with pytest.raises(SystemExit):
        main(argv({**world, "data": repeats_manifest(world, tmp_path / "r.jsonl")}, tmp_path / "m", "--match-rows", "1"))
    assert "--match-rows: a match row (4 transcripts, up to 5 clips each) can take" in capsys.readouterr().err


def test_training_cuts_kl_and_keeps_encoder_and_lm_frozen(world, tmp_path):
    cfg = TrainConfig(**vars(train_module.build_parser().parse_args(argv(world, tmp_path, "--max-steps", "40", "--eval-every", "20"))))
    seal = build_seal(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in [*seal.encoder.state_dict().items(), *seal.decoder.state_dict().items()]}
    train_module.train(cfg, seal=seal)
    after = [*seal.encoder.state_dict().items(), *seal.decoder.state_dict().items()]
    assert all(torch.equal(before[k], v) for k, v in after)
    evals = [r for r in metrics(tmp_path) if "eval_kl" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["eval_kl"] < 0.5 * evals[0]["eval_kl"], evals
    train_losses = [r["loss"] for r in metrics(tmp_path) if "loss" in r]
    assert sum(train_losses[-5:]) < 0.3 * sum(train_losses[:5]), train_losses
    assert (tmp_path / "projector.safetensors").exists() and (tmp_path / "ckpt.pt").exists()


@pytest.mark.slow
def test_compile_gives_the_eager_numbers(world, tmp_path):
    # --compile (torch.compile of the LM and the projector) must not change what is computed: the eval KL
    # before training and after 3 and 6 steps, eager against compiled.
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        main(argv(world, tmp_path / name, "--max-steps", "6", "--eval-every", "3", *extra))
    eager, compiled = ([r["eval_kl"] for r in metrics(tmp_path / n) if "eval_kl" in r] for n in ("eager", "compiled"))
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-3), (eager, compiled)


def test_resume_after_ctrl_c_is_exact(world, tmp_path, monkeypatch, capsys):
    common = ("--max-steps", "20", "--eval-every", "100", "--save-every", "100", "--grad-accum", "2")
    main(argv(world, tmp_path / "straight", *common))

    real_lr_at = train_module.lr_at

    def interrupt_at_10(step, cfg):
        if step == 10:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    monkeypatch.setattr(train_module, "lr_at", interrupt_at_10)
    main(argv(world, tmp_path / "resumed", *common))
    assert "interrupted at step 10" in capsys.readouterr().out
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 10
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    main(argv(world, tmp_path / "resumed", *common, "--resume"))
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for k in a["projector"]:
        assert torch.equal(a["projector"][k], b["projector"][k]), k
    # the optimizer state continued too
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])


def test_nan_stops_and_keeps_last_checkpoint(world, tmp_path, capsys):
    main(argv(world, tmp_path, "--max-steps", "3", "--eval-every", "100", "--save-every", "100"))
    saved = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:  # an absurd learning rate blows the projector up
        main(argv(world, tmp_path, "--max-steps", "30", "--eval-every", "100", "--save-every", "100",
                  "--resume", "--lr", "1e30", "--warmup-steps", "0"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: loss is" in err and "is intact" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == saved


def test_psrt_without_caches_and_projector_reload(world, tmp_path):
    main(argv(world, tmp_path, "--loss", "ce", "--cache", "none", "--no-cache-teacher", "--max-steps", "3",
              "--eval-every", "100"))
    losses = [r["loss"] for r in metrics(tmp_path) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    seal = Seal.from_pretrained(tmp_path / "projector.safetensors")  # what fewshot.py does
    assert seal.config.loss == "ce" and seal.config.encoder == world["enc"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)["projector"]
    assert all(torch.equal(v, seal.projector.state_dict()[k]) for k, v in ckpt.items())


def test_several_lines_per_row_with_matched_norm(world, tmp_path, capsys):
    with pytest.raises(SystemExit):  # 4 lines of bytes do not fit this LM's 128 positions: said, not crashed
        main(argv(world, tmp_path / "long", "--lines", "4", "--max-steps", "1"))
    assert "more than the LM's context of 128" in capsys.readouterr().err
    main(argv(world, tmp_path, "--lines", "2", "--match-embedding-norm", "--max-steps", "30", "--eval-every", "30"))
    evals = [r["eval_kl"] for r in metrics(tmp_path) if "eval_kl" in r]
    assert evals[-1] < 0.7 * evals[0], evals  # the teacher runs every step (its states depend on the row)
    seal = Seal.from_pretrained(tmp_path / "projector.safetensors")
    assert seal.config.lines == 2
    emb_norm = float(seal.decoder.wte.weight.norm(dim=-1).mean())
    assert seal.projector.config.norm == pytest.approx(emb_norm)
    soft, _ = seal.projector(torch.randn(1, 6, seal.projector.config.in_dim))
    torch.testing.assert_close(soft.norm(dim=-1), torch.full((1, 3), emb_norm))
    with pytest.raises(SystemExit):  # resuming with another row layout trains another model
        main(argv(world, tmp_path, "--lines", "1", "--match-embedding-norm", "--max-steps", "40", "--resume"))
    assert "lines=2" in capsys.readouterr().err


def test_train_refuses_a_seal_built_with_other_settings(world, tmp_path):
    cfg = TrainConfig(**vars(train_module.build_parser().parse_args(argv(world, tmp_path, "--max-steps", "1"))))
    seal = build_seal(cfg, torch.device("cpu"))
    for key, value in (("lines", 2), ("temperature", 2.0), ("loss", "ce")):
        with pytest.raises(train_module.UserError, match=f"the given Seal has {key}="):
            train_module.train(dataclasses.replace(cfg, **{key: value}), seal=seal)


def test_continuation_target_is_the_lms_greedy_continuation(world, tmp_path):
    cfg = TrainConfig(**vars(train_module.build_parser().parse_args(
        argv(world, tmp_path, "--target", "continue", "--continue-tokens", "4", "--max-steps", "2", "--eval-every", "100"))))
    seal = build_seal(cfg, torch.device("cpu"))
    examples = train_module.load_data(cfg, seal.tokenizer)
    train_module.train(cfg, seal=seal, examples=examples)
    e = examples[0][3]
    assert len(e.target_ids) == 4 and e.teacher.shape == (4, 32)
    alone = seal.decoder.generate(torch.tensor([e.text_ids + seal.sep_ids]), 4, temperature=0)[0, -4:]
    assert alone.tolist() == e.target_ids


def test_loss_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")  # optional at runtime: without it train.py skips the plot
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_kl": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train_module.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors_exit_2(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv(world, tmp_path, "--resume"))
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    main(argv(world, tmp_path, "--max-steps", "1", "--eval-every", "100"))
    with pytest.raises(SystemExit) as e:  # resuming with another projector
        main(argv(world, tmp_path, "--max-steps", "2", "--rate", "4", "--resume"))
    assert e.value.code == 2 and "rate=2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--encoder", world["enc"]])
    assert e.value.code == 2 and "together" in capsys.readouterr().err
    for spec, message in (("tape:/dev/null", "unknown kind 'tape'"), (f"fsc:{tmp_path}/nowhere", "error: --data"),
                          (f"synthetic:{tmp_path}/nowhere", "python data.py synth")):
        with pytest.raises(SystemExit) as e:
            main(argv(world, tmp_path, "--data", spec))
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # ~35 s on a loaded 2-core machine: three process start-ups with model loading
def test_torchrun_two_cpu_ranks_equal_single_process(world, tmp_path):
    # With match rows (repeated transcripts, an LM whose context holds a match row): the ranks must share them
    # out as they share the batch, with one projector call per backward.
    save_byte_lm(tmp_path / "lm1024", 1024, torch.Generator().manual_seed(0))
    world = {**world, "lm": str(tmp_path / "lm1024"), "data": repeats_manifest(world, tmp_path / "repeats.jsonl")}
    common = argv(world, tmp_path, "--max-steps", "6", "--eval-every", "100", "--save-every", "100", "--match-rows", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = [*common, "--out-dir", str(tmp_path / "single")]
    subprocess.run([sys.executable, str(REPO / "train.py"), *single], check=True, env=env, timeout=300)
    ddp = [*common, "--out-dir", str(tmp_path / "ddp"), "--cache", "disk"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(REPO / "train.py"), *ddp], check=True, env=env, timeout=300)
    a = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["projector"]
    ddp_state = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    checksums = ddp_state["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both ranks hold the same weights
    b = ddp_state["projector"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
