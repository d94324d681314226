"""Tests for encoder.py: parity with transformers' HubertModel on real-format checkpoints, padding
invariance, frame arithmetic and clear errors. transformers is only the test oracle here."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import HubertConfig, HubertForCTC, HubertModel, Wav2Vec2FeatureExtractor

from encoder import (HOP_LENGTH, RECEPTIVE_FIELD, SAMPLE_RATE, HuBERT, HuBERTConfig, conv_out_length,
                     convert_hf_state_dict, main)

TOL = 1e-4  # max abs difference allowed against transformers in fp32
# A hubert-large layout at full width but only 2 layers keeps the default suite fast; the full depth is @slow.
LARGE_2L = dataclasses.replace(HuBERTConfig.preset("hubert-large"), n_layer=2)


def hf_model(config: HuBERTConfig, cls=HubertModel, **extra) -> torch.nn.Module:
    """transformers' model at our config, with random weights that make every parameter matter."""
    model = cls(HubertConfig(**config.to_hf(), **extra, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "original0" in name:  # weight-norm g initializes to ||v||, which would make W = v: break that
                p.uniform_(0.5, 2.0)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def save_checkpoint(model: torch.nn.Module, directory, naming: str, fmt: str, preprocessor: dict | None = None):
    """Write config.json + weights the way hub repos hold them. transformers 5 names the weight-norm pair
    parametrizations.weight.original0/1; the 2021 pytorch_model.bin of facebook/hubert-base-ls960 says
    weight_g/weight_v, so `naming="legacy"` renames the keys by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if naming == "legacy":
        state_dict = {k.replace("parametrizations.weight.original0", "weight_g")
                       .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state_dict.items()}
    assert any(("weight_g" if naming == "legacy" else "original0") in k for k in state_dict)
    if fmt == "bin":
        torch.save(state_dict, directory / "pytorch_model.bin")
    else:
        save_file(state_dict, directory / "model.safetensors")
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


def load(path, **kwargs) -> HuBERT:
    with pytest.warns(UserWarning, match="masked_spec_embed"):  # every HubertModel checkpoint carries it
        return HuBERT.from_pretrained(str(path), **kwargs)


def padded_batch(lengths: list[int]) -> torch.Tensor:
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = 0.1 * torch.randn(n)
    return wav


# -----------------------------------------------------------------------------
# Parity with transformers on checkpoint files

INPUT_SECONDS = (1.0, 3.7)


@pytest.fixture(scope="module", params=["hubert-base", "hubert-large-2-layers"])
def reference(request):
    """(transformers model, inputs, its last hidden states) for one layout, shared by the file-format tests."""
    torch.manual_seed(0)
    model = hf_model(HuBERTConfig.preset("hubert-base") if request.param == "hubert-base" else LARGE_2L)
    wavs = [0.1 * torch.randn(1, int(s * SAMPLE_RATE)) for s in INPUT_SECONDS]
    with torch.no_grad():
        outputs = [model(w).last_hidden_state for w in wavs]
    return model, wavs, outputs


@pytest.mark.parametrize("naming", ["legacy", "parametrizations"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_parity_with_transformers_checkpoint_files(reference, naming, fmt, tmp_path):
    hf, wavs, outputs = reference
    model = load(save_checkpoint(hf, tmp_path / "ckpt", naming, fmt))
    assert not model.training
    with torch.no_grad():
        for wav, expected in zip(wavs, outputs):
            hidden, frame_lengths = model(wav)
            assert hidden.shape == expected.shape
            assert frame_lengths.tolist() == [expected.size(1)]
            assert (hidden - expected).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["legacy", "parametrizations"])
def test_parity_full_hubert_large(naming, tmp_path):
    hf = hf_model(HuBERTConfig.preset("hubert-large"))
    model = load(save_checkpoint(hf, tmp_path / "large", naming, "safetensors" if naming == "legacy" else "bin"))
    with torch.no_grad():
        for seconds in INPUT_SECONDS:
            wav = 0.1 * torch.randn(1, int(seconds * SAMPLE_RATE))
            assert (model(wav)[0] - hf(wav).last_hidden_state).abs().max().item() <= TOL


def test_hidden_states_match_transformers():
    config = dataclasses.replace(HuBERTConfig.preset("hubert-tiny"), n_layer=3)
    for layout in (config, dataclasses.replace(config, pre_ln=True, extractor_norm="layer", conv_bias=True)):
        hf = hf_model(layout)
        model = HuBERT(layout).eval()
        model.load_hf_state_dict(hf.state_dict())
        wav = 0.1 * torch.randn(2, 8000)
        with torch.no_grad():
            hidden, _, states = model(wav, output_hidden_states=True)
            expected = hf(wav, output_hidden_states=True)
        assert len(states) == layout.n_layer + 1 and states[-1] is hidden
        for ours, theirs in zip(states[:-1], expected.hidden_states[:-1]):
            assert (ours - theirs).abs().max().item() <= TOL
        # transformers 5 returns the pre-LN model's last layer before its final LayerNorm; we return `hidden`
        assert (states[-1] - expected.last_hidden_state).abs().max().item() <= TOL


def test_ctc_checkpoint_loads_and_names_what_it_ignored(tmp_path):
    config = HuBERTConfig.preset("hubert-tiny")
    ctc = hf_model(config, cls=HubertForCTC, vocab_size=32)
    assert any(k.startswith("hubert.") for k in ctc.state_dict()) and "lm_head.weight" in ctc.state_dict()
    save_checkpoint(ctc, tmp_path / "ctc", "legacy", "bin")
    with pytest.warns(UserWarning, match="ignored 3 entries") as record:
        model = HuBERT.from_pretrained(str(tmp_path / "ctc"))
    message = str(record[0].message)
    assert all(s in message for s in ("CTC", "lm_head.weight", "lm_head.bias", "hubert.masked_spec_embed"))
    wav = 0.1 * torch.randn(1, 12345)
    with torch.no_grad():
        assert (model(wav)[0] - ctc.hubert(wav).last_hidden_state).abs().max().item() <= TOL


def test_preprocessor_do_normalize_matches_transformers_feature_extractor(tmp_path):
    hf = hf_model(HuBERTConfig.preset("hubert-tiny"))
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    preprocessor = {"do_normalize": True, "sampling_rate": 16000, "feature_extractor_type": "Wav2Vec2FeatureExtractor"}
    model = load(save_checkpoint(hf, tmp_path / "norm", "parametrizations", "safetensors", preprocessor))
    assert model.config.do_normalize
    wav = 0.3 + 0.05 * torch.randn(1, 7001)  # a DC offset and a small scale, both removed by the normalization
    inputs = extractor(wav[0].numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = hf(inputs.input_values).last_hidden_state
        assert (model(wav)[0] - expected).abs().max().item() <= TOL
    # normalized over the valid samples only: padding changes nothing
    lengths = [7001, 4000, 2500]
    batch = padded_batch(lengths) + 0.3
    with torch.no_grad():
        hidden, frames = model(batch, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            alone, _ = model(batch[i:i + 1, :n])
            assert (hidden[i, :frames[i]] - alone[0]).abs().max().item() <= TOL


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path):
    model = HuBERT(HuBERTConfig.preset("hubert-tiny")).eval()
    model.save_pretrained(tmp_path / "tiny")
    reloaded = HuBERT.from_pretrained(str(tmp_path / "tiny"))
    theirs = HubertModel.from_pretrained(tmp_path / "tiny").eval()
    wav = 0.1 * torch.randn(1, 9000)
    with torch.no_grad():
        hidden = model(wav)[0]
        assert torch.equal(reloaded(wav)[0], hidden)
        assert (theirs(wav).last_hidden_state - hidden).abs().max().item() <= TOL


def test_names_resolve_through_the_seal_cache_and_an_offline_hf_cache(tmp_path, monkeypatch):
    """"hubert-base" is an alias of facebook/hubert-base-ls960, found in an existing HF cache; a bare name is
    looked up in the Seal cache, where the micro world saves its models."""
    tiny = HuBERT(HuBERTConfig.preset("hubert-tiny"))
    repo = tmp_path / "hf" / "models--facebook--hubert-base-ls960"
    tiny.save_pretrained(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    small = HuBERT(dataclasses.replace(HuBERTConfig.preset("hubert-tiny"), n_layer=1))
    small.save_pretrained(tmp_path / "seal" / "tiny-hubert")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path / "seal"))
    monkeypatch.chdir(tmp_path)
    assert HuBERT.from_pretrained("hubert-base").config == tiny.config
    assert HuBERT.from_pretrained("tiny-hubert").config.n_layer == 1


# -----------------------------------------------------------------------------
# Padding never leaks into real frames


@pytest.mark.parametrize("layout", ["hubert-base", "hubert-large-2-layers"])
def test_padded_batch_equals_each_item_alone(layout):
    config = HuBERTConfig.preset("hubert-base") if layout == "hubert-base" else LARGE_2L
    model = HuBERT(config).eval()
    lengths = [12_000, 8_001, 4_777]  # 0.75 s, 0.50 s, 0.30 s
    wav = 5.0 * torch.randn(3, max(lengths))  # loud garbage in the padding: it must be ignored, not merely zero
    for i, n in enumerate(lengths):
        wav[i, :n] = 0.1 * torch.randn(n)
    with torch.no_grad():
        hidden, frame_lengths, states = model(wav, torch.tensor(lengths), output_hidden_states=True)
        assert frame_lengths.tolist() == [model.frame_lengths(n) for n in lengths]
        for i, n in enumerate(lengths):
            alone, alone_frames = model(wav[i:i + 1, :n])
            t = alone_frames.item()
            assert (hidden[i, :t] - alone[0]).abs().max().item() <= TOL
            assert torch.all(hidden[i, t:] == 0) and all(torch.all(h[i, t:] == 0) for h in states)


def test_padding_leaks_through_an_unmasked_group_norm():
    """Why masked_instance_norm exists: transformers' hubert-base gives a different answer once padded."""
    hf = hf_model(HuBERTConfig.preset("hubert-tiny"))
    wav = padded_batch([8000, 5000])
    mask = (torch.arange(8000) < torch.tensor([[8000], [5000]])).long()
    with torch.no_grad():
        padded = hf(wav, attention_mask=mask).last_hidden_state[1, :15]
        alone = hf(wav[1:, :5000]).last_hidden_state[0]
    assert (padded - alone).abs().max().item() > 1e-2


# -----------------------------------------------------------------------------
# Frame arithmetic


def test_frame_counts():
    config = HuBERTConfig.preset("hubert-base")
    assert (config.hop_length, config.receptive_field) == (HOP_LENGTH, RECEPTIVE_FIELD) == (320, 400)
    model = HuBERT(HuBERTConfig.preset("hubert-tiny")).eval()
    assert model.frame_lengths(SAMPLE_RATE) == 49
    odd = torch.tensor([400, 401, 719, 720, 1001, 3333, 16_001, 22_222, 48_319])
    formula = model.frame_lengths(odd)
    hf_formula = HubertModel._get_feat_extract_output_lengths(SimpleNamespace(config=HubertConfig()), odd)
    assert torch.equal(formula, hf_formula)
    with torch.no_grad():
        for n, t in zip(odd.tolist(), formula.tolist()):
            features, _ = model.feature_extractor(torch.randn(1, n), torch.tensor([n]))
            assert features.size(-1) == t == (n - RECEPTIVE_FIELD) // HOP_LENGTH + 1


def test_receptive_field_is_400_samples():
    """Frame 0 of the (per-frame normalized) extractor depends on samples 0..399 and no other."""
    config = dataclasses.replace(HuBERTConfig.preset("hubert-tiny"), extractor_norm="layer", conv_bias=True)
    extractor = HuBERT(config).feature_extractor
    wav = torch.randn(1, 1000)
    with torch.no_grad():
        base = extractor(wav, torch.tensor([1000]))[0][..., 0]
        for sample, changes in ((0, True), (399, True), (400, False)):
            poked = wav.clone()
            poked[0, sample] += 1.0
            assert (extractor(poked, torch.tensor([1000]))[0][..., 0] != base).any().item() == changes


def test_conv_out_length_on_ints_and_tensors():
    assert conv_out_length(10, 10, 5) == 1 and conv_out_length(14, 10, 5) == 1 and conv_out_length(15, 10, 5) == 2
    assert conv_out_length(torch.tensor([14, 15]), 10, 5).tolist() == [1, 2]


# -----------------------------------------------------------------------------
# Configs


def test_config_hf_round_trip_and_presets_match_transformers_defaults():
    for name in ("hubert-base", "hubert-large", "hubert-tiny", "hubert-small"):
        config = HuBERTConfig.preset(name)
        assert HuBERTConfig.from_hf(config.to_hf()) == config
    # transformers' defaults are facebook/hubert-base-ls960; the large repos change these keys
    assert HuBERTConfig.from_hf(HubertConfig().to_dict()) == HuBERTConfig.preset("hubert-base")
    large = HubertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    assert HuBERTConfig.from_hf(large.to_dict()) == HuBERTConfig.preset("hubert-large")
    assert HuBERTConfig.from_hf({}, {"do_normalize": True}).do_normalize


def test_config_errors():
    with pytest.raises(ValueError, match="unknown HuBERT preset 'hubert-huge'"):
        HuBERTConfig.preset("hubert-huge")
    with pytest.raises(ValueError, match="model_type='wav2vec2'"):
        HuBERTConfig.from_hf({"model_type": "wav2vec2"})
    with pytest.raises(ValueError, match="conv_pos_batch_norm=True is not supported"):
        HuBERTConfig.from_hf({"conv_pos_batch_norm": True})
    with pytest.raises(ValueError, match="sampling_rate=8000"):
        HuBERTConfig.from_hf({}, {"sampling_rate": 8000})
    with pytest.raises(ValueError, match="one entry per conv layer"):
        HuBERTConfig(conv_kernel=(10, 3))


# -----------------------------------------------------------------------------
# Clear errors on bad input and bad checkpoints


def test_input_errors():
    model = HuBERT(HuBERTConfig.preset("hubert-tiny")).eval()
    with pytest.raises(ValueError, match=r"fewer than the 400-sample receptive field \(25 ms"):
        model(torch.randn(1, 399))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have \[300\] samples"):
        model(torch.randn(2, 1000), torch.tensor([1000, 300]))
    with pytest.raises(ValueError, match=r"\(batch, samples\) tensor, got \(16000,\); for one utterance use wav"):
        model(torch.randn(16000))
    with pytest.raises(ValueError, match=r"got \(1, 1, 16000\)"):
        model(torch.randn(1, 1, 16000))
    with pytest.raises(TypeError, match="got dtype torch.int16"):
        model(torch.zeros(1, 16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="exceed the 1000 samples"):
        model(torch.randn(1, 1000), torch.tensor([1001]))
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        model(torch.randn(2, 1000), torch.tensor([1000]))
    with pytest.raises(ValueError, match="masked_pretraining=True"):
        model(torch.randn(1, 1000), mask_time_indices=torch.ones(1, 2, dtype=torch.bool))


def test_checkpoint_errors_name_the_keys():
    model = HuBERT(HuBERTConfig.preset("hubert-tiny"))
    good = hf_model(HuBERTConfig.preset("hubert-tiny")).state_dict()
    missing = {k: v for k, v in good.items() if k != "encoder.layers.1.attention.k_proj.bias"}
    with pytest.raises(ValueError, match=r"ckpt.bin does not fit[\s\S]*missing keys \(1\): encoder.layers.1.attention"
                                         r".k_proj.bias"):
        model.load_hf_state_dict(missing, source="ckpt.bin")
    wrong = dict(good, **{"feature_projection.projection.weight": torch.zeros(64, 31)})
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): feature_projection.projection.weight: "
                                         r"expected \(64, 32\), got \(64, 31\)"):
        model.load_hf_state_dict(wrong)
    extra = dict(good, **{"encoder.layers.2.layer_norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): encoder.layers.2.layer_norm.weight"):
        model.load_hf_state_dict(extra)


def test_convert_hf_state_dict_renames_and_ignores():
    sd = {"hubert.encoder.pos_conv_embed.conv.parametrizations.weight.original0": torch.ones(1),
          "hubert.encoder.pos_conv_embed.conv.weight_v": torch.ones(1), "hubert.masked_spec_embed": torch.ones(1),
          "lm_head.weight": torch.ones(1), "label_embs_concat": torch.ones(1), "final_proj.bias": torch.ones(1)}
    converted, ignored = convert_hf_state_dict(sd)
    assert sorted(converted) == ["encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v"]
    assert ignored == ["hubert.masked_spec_embed", "lm_head.weight", "label_embs_concat", "final_proj.bias"]
    assert "masked_spec_embed" in convert_hf_state_dict(sd, keep_masked_spec_embed=True)[0]


# -----------------------------------------------------------------------------
# Masked pre-training hook


def test_mask_time_indices_matches_transformers_and_trains_the_mask_embedding():
    config = HuBERTConfig.preset("hubert-tiny")
    hf = hf_model(config)
    model = HuBERT(config, masked_pretraining=True)
    assert model.load_hf_state_dict(hf.state_dict()) == []
    wav = 0.1 * torch.randn(2, 8000)
    mask = torch.zeros(2, model.frame_lengths(8000), dtype=torch.bool)
    mask[0, 3:8] = mask[1, 10:20] = True
    with torch.no_grad():
        expected = hf(wav, mask_time_indices=mask).last_hidden_state
    hidden, _ = model(wav, mask_time_indices=mask)
    assert (hidden - expected).abs().max().item() <= TOL
    with pytest.raises(ValueError, match=r"mask_time_indices must be bool \(2, 24\)"):
        model(wav, mask_time_indices=mask[:, :-1])
    hidden.square().mean().backward()
    assert model.masked_spec_embed.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# Command line


def test_cli_prints_frames_and_statistics(tmp_path, capsys):
    import data

    HuBERT(HuBERTConfig.preset("hubert-tiny")).save_pretrained(tmp_path / "tiny")
    data.write_wav(tmp_path / "a.wav", 0.1 * torch.randn(SAMPLE_RATE))
    assert main(["--encoder", str(tmp_path / "tiny"), "--wav", str(tmp_path / "a.wav")]) == 0
    out = capsys.readouterr().out
    assert "16000 samples (1.00 s) -> 49 frames of 64 dims" in out and "std" in out
    assert main(["--encoder", str(tmp_path / "tiny"), "--wav", str(tmp_path / "missing.wav")]) == 2
    assert "error:" in capsys.readouterr().err
