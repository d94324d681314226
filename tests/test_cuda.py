"""The CUDA paths: autocast (bf16, fp16) against fp32, train() with the fused AdamW, the GradScaler and
torch.compile, few-shot scoring on the GPU against the CPU, the tiny LM's training there (bench_lm_draws.py), and
--deterministic runs that repeat bit for bit.
Skipped without a GPU, so CI (CPU only) skips them; run them with `python -m pytest tests/test_cuda.py` on a
machine that has one."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fewshot
from fewshot import FewShot, RunConfig
from seal import Seal
from test_fewshot import speech_world  # noqa: F401  (a random tiny Seal with word-level text)
from test_train import REPO, argv, metrics, world  # noqa: F401  (a tiny LM, HuBERT and noise manifest on disk)
from test_world import quick_world  # noqa: F401  (the toy-sized micro world, built on the CPU)
from train import TrainConfig, autocast, batch_features, build_seal, load_data, main, precision_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture
def exact_fp32():
    """fp32 on the GPU as on the CPU: no TF32 in matmuls and convolutions (cuDNN allows it by default)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_precision_policy_on_cuda():
    dtype, scaler = precision_policy(CUDA)  # auto
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert scaler == (dtype == torch.float16)  # only fp16 needs loss scaling
    assert precision_policy(CUDA, "fp16") == (torch.float16, True)
    assert precision_policy(CUDA, "fp32") == (None, False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_seal_loss_under_autocast_is_close_to_fp32(world, precision, exact_fp32):
    # One batch, one Seal: the KL and the projector's gradient under autocast on the GPU against fp32 on the CPU.
    cfg = TrainConfig(encoder=world["enc"], lm=world["lm"], data=world["data"], rate=2, projector_hidden=64)
    seal = build_seal(cfg, torch.device("cpu"))
    batch = load_data(cfg, seal.tokenizer)[0][:8]
    texts = [e.text_ids for e in batch]

    def loss_and_grad(device: torch.device, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
        seal.to(device).zero_grad(set_to_none=True)
        with autocast(device, dtype):
            feats, lengths = batch_features(seal, batch, device)
            loss, _ = seal.loss(feats, lengths, texts)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten().float().cpu() for p in seal.projector_module.parameters()])

    ref_loss, ref_grad = loss_and_grad(torch.device("cpu"), None)
    loss, grad = loss_and_grad(CUDA, precision_policy(CUDA, precision)[0])
    assert ref_loss > 0.1  # a random projector: far from the teacher, so the comparison means something
    assert loss == pytest.approx(ref_loss, rel=0.03)
    assert F.cosine_similarity(grad, ref_grad, dim=0) > 0.99


def test_train_on_cuda_in_each_precision(world, tmp_path):
    # The same short run in fp32, bf16 and fp16 (GradScaler): the KL falls as on the CPU, the three land close,
    # the optimizer is the fused AdamW, the scaler is on for fp16 only, resume works, the projector loads on the CPU.
    final = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        main(argv(world, out, "--device", "cuda", "--precision", precision, "--max-steps", "40", "--eval-every", "20"))
        evals = [r for r in metrics(out) if "eval_kl" in r]
        assert [r["step"] for r in evals] == [0, 20, 40]
        assert evals[-1]["eval_kl"] < 0.5 * evals[0]["eval_kl"], (precision, evals)
        final[precision] = evals[-1]["eval_kl"]
        state = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        assert all(group["fused"] for group in state["optimizer"]["param_groups"])
        if precision == "fp16":
            assert 0 < state["scaler"]["scale"] < float("inf")
        else:
            assert state["scaler"] == {}  # a disabled GradScaler saves nothing
        main(argv(world, out, "--device", "cuda", "--precision", precision, "--max-steps", "50", "--eval-every", "20",
                  "--resume"))
        assert [r["step"] for r in metrics(out) if "loss" in r][-1] == 50
        seal = Seal.from_pretrained(out / "projector.safetensors")  # as fewshot.py loads it, on the CPU
        assert all(p.device.type == "cpu" for p in seal.parameters())
    for precision in ("bf16", "fp16"):
        assert final[precision] == pytest.approx(final["fp32"], rel=0.25), final


def test_compile_on_cuda_gives_the_eager_numbers(world, tmp_path):
    # --compile on the GPU in bf16: the eval KL before training and after 3 and 6 steps, eager against compiled
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        main(argv(world, tmp_path / name, "--device", "cuda", "--precision", "bf16", "--max-steps", "6",
                  "--eval-every", "3", *extra))
    eager, compiled = ([r["eval_kl"] for r in metrics(tmp_path / n) if "eval_kl" in r] for n in ("eager", "compiled"))
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=0.03), (eager, compiled)


def test_fewshot_on_cuda_predicts_as_on_cpu(speech_world, exact_fp32):  # noqa: F811
    # The whole few-shot path (speech bank, KATE features, batched scorer, calibration) on the GPU, fp32.
    seal = copy.deepcopy(speech_world.seal).to(CUDA)
    gpu = FewShot(seal.decoder, speech_world.tokenizer, speech_world.train, speech_world.test, seal=seal)
    for config in (RunConfig(k=2, mode="speech", select="kate", batch_size=4),
                   RunConfig(k=2, mode="speech", select="random", calibrate=True, batch_size=3),
                   RunConfig(k=2, mode="text", batch_size=4)):
        on_cpu, on_gpu = speech_world.run(config, seed=1), gpu.run(config, seed=1)
        assert on_gpu["predictions"] == on_cpu["predictions"], config
        assert on_gpu["demos"] == on_cpu["demos"], config
    ids = list(range(len(speech_world.train)))
    cpu_bank, gpu_bank = fewshot.SpeechBank(speech_world.seal, speech_world.train), fewshot.SpeechBank(seal, gpu.train)
    for a, b in zip(cpu_bank.soft_tokens(ids), gpu_bank.soft_tokens(ids)):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3)


def test_tiny_lm_draw_on_cuda_matches_the_cpu_without_noise(tmp_path, exact_fp32):
    """train.train_lm on the GPU (bench/bench_lm_draws.py --device cuda): the initialization and the documents
    are drawn on the CPU, so with the embedding noise off the GPU trains the CPU's draw, to rounding."""
    import dataclasses

    import train

    cfg = dataclasses.replace(train.WorldConfig.quick(), lm_steps=5, lm_noise=0.0)
    tok = train.world_tokenizer(cfg, tmp_path)
    devices = []

    def check(lm):
        devices.append(lm.wte.weight.device.type)
        return 0.5

    cpu, _ = train.train_lm(cfg, tok, check, draw=1, progress=False)
    gpu, _ = train.train_lm(cfg, tok, check, draw=1, device=CUDA, progress=False)
    assert devices == ["cpu"] * 5 + ["cuda"] * 5
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3, msg=name)


def test_tiny_lm_draw_repeats_on_cuda_with_deterministic_kernels():
    """With train.make_deterministic, as bench/bench_lm_draws.py's workers train, a draw of the tiny LM repeats on the
    GPU bit for bit: on an H200, two runs without it differed after 60 steps. A fresh interpreter, as a worker is:
    cuBLAS reads its workspace setting once."""
    script = """
import dataclasses, tempfile
from pathlib import Path
import torch
import train
train.make_deterministic(torch.device("cuda"))
cfg = dataclasses.replace(train.WorldConfig(), lm_steps=60)
with tempfile.TemporaryDirectory() as folder:
    tok = train.world_tokenizer(cfg, Path(folder))
a, b = (train.train_lm(cfg, tok, lambda lm: 0.0, draw=1, device="cuda", progress=False)[0].state_dict() for _ in "ab")
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
print("repeated")
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "repeated" in run.stdout, run.stderr[-3000:]


def projector_weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["projector"]


def test_train_repeats_bit_for_bit_on_cuda_with_deterministic(world, tmp_path):  # noqa: F811
    """`train.py --deterministic`: two runs on the GPU train the same projector bit for bit, in each precision, with
    rows like the micro world's (several lines, soft tokens at the embedding norm, a KL temperature). Each run is a
    command in a fresh interpreter, as a user's is: cuBLAS reads its workspace setting once. What fails here is an
    op of training that has no deterministic kernel (torch raises then) or a run that does not repeat; this toy
    world's runs repeated on an H200 without --deterministic too (measured), so it cannot show that they need it."""
    for precision in ("fp32", "bf16", "fp16"):
        runs = []
        for name in ("a", "b"):
            out = tmp_path / f"{precision}-{name}"
            flags = argv(world, out, "--device", "cuda", "--precision", precision, "--deterministic", "--lines", "2",
                         "--match-embedding-norm", "--temperature", "2", "--max-steps", "30", "--eval-every", "30")
            done = subprocess.run([sys.executable, "train.py", *flags], cwd=REPO, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            runs.append(projector_weights(out / "ckpt.pt"))
        a, b = runs
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), precision


def test_bench_lm_draws_seal_repeats_on_cuda(quick_world, monkeypatch, tmp_path):  # noqa: F811
    """bench/bench_lm_draws.py --seal --device cuda, twice on the toy world: the same LM, projector and cells, bit for
    bit. Its workers train with deterministic kernels, and each is a fresh process."""
    import train
    from bench.bench_lm_draws import main as bench_lm_draws

    monkeypatch.setenv("SEAL_CACHE", str(quick_world["cache"]))
    results, weights = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        (result,) = bench_lm_draws(["--ids", "2", "--jobs", "1", "--seal", "--device", "cuda", "--out", str(out),
                                    "--set", "lm_steps=24"], base=train.WorldConfig.quick())
        results.append({key: result[key] for key in ("checks", "seal")})
        seal = Seal.from_pretrained(out / "draw2" / "seal-fsc" / train.PROJECTOR_NAME)
        weights.append(seal.state_dict())  # the draw's LM and the projector trained on it
    assert results[0] == results[1]
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
