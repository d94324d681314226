"""
HuBERT: the frozen speech encoder of Seal, in plain PyTorch.

Seal turns speech into something a text language model can read. The first step is this file: a
self-supervised speech encoder that maps a raw 16 kHz waveform to one feature vector every 20 ms.
HuBERT (Hsu et al., 2021, "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction
of Hidden Units") was pre-trained by hiding spans of its input and predicting cluster labels of the
hidden frames, so its features carry phonetic content; Seal keeps it frozen and trains only a projector
on top (projector.py).

The model, in the order the waveform flows through it (shapes for hubert-base, B utterances):

  wav (B, S) float samples at 16 kHz, values roughly in [-1, 1]
   |  [optional] zero-mean, unit-variance per utterance (when preprocessor_config.json says `do_normalize`)
   v
  1. Feature extractor: 7 strided 1-D convolutions (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2; 512
     channels; GELU). The strides multiply to HOP_LENGTH = 320 samples = 20 ms, and one output frame sees
     RECEPTIVE_FIELD = 400 samples = 25 ms of audio: 16,000 samples (1 s) give 49 frames.      (B, 512, T)
     hubert-base normalizes only after conv 0, with a GroupNorm of one group per channel, i.e. each
     channel is standardized over *time*; hubert-large puts a LayerNorm (over channels, per frame) after
     every conv instead.
  2. Feature projection: LayerNorm(512) -> Linear(512, 768).                                   (B, T, 768)
  3. Convolutional positional embedding: instead of a table of positions, a wide grouped convolution
     (kernel 128, 16 groups, "same" padding) looks at +-64 neighbouring frames and its GELU output is added
     to the frames. Its weight is weight-normalized: W = g * v / ||v||, stored as the pair (g, v).
  4. Transformer encoder: 12 bidirectional self-attention layers (768 wide, 12 heads, feed-forward 3072).
     hubert-base is post-LN (LayerNorm after each residual add, and once before the first layer);
     hubert-large is "stable" pre-LN (LayerNorm before each sub-layer, and once after the last layer).
                                                                                               (B, T, 768)

Variable-length batches. A batch pads short utterances with zeros up to the longest one. Padding must
not change what a real frame sees, so that a padded batch gives exactly what each utterance gives alone:
  - the valid length of every row is threaded through every conv (valid output frames of a convolution
    without padding only read valid input samples);
  - hubert-base's GroupNorm averages over time, so its statistics are taken over the valid frames only;
  - padded frames are zeroed before the positional convolution (an utterance alone sees zeros past its end);
  - attention gets a key padding mask, so no real frame attends to a padded one.
Padded frames of the output are set to zero, and `frame_lengths` says how many frames of each row are real.

Weights load from the Hugging Face checkpoints (facebook/hubert-base-ls960, facebook/hubert-large-ll60k,
fine-tuned CTC checkpoints) through `HuBERT.from_pretrained`, which names anything it skips or misses.

The end of the file holds HuBERT's own pre-training pieces (k-means "hidden units", span masking, the
masked-prediction loss), with which the micro world (train.py) pre-trains a tiny HuBERT from scratch.

    python encoder.py --encoder hubert-base --wav speech.wav
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoder import load_checkpoint, save_pretrained  # checkpoint files: safetensors, .bin, hub cache

SAMPLE_RATE = 16_000      # Hz: every HuBERT checkpoint expects 16 kHz mono audio
HOP_LENGTH = 320          # samples between frames = 5 * 2**6, the product of the conv strides (20 ms)
RECEPTIVE_FIELD = 400     # samples one frame sees = 1 + sum_i (kernel_i - 1) * (stride_0 * ... * stride_{i-1}) (25 ms)
FRAME_RATE = SAMPLE_RATE // HOP_LENGTH  # 50 frames per second
NORMALIZE_EPS = 1e-7      # variance floor of the per-utterance normalization (as in transformers' feature extractor)

# Short names for the checkpoints on the Hugging Face hub (the preset of the same name is their architecture).
ALIASES = {
    "hubert-base": "facebook/hubert-base-ls960",    # 95M parameters, pre-trained on LibriSpeech 960 h
    "hubert-large": "facebook/hubert-large-ll60k",  # 316M parameters, pre-trained on Libri-Light 60k h
}

# Checkpoint entries of heads this encoder does not use. They are skipped and named in a warning.
IGNORED_HEADS = {
    "lm_head.": "CTC output layer of a fine-tuned ASR checkpoint (HubertForCTC)",
    "final_proj.": "pre-training projection onto the cluster-label space",
    "label_embs_concat": "pre-training cluster-label embeddings",
    "projector.": "HubertForSequenceClassification head",
    "classifier.": "HubertForSequenceClassification head",
    "layer_weights": "HubertForSequenceClassification layer weights",
    "masked_spec_embed": "vector that replaces masked frames, used only in masked pre-training",
}


# -----------------------------------------------------------------------------
# Configuration

# Hugging Face `HubertConfig` (config.json) key for each of our fields.
HF_CONFIG_KEYS = dict(
    conv_dim="conv_dim", conv_kernel="conv_kernel", conv_stride="conv_stride", conv_bias="conv_bias",
    extractor_norm="feat_extract_norm", feat_proj_layer_norm="feat_proj_layer_norm",
    pos_conv_kernel="num_conv_pos_embeddings", pos_conv_groups="num_conv_pos_embedding_groups",
    n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads", n_inner="intermediate_size",
    pre_ln="do_stable_layer_norm", layer_norm_eps="layer_norm_eps",
)


@dataclass
class HuBERTConfig:
    """Architecture of a HuBERT model; the defaults are hubert-base (facebook/hubert-base-ls960)."""

    # feature extractor: one entry per conv layer
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    extractor_norm: str = "group"  # "group": GroupNorm after conv 0 only; "layer": LayerNorm after every conv
    feat_proj_layer_norm: bool = True  # LayerNorm before the feature projection
    # positional convolution
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    # transformer
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072  # feed-forward width
    pre_ln: bool = False  # False: post-LN (hubert-base); True: pre-LN "stable layer norm" (hubert-large)
    layer_norm_eps: float = 1e-5
    # input preprocessing (from preprocessor_config.json, not config.json)
    do_normalize: bool = False  # zero-mean, unit-variance per utterance before the extractor

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (
            tuple(self.conv_dim), tuple(self.conv_kernel), tuple(self.conv_stride))
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(f"conv_dim, conv_kernel and conv_stride need one entry per conv layer; got lengths "
                             f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}")
        if self.extractor_norm not in ("group", "layer"):
            raise ValueError(f"extractor_norm must be 'group' or 'layer', got {self.extractor_norm!r}")
        if self.n_embd % self.n_head or self.n_embd % self.pos_conv_groups:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             f"and by pos_conv_groups={self.pos_conv_groups}")

    @property
    def hop_length(self) -> int:
        """Samples between consecutive frames: the product of the strides (320 for every preset)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples that one output frame depends on, the shortest input that gives a frame (400)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @classmethod
    def preset(cls, name: str) -> HuBERTConfig:
        presets = {
            "hubert-base": dict(),
            "hubert-large": dict(conv_bias=True, extractor_norm="layer", n_embd=1024, n_layer=24, n_head=16,
                                 n_inner=4096, pre_ln=True),
            # small layouts with the same 20 ms frames, for tests and for the micro world (pre-trainable on a CPU)
            "hubert-tiny": dict(conv_dim=(32,) * 7, pos_conv_kernel=16, pos_conv_groups=4, n_embd=64, n_layer=2,
                                n_head=2, n_inner=128),
            "hubert-small": dict(conv_dim=(128,) * 7, pos_conv_kernel=32, pos_conv_groups=8, n_embd=256, n_layer=4,
                                 n_head=4, n_inner=1024),
        }
        if name not in presets:
            raise ValueError(f"unknown HuBERT preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_hf(cls, config: dict, preprocessor: dict | None = None) -> HuBERTConfig:
        """Build from a Hugging Face config.json dict (and preprocessor_config.json dict, if the repo has one).
        Keys it does not list keep the transformers defaults, which are hubert-base's."""
        if config.get("model_type", "hubert") != "hubert":
            raise ValueError(f"config.json has model_type={config['model_type']!r}; this encoder loads 'hubert'")
        unsupported = {  # options of transformers' HubertModel that no HuBERT checkpoint we target uses
            "hidden_act": ("gelu", config.get("hidden_act", "gelu")),
            "feat_extract_activation": ("gelu", config.get("feat_extract_activation", "gelu")),
            "conv_pos_batch_norm": (False, config.get("conv_pos_batch_norm", False)),
            "adapter_attn_dim": (None, config.get("adapter_attn_dim")),
        }
        for key, (supported, value) in unsupported.items():
            if value != supported:
                raise ValueError(f"config.json: {key}={value!r} is not supported (only {supported!r})")
        fields = {ours: config[theirs] for ours, theirs in HF_CONFIG_KEYS.items() if theirs in config}
        if preprocessor is not None:
            sampling_rate = preprocessor.get("sampling_rate", SAMPLE_RATE)
            if sampling_rate != SAMPLE_RATE:
                raise ValueError(f"preprocessor_config.json: sampling_rate={sampling_rate}, expected {SAMPLE_RATE}")
            fields["do_normalize"] = bool(preprocessor.get("do_normalize", False))
        return cls(**fields)

    def to_hf(self) -> dict:
        """config.json for this model, readable by transformers' HubertConfig / HubertModel."""
        config = {"model_type": "hubert", "architectures": ["HubertModel"], "feat_extract_activation": "gelu",
                  "hidden_act": "gelu", "num_feat_extract_layers": len(self.conv_dim)}
        for ours, theirs in HF_CONFIG_KEYS.items():
            value = getattr(self, ours)
            config[theirs] = list(value) if isinstance(value, tuple) else value
        return config

    def preprocessor_config(self) -> dict:
        """preprocessor_config.json for this model (the input convention of transformers' feature extractor)."""
        return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": SAMPLE_RATE,
                "do_normalize": self.do_normalize, "padding_value": 0.0, "return_attention_mask": True}


# -----------------------------------------------------------------------------
# Building blocks


def conv_out_length(length: int | torch.Tensor, kernel: int, stride: int) -> int | torch.Tensor:
    """Frames out of an unpadded convolution: floor((L - kernel) / stride) + 1 (works on ints and tensors)."""
    return (length - kernel) // stride + 1


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B, size) bool, True on the first lengths[b] positions of row b."""
    return torch.arange(size, device=lengths.device) < lengths[:, None]


def masked_instance_norm(x: torch.Tensor, lengths: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """hubert-base's GroupNorm(C groups, C channels): each channel of each row is standardized over time.
    Over a padded row, nn.GroupNorm would average the padding in too; here the mean and variance of each
    row come from its valid frames only, so the row is normalized exactly as the utterance alone would be.
    x: (B, C, T), lengths: (B,) valid frames per row."""
    if bool((lengths == x.size(-1)).all()):  # no padding in this batch: the plain kernel is exact
        return norm(x)
    stats = [torch.var_mean(x[row, :, :n], dim=-1, correction=0) for row, n in enumerate(lengths.tolist())]
    var, mean = (torch.stack(s)[:, :, None] for s in zip(*stats))  # (B, C, 1) each; biased variance
    scale = norm.weight[:, None] * torch.rsqrt(var + norm.eps)  # (B, C, 1)
    # (x - mean) / sqrt(var + eps) * weight + bias as x * scale + shift: one pass, no temporaries the size of x
    return torch.addcmul(norm.bias[:, None] - mean * scale, x, scale)


class ConvLayer(nn.Module):
    """One feature-extractor layer: Conv1d (no padding) -> optional norm -> GELU. Tracks the valid lengths."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=bias)
        # named layer_norm (even for the GroupNorm) to match the checkpoint keys; eps is the torch default 1e-5
        if norm == "group":
            self.layer_norm = nn.GroupNorm(c_out, c_out)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out)
        else:
            self.layer_norm = None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x)  # (B, C_out, T_out)
        lengths = conv_out_length(lengths, self.conv.kernel_size[0], self.conv.stride[0])
        if isinstance(self.layer_norm, nn.GroupNorm):
            x = masked_instance_norm(x, lengths, self.layer_norm)  # statistics over time: mask the padding
        elif isinstance(self.layer_norm, nn.LayerNorm):
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)  # per frame over channels: padding cannot leak
        return F.gelu(x), lengths


class FeatureExtractor(nn.Module):
    """Waveform (B, S) -> frames (B, conv_dim[-1], T): the strided conv stack."""

    def __init__(self, config: HuBERTConfig):
        super().__init__()
        layers, c_in = [], 1  # the waveform is one input channel
        for i, (c_out, kernel, stride) in enumerate(zip(config.conv_dim, config.conv_kernel, config.conv_stride)):
            # "group": a GroupNorm after conv 0 only; "layer": a LayerNorm after every conv
            norm = config.extractor_norm if config.extractor_norm == "layer" or i == 0 else None
            layers.append(ConvLayer(c_in, c_out, kernel, stride, config.conv_bias, norm))
            c_in = c_out
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = wav[:, None, :]  # (B, 1, S): one input channel
        for layer in self.conv_layers:
            x, lengths = layer(x, lengths)
        return x, lengths  # (B, C, T), (B,)


class FeatureProjection(nn.Module):
    def __init__(self, config: HuBERTConfig):
        super().__init__()
        c = config.conv_dim[-1]
        self.layer_norm = nn.LayerNorm(c, eps=config.layer_norm_eps) if config.feat_proj_layer_norm else nn.Identity()
        self.projection = nn.Linear(c, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))  # (B, T, C_conv) -> (B, T, n_embd)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with "same" padding whose weight is stored weight-normalized, W = g * v / ||v||.

    Weight normalization (Salimans & Kingma, 2016) splits a weight into a direction v and a magnitude g.
    HuBERT normalizes over every dim except dim 2, the kernel tap: ||v|| is one number per tap k,
    sqrt(sum over (out channel, in channel) of v[:, :, k]^2), and g has shape (1, 1, kernel)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups, self.padding = groups, kernel // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))

    @property
    def weight(self) -> torch.Tensor:
        norm = self.weight_v.square().sum(dim=(0, 1), keepdim=True).sqrt()  # (1, 1, kernel)
        return self.weight_g * self.weight_v / norm  # (C, C / groups, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    """Relative position information from a wide convolution over the frames: (B, T, C) -> (B, T, C)."""

    def __init__(self, config: HuBERTConfig):
        super().__init__()
        self.conv = WeightNormConv1d(config.n_embd, config.pos_conv_kernel, config.pos_conv_groups)
        # padding kernel // 2 on both sides yields T + 1 frames for an even kernel: the last one is dropped
        self.n_drop = 1 if config.pos_conv_kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))  # (B, C, T + n_drop)
        y = y[:, :, : y.size(-1) - self.n_drop]  # (B, C, T)
        return F.gelu(y).transpose(1, 2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with a key padding mask."""

    def __init__(self, config: HuBERTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(config.n_embd, config.n_embd) for _ in range(4))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # softmax(q k^T / sqrt(D)) v; attn_mask (B, 1, 1, T) is False on padded keys, which get zero weight
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, config: HuBERTConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(config.n_embd, config.n_inner)
        self.output_dense = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))  # exact (erf) GELU


class EncoderLayer(nn.Module):
    def __init__(self, config: HuBERTConfig):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.attention = Attention(config)
        self.layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:  # normalize each sub-layer's input; the residual stream itself is never normalized
            x = x + self.attention(self.layer_norm(x), attn_mask)
            x = x + self.feed_forward(self.final_layer_norm(x))
        else:  # original Transformer: normalize after each residual add
            x = self.layer_norm(x + self.attention(x, attn_mask))
            x = self.final_layer_norm(x + self.feed_forward(x))
        return x  # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, config: HuBERTConfig):
        super().__init__()
        self.pre_ln = config.pre_ln
        self.pos_conv_embed = PositionalConvEmbedding(config)
        # post-LN: normalizes the input of the first layer; pre-LN: normalizes the output of the last one
        self.layer_norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, T, C); valid (B, T) bool, True on real frames, or None when no frame is padding.
        Returns the output (B, T, C) and the input of every layer (an empty list unless asked)."""
        attn_mask = None
        if valid is not None:
            x = x.masked_fill(~valid[:, :, None], 0.0)  # alone, an utterance's positional conv sees zeros past its end
            attn_mask = valid[:, None, None, :]  # (B, 1, 1, T): every query may look at the real keys only
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        layer_inputs = []
        for layer in self.layers:
            if output_hidden_states:
                layer_inputs.append(x)
            x = layer(x, attn_mask)
        if self.pre_ln:
            x = self.layer_norm(x)
        return x, layer_inputs


# -----------------------------------------------------------------------------
# The model


class HuBERT(nn.Module):
    def __init__(self, config: HuBERTConfig, masked_pretraining: bool = False):
        """masked_pretraining adds `masked_spec_embed`, the learned vector that replaces the masked frames in
        HuBERT's masked-prediction pre-training (see `forward(mask_time_indices=...)`)."""
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureExtractor(config)
        self.feature_projection = FeatureProjection(config)
        self.encoder = Encoder(config)
        self.masked_spec_embed = nn.Parameter(torch.empty(config.n_embd)) if masked_pretraining else None
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights for pre-training from scratch (from_pretrained overwrites all of them)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, WeightNormConv1d):
            kernel, channels = module.weight_v.size(2), module.weight_v.size(0)
            nn.init.normal_(module.weight_v, std=math.sqrt(4.0 / (kernel * channels)))  # as in fairseq
            module.weight_g.copy_(module.weight_v.square().sum(dim=(0, 1), keepdim=True).sqrt())  # so W = v
            nn.init.zeros_(module.bias)
        elif isinstance(module, HuBERT) and module.masked_spec_embed is not None:
            nn.init.uniform_(module.masked_spec_embed)

    def frame_lengths(self, sample_lengths: int | torch.Tensor) -> int | torch.Tensor:
        """Output frames for inputs of `sample_lengths` samples: each conv maps L to floor((L - k) / s) + 1."""
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            sample_lengths = conv_out_length(sample_lengths, kernel, stride)
        return sample_lengths

    def _check_input(self, wav: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate wav (B, S) and lengths; return wav in the model's dtype and lengths as a (B,) long tensor."""
        if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
            shape = tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__
            raise ValueError(f"wav must be a (batch, samples) tensor, got {shape}; for one utterance use wav[None]")
        if not wav.is_floating_point():
            raise TypeError(f"wav must be a float waveform in [-1, 1], got dtype {wav.dtype} "
                            f"(16-bit PCM: wav.float() / 32768)")
        B, S = wav.shape
        if lengths is None:
            lengths = torch.full((B,), S, dtype=torch.long, device=wav.device)
        lengths = torch.as_tensor(lengths, device=wav.device)
        if lengths.shape != (B,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be {B} integers (valid samples per row), got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        if bool((lengths > S).any()):
            raise ValueError(f"lengths {lengths.tolist()} exceed the {S} samples of wav")
        too_short = (lengths < self.config.receptive_field).nonzero().flatten().tolist()
        if too_short:
            raise ValueError(f"row(s) {too_short} have {lengths[too_short].tolist()} samples, fewer than the "
                             f"{self.config.receptive_field}-sample receptive field "
                             f"({1000 * self.config.receptive_field / SAMPLE_RATE:g} ms at {SAMPLE_RATE} Hz) that one "
                             f"output frame needs; pad or drop such utterances")
        return wav.to(self.encoder.layer_norm.weight.dtype), lengths.long()

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None, output_hidden_states: bool = False,
                mask_time_indices: torch.Tensor | None = None):
        """wav: (B, S) float at 16 kHz, zero-padded on the right; lengths: (B,) valid samples per row (None: all S).
        mask_time_indices: optional (B, T) bool, frames whose projected features are replaced by
        `masked_spec_embed` (masked pre-training; needs HuBERT(config, masked_pretraining=True)).

        Returns (hidden (B, T, C), frame_lengths (B,)), and with output_hidden_states also the list of the
        n_layer + 1 hidden states: the input of the first layer, then each layer's output; the last entry is
        `hidden` (for pre-LN models, after the final LayerNorm). Padded frames are zero in all of them."""
        wav, lengths = self._check_input(wav, lengths)
        if self.config.do_normalize:
            wav = normalize_waveform(wav, lengths)
        features, frame_lengths = self.feature_extractor(wav, lengths)  # (B, C_conv, T), (B,)
        x = self.feature_projection(features.transpose(1, 2))  # (B, T, C)
        if mask_time_indices is not None:
            if self.masked_spec_embed is None:
                raise ValueError("mask_time_indices needs a model built with HuBERT(config, masked_pretraining=True)")
            if mask_time_indices.shape != x.shape[:2] or mask_time_indices.dtype != torch.bool:
                raise ValueError(f"mask_time_indices must be bool {tuple(x.shape[:2])} (batch, frames), got "
                                 f"{mask_time_indices.dtype} {tuple(mask_time_indices.shape)}")
            x = torch.where(mask_time_indices[:, :, None], self.masked_spec_embed.to(x.dtype), x)
        T = x.size(1)
        valid = None if bool((frame_lengths == T).all()) else length_mask(frame_lengths, T)  # (B, T) or None
        hidden, layer_inputs = self.encoder(x, valid, output_hidden_states)  # (B, T, C), [(B, T, C)] * n_layer
        if valid is not None:  # padded frames hold values computed from padding: make them 0
            hidden = hidden.masked_fill(~valid[:, :, None], 0.0)
            layer_inputs = [h.masked_fill(~valid[:, :, None], 0.0) for h in layer_inputs]
        if output_hidden_states:
            return hidden, frame_lengths, layer_inputs + [hidden]
        return hidden, frame_lengths

    # -------------------------------------------------------------------------
    # Loading Hugging Face checkpoints

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict",
                           assign: bool = False) -> list[str]:
        """Load a transformers HubertModel / HubertForCTC / pre-training state dict into this model.
        Returns the checkpoint keys it ignored (heads this encoder does not use); raises on missing,
        unexpected or wrongly shaped keys, naming each one and `source`. assign=True adopts the checkpoint's
        tensors (cast to the model's dtype) instead of copying into the current ones (for a model on "meta")."""
        converted, ignored = convert_hf_state_dict(state_dict, self.masked_spec_embed is not None)
        ours = self.state_dict()
        missing = sorted(set(ours) - set(converted))
        unexpected = sorted(set(converted) - set(ours))
        wrong_shape = [f"{key}: expected {tuple(ours[key].shape)}, got {tuple(converted[key].shape)}"
                       for key in sorted(set(ours) & set(converted)) if ours[key].shape != converted[key].shape]
        problems = [f"{what} ({len(keys)}): {', '.join(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape))
                    if keys]
        if problems:
            c = self.config
            raise ValueError(f"{source} does not fit this HuBERT ({c.n_layer} layers, {c.n_embd} wide, "
                             f"{c.extractor_norm}-norm extractor):\n  " + "\n  ".join(problems))
        self.load_state_dict({key: t.to(ours[key].dtype) for key, t in converted.items()}, assign=assign)
        return ignored

    @classmethod
    def from_pretrained(cls, name_or_path: str, masked_pretraining: bool = False, revision: str = "main") -> HuBERT:
        """Load a HuBERT checkpoint: "hubert-base" / "hubert-large" (aliases of the facebook/ hub repos), a hub
        repo id, a local directory, or a model the micro world saved under the Seal cache. The config comes
        from config.json, the input normalization from preprocessor_config.json (when present).
        Returns the model in eval mode."""
        config_json, state_dict, files = load_checkpoint(ALIASES.get(name_or_path, name_or_path),
                                                         optional=("preprocessor_config.json",), revision=revision)
        preprocessor = None
        if "preprocessor_config.json" in files:
            preprocessor = json.loads(Path(files["preprocessor_config.json"]).read_text())
        with torch.device("meta"):  # shapes only: no memory, no random init for weights about to be replaced
            model = cls(HuBERTConfig.from_hf(config_json, preprocessor), masked_pretraining=masked_pretraining)
        weights = next(str(files[name]) for name in ("model.safetensors", "pytorch_model.bin") if name in files)
        ignored = model.load_hf_state_dict(state_dict, source=weights, assign=True)
        if ignored:
            reasons = sorted({reason for prefix, reason in IGNORED_HEADS.items()
                              if any(key.removeprefix("hubert.").startswith(prefix) for key in ignored)})
            warnings.warn(f"{weights}: ignored {len(ignored)} entries this encoder does not use "
                          f"({'; '.join(reasons)}): {', '.join(ignored)}", stacklevel=2)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json, preprocessor_config.json and model.safetensors (loadable by from_pretrained
        and by transformers' HubertModel)."""
        preprocessor = json.dumps(self.config.preprocessor_config(), indent=2)
        save_pretrained(directory, self.config.to_hf(), self.state_dict(),
                        extra_files={"preprocessor_config.json": preprocessor})


def convert_hf_state_dict(state_dict: dict[str, torch.Tensor],
                          keep_masked_spec_embed: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a transformers HuBERT state dict to this file's names; returns (converted, ignored keys).

    Our module tree mirrors transformers' HubertModel, so most names are kept. Three differences:
    - models with a head (HubertForCTC, ...) keep the encoder under a `hubert.` prefix: stripped;
    - the weight-norm pair is `weight_g` / `weight_v` in older files (the 2021 pytorch_model.bin) and
      `parametrizations.weight.original0` / `original1` in newer ones: both become weight_g / weight_v;
    - heads listed in IGNORED_HEADS are dropped (masked_spec_embed only unless keep_masked_spec_embed)."""
    converted, ignored = {}, []
    for key, tensor in state_dict.items():
        name = key.removeprefix("hubert.")
        name = name.replace("parametrizations.weight.original0", "weight_g")
        name = name.replace("parametrizations.weight.original1", "weight_v")
        if name.startswith(tuple(IGNORED_HEADS)) and not (keep_masked_spec_embed and name == "masked_spec_embed"):
            ignored.append(key)
        else:
            converted[name] = tensor
    return converted, ignored


def normalize_waveform(wav: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance, with statistics over the valid samples only; padding stays 0.
    wav: (B, S), lengths: (B,)."""
    valid = length_mask(lengths, wav.size(1)).to(wav.dtype)  # (B, S)
    count = lengths.to(wav.dtype)[:, None]
    mean = (wav * valid).sum(1, keepdim=True) / count
    var = ((wav - mean).square() * valid).sum(1, keepdim=True) / count
    return (wav - mean) * torch.rsqrt(var + NORMALIZE_EPS) * valid


# -----------------------------------------------------------------------------
# Pre-training the HuBERT way (used by the micro world in train.py)
#
# HuBERT (Hsu et al. 2021) learns without transcripts. Each frame gets a discrete "hidden unit":
# the id of its k-means cluster, computed from MFCCs in the first iteration (data.mfcc). Spans of
# the projected features are replaced by `masked_spec_embed`, and the model must predict the
# units *at the masked frames* from the context around them, a masked language model over
# acoustic units. To do so it has to learn what sounds follow what, i.e. the phones and words of
# the language: exactly the content a projector needs. (Later iterations re-cluster the model's own
# features; one iteration is enough for the micro world.) The real model scores units by cosine
# similarity to learned unit embeddings; a linear layer over the units is the same idea, simpler.

MASK_PROB = 0.08   # probability that a frame starts a masked span (fairseq's mask_prob 0.80 / mask_length 10)
MASK_SPAN = 10     # frames per span (200 ms); spans overlap, so about half the frames end up masked


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Centroids (k, D) of points x (N, D): k-means++ seeding, then Lloyd iterations.

    k-means++ picks each new seed with probability proportional to its squared distance to the
    nearest seed so far, which spreads the seeds over the data; Lloyd then alternates assigning
    every point to its nearest centroid and moving each centroid to the mean of its points.
    """
    if len(x) < k:
        raise ValueError(f"kmeans: {len(x)} points, fewer than k={k} clusters")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=g)]  # (1, D)
    nearest = torch.cdist(x, centroids).squeeze(1).square()  # (N,) squared distance to the nearest seed
    for _ in range(k - 1):
        new = x[torch.multinomial(nearest / nearest.sum(), 1, generator=g)]  # (1, D)
        centroids = torch.cat([centroids, new])
        nearest = torch.minimum(nearest, torch.cdist(x, new).squeeze(1).square())
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)  # (N,)
        counts = torch.bincount(assign, minlength=k)[:, None]  # (k, 1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster stays put
    return centroids


def span_mask(frame_lengths: torch.Tensor, T: int, generator: torch.Generator | None = None,
              prob: float = MASK_PROB, span: int = MASK_SPAN) -> torch.Tensor:
    """(B, T) bool: random spans of `span` frames, each real frame starting one with probability
    `prob`; padding (frames past frame_lengths) is never masked."""
    B = len(frame_lengths)
    real = torch.arange(T)[None, :] < frame_lengths[:, None].cpu()  # (B, T)
    starts = (torch.rand(B, T, generator=generator) < prob) & real
    # frame t is masked if a span started at any of t - span + 1 .. t: a running max over the window
    padded = F.pad(starts.float(), (span - 1, 0))[:, None]  # (B, 1, T + span - 1)
    return F.max_pool1d(padded, span, stride=1)[:, 0].bool() & real


def masked_prediction_loss(model: HuBERT, head: nn.Linear, wav: torch.Tensor, lengths: torch.Tensor,
                           units: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HuBERT's loss: cross-entropy of the unit ids at the masked frames.

    wav (B, S), lengths (B,), units (B, T) cluster ids (-100 where there is no frame), mask (B, T).
    Returns (loss, accuracy at the masked frames)."""
    hidden, _ = model(wav, lengths, mask_time_indices=mask)  # (B, T, C)
    logits = head(hidden[mask])  # (M, n_units): only the masked frames are scored
    target = units[mask]  # (M,)
    return F.cross_entropy(logits, target, ignore_index=-100), (logits.argmax(-1) == target).float().mean()


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Encode a WAV file with a HuBERT checkpoint and print the frame count and feature statistics.")
    parser.add_argument("--encoder", default="hubert-base",
                        help="checkpoint: hubert-base, hubert-large, a hub repo id or a local directory "
                             "(default: %(default)s)")
    parser.add_argument("--wav", required=True, help="audio file (mono or stereo; resampled to 16 kHz)")
    parser.add_argument("--layer", type=int, default=None,
                        help="report this layer's hidden state (0 = input of the first layer) instead of the last")
    args = parser.parse_args(argv)
    try:
        from data import load_audio

        wav = load_audio(args.wav)  # (S,) float32 at 16 kHz
        model = HuBERT.from_pretrained(args.encoder)
        with torch.inference_mode():
            hidden, frame_lengths, hidden_states = model(wav[None], output_hidden_states=True)
        if args.layer is not None:
            if not 0 <= args.layer < len(hidden_states):
                raise ValueError(f"--layer must be in [0, {len(hidden_states) - 1}], got {args.layer}")
            hidden = hidden_states[args.layer]
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    features = hidden[0]  # (T, C)
    print(f"{args.wav}: {wav.numel()} samples ({wav.numel() / SAMPLE_RATE:.2f} s) -> {features.size(0)} frames "
          f"of {features.size(1)} dims ({FRAME_RATE} frames/s)")
    print(f"features: mean {features.mean():.4f}  std {features.std():.4f}  "
          f"min {features.min():.4f}  max {features.max():.4f}  mean L2 norm/frame {features.norm(dim=1).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
