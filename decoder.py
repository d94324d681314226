"""
decoder.py - GPT-2, the frozen language model at the end of Seal, written from scratch.

What GPT-2 is, for a newcomer
-----------------------------
A GPT is a *causal language model*: given tokens x_1..x_t it outputs a probability distribution
over the next token x_{t+1}. The text is first cut into integer tokens by a byte-level BPE
tokenizer (bottom of this file). The model then

1. looks up a learned vector for every token (`wte`, vocab_size x n_embd) and adds a learned vector
   for every position (`wpe`, block_size x n_embd): x has shape (B, T, C) with C = n_embd;
2. runs n_layer identical *blocks*. Each block is "pre-LayerNorm":
       x = x + attn(ln_1(x))      # tokens exchange information (each looks only at the past)
       x = x + mlp(ln_2(x))       # each token is transformed on its own (C -> 4C -> C, GELU)
   Causal self-attention splits C into n_head heads of size C / n_head; every head computes
   softmax(q k^T / sqrt(head_dim)) v with the future masked out, so position t never sees t+1;
3. applies a final LayerNorm (`ln_f`) and multiplies by the token embedding matrix again
   (the LM head is *tied* to `wte`): logits = h @ wte.weight^T, shape (B, T, vocab_size).

Why Seal needs more than the textbook model
-------------------------------------------
- The speech prefix enters the LM as *vectors*, not tokens: `forward` accepts `inputs_embeds`
  (B, T, C) in place of token ids, and text tokens are embedded with `GPT.wte`.
- Few-shot evaluation scores many candidate labels after one long prompt. A *KV cache* stores every
  layer's keys and values of the prompt once; `KVCache.repeat_interleave(n)` lets n candidates share it.
- Prompts of different lengths are batched with padding. `attention_mask` (B, T_past + T), True for
  real tokens, keeps padding invisible, and positions are counted over real tokens only, so a padded
  row gives exactly what the row alone would give.

Checkpoints
-----------
`GPT.from_pretrained("gpt2")` reads the Hugging Face files (config.json + model.safetensors or
pytorch_model.bin). Their weight names match our module names (wte, wpe, h.N.attn.c_attn, ...) with
one historical twist: OpenAI's projections are "Conv1D" layers that store W as (in, out) and compute
x @ W + b, while nn.Linear stores (out, in), so those four weights are transposed on the way in.
How files are found, downloaded and read (safetensors, .bin, the hub cache) is the appendix at the
end of this file; encoder.py reuses it.

Run it:  python decoder.py --lm gpt2 --prompt "Hello, my name is" --max-new-tokens 20
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: number of learned positions (HF: n_positions)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP hidden width; None means the usual 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @classmethod
    def preset(cls, name: str) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    # The options of HF's GPT2Config that change the computation. We implement GPT-2 as published;
    # a checkpoint asking for anything else is refused instead of being run wrongly.
    _HF_REQUIRED = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are the tanh GELU
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    }

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTConfig":
        """Build a config from a Hugging Face GPT-2 `config.json` dict."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json has model_type={hf['model_type']!r}; decoder.py reads GPT-2 models")
        for key, allowed in cls._HF_REQUIRED.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(f"config.json has {key}={hf[key]!r}; this GPT-2 supports {allowed}")
        if hf.get("tie_word_embeddings", True) is not True:
            raise ValueError("config.json has tie_word_embeddings=false; GPT-2's LM head is tied to wte")
        return cls(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self) -> dict:
        """The same config as a Hugging Face GPT-2 `config.json` dict (readable by transformers)."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "vocab_size": self.vocab_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }


PRESETS: dict[str, dict] = {
    # The four OpenAI GPT-2 sizes (124M, 355M, 774M, 1558M parameters).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes for tests and the micro world (vocabulary set by the tokenizer in use).
    "gpt2-tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=512),
    "gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=1024),
}

# Hub names of the published checkpoints (what `from_pretrained("gpt2")` downloads).
ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# -----------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # One matrix computes queries, keys and values of all heads at once: output [q | k | v].
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(
        self, x: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, C); mask None (plain causal) or bool (B or 1, 1, T, T_past + T), True = may attend;
        past: keys and values (B, nh, T_past, hd) of earlier tokens. Returns y (B, T, C) and the
        keys/values of all T_past + T tokens."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # Heads are consecutive slices of C: (B, T, C) -> (B, nh, T, hd)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, T_past + T, hd)
            v = torch.cat([past[1], v], dim=2)
        # softmax(q k^T / sqrt(hd)) v, with the scale 1/sqrt(hd) that SDPA uses by default.
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in HF configs).
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream x is only ever added to."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens processed so far.

    keys[l], values[l]: (B, n_head, T_past, head_dim). Attention of a new token needs the keys and
    values of all earlier tokens; they never change once computed (the model is causal), so they
    are computed once and reused. `GPT.forward` never modifies a cache; it returns a new one that
    also holds the new tokens, so one cached prompt can be continued in several ways.
    """

    keys: list[Tensor]
    values: list[Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]  # T_past

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def repeat_interleave(self, repeats: int) -> "KVCache":
        """Repeat every batch row `repeats` times: row b becomes rows b*repeats .. b*repeats+repeats-1.

        This is how one encoded prompt serves N candidate continuations: encode the prompt with
        B = 1, then `cache.repeat_interleave(N)` and run the N candidates as one batch. Remember to
        repeat the prompt's attention_mask the same way (`mask.repeat_interleave(N, dim=0)`)."""
        return KVCache(
            keys=[k.repeat_interleave(repeats, dim=0) for k in self.keys],
            values=[v.repeat_interleave(repeats, dim=0) for v in self.values],
        )


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding (also the LM head)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): there are two such additions per block, and the variance of the
        # stream would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation (only matters for models trained from scratch, e.g. the micro world).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """Run the model on T new tokens, after the T_past tokens held by `kv_cache` (if any).

        idx: token ids (B, T), or inputs_embeds: vectors (B, T, C) (e.g. a speech prefix); exactly one.
        position_ids: (B, T) positions of the new tokens. Default: counted over real tokens, i.e.
            cumsum(attention_mask) - 1, or T_past .. T_past + T - 1 without a mask.
        attention_mask: bool (B, T_past + T), True = real token, False = padding (left or right);
            or a full mask (B, 1, T, T_past + T), True = new token i may attend to key j, used as
            given (position_ids required). fewshot.py packs all candidate labels into one row this way.
        kv_cache: keys/values of the earlier tokens; use_cache: also return the extended cache.
        return_hidden: return the final-LayerNorm hidden states (B, T, C) instead of logits (B, T, V).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        x = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        T_past = 0 if kv_cache is None else kv_cache.length
        if T_past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {T_past + T} tokens ({T_past} cached + {T} new) is longer than the "
                f"model's context of block_size={self.config.block_size} positions"
            )
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows but the input has {B}")
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
            if attention_mask.dim() == 4:
                if attention_mask.shape != (B, 1, T, T_past + T) or position_ids is None:
                    raise ValueError(
                        f"a 4-D attention_mask must have shape (B, 1, T, T_past + T) = {(B, 1, T, T_past + T)} "
                        f"(got {tuple(attention_mask.shape)}) and comes with explicit position_ids"
                    )
            elif attention_mask.shape != (B, T_past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                    f"(B, T_past + T) = {(B, T_past + T)}"
                )

        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T_past, T_past + T, device=x.device).expand(B, T)
            else:
                # Count real tokens only, so that left padding does not shift the positions.
                # Padding gets position 0 (its output is ignored anyway).
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, T_past:]
        elif position_ids.numel() and int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position_ids go up to {int(position_ids.max())}, beyond block_size={self.config.block_size}")
        x = x + self.wpe(position_ids)  # (B, T, C)

        mask = self._attention_mask(attention_mask, T_past, T, x.device)
        new_keys, new_values = [], []
        for l, block in enumerate(self.h):
            past = None if kv_cache is None else (kv_cache.keys[l], kv_cache.values[l])
            x, (k, v) = block(x, mask, past)
            new_keys.append(k)
            new_values.append(v)
        x = self.ln_f(x)  # (B, T, C)
        out = x if return_hidden else F.linear(x, self.wte.weight)  # tied head: (B, T, V)
        if use_cache:
            return out, KVCache(new_keys, new_values)
        return out

    @staticmethod
    def _attention_mask(attention_mask: Tensor | None, T_past: int, T: int, device: torch.device) -> Tensor | None:
        """Boolean mask (B or 1, 1, T, T_past + T) for SDPA, or None for the plain causal case."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask  # the caller's full mask
        if attention_mask is None and T_past == 0:
            return None  # SDPA's is_causal=True path
        S = T_past + T
        # New token i sits at absolute index T_past + i and may see keys j <= T_past + i.
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=T_past)  # (T, S)
        if attention_mask is None:
            return causal[None, None]  # (1, 1, T, S)
        # Hide padded keys. Every query still sees itself, so that no row of the softmax is empty
        # (an all-masked row would give NaN, and NaN * 0 attention weight would leak NaN into
        # real rows). Outputs at padded positions are meaningless and must be ignored by callers.
        itself = torch.arange(S, device=device)[None, :] == torch.arange(T_past, S, device=device)[:, None]  # (T, S)
        return causal & (attention_mask[:, None, None, :] | itself)  # (B, 1, T, S)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the prompts idx (B, T) by up to max_new_tokens tokens; returns (B, T + N).

        temperature 0 picks the most likely token (greedy); otherwise sample from
        softmax(logits / temperature), restricted to the top_k most likely tokens if given.
        Rows that produced eos_token_id keep producing it; generation stops when all rows have.
        attention_mask (B, T) marks padding for left-padded prompts of different lengths."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds block_size={self.config.block_size}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        logits, cache = self(idx, attention_mask=attention_mask, use_cache=True)  # prompt in one pass
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_logits = logits[:, -1, :]  # (B, V)
            if temperature == 0:
                next_token = next_logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                next_logits = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(next_logits, min(top_k, next_logits.size(-1))).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, float("-inf"))
                probs = F.softmax(next_logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done[:, None], eos_token_id)
                done |= next_token[:, 0] == eos_token_id
            idx = torch.cat([idx, next_token], dim=1)
            if done.all() or step == max_new_tokens - 1:
                break
            attention_mask = F.pad(attention_mask, (0, 1), value=True)
            logits, cache = self(next_token, attention_mask=attention_mask, kv_cache=cache, use_cache=True)
        return idx

    # -------------------------------------------------------------------------------------------
    # Loading and saving Hugging Face-format checkpoints

    # Weights that OpenAI stored as Conv1D (in, out); nn.Linear wants (out, in).
    CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    # Non-persistent causal-mask buffers that older transformers versions saved; they hold no weights.
    IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> "GPT":
        """Load a GPT-2 checkpoint: a local directory, a Seal/HF cache entry, or a hub name.

        `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` are aliases of the openai-community repos."""
        hf_config, state_dict, files = load_checkpoint(ALIASES.get(name_or_path, name_or_path))
        config = GPTConfig.from_hf(hf_config)
        weights_file = files.get("model.safetensors", files.get("pytorch_model.bin"))
        state_dict = cls.convert_hf_state_dict(state_dict, config, source=str(weights_file))
        # Build on the meta device (no memory, no random init) and adopt the loaded tensors as-is.
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        return model.eval()

    @classmethod
    def convert_hf_state_dict(cls, hf: dict[str, Tensor], config: GPTConfig, source: str = "checkpoint") -> dict[str, Tensor]:
        """Map a Hugging Face GPT-2 state dict onto our parameter names, checking every key and shape.

        Accepted variants: bare keys (the hub files) or a `transformer.` prefix (saved from
        GPT2LMHeadModel); with or without `lm_head.weight`, which must then equal `wte.weight`
        (the head is tied; an untied head would be silently wrong, so it is refused)."""
        sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): t for k, t in hf.items()}
        sd = {k: t for k, t in sd.items() if not k.endswith(cls.IGNORED_SUFFIXES)}
        lm_head = sd.pop("lm_head.weight", None)

        with torch.device("meta"):
            expected = {k: tuple(p.shape) for k, p in cls(config).state_dict().items()}
        missing = sorted(expected.keys() - sd.keys())
        unexpected = sorted(sd.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{source}: does not match a GPT-2 with {config.n_layer} layers; "
                f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}"
            )
        out = {}
        for key, want in expected.items():
            t = sd[key]
            is_conv1d = key.endswith(cls.CONV1D_WEIGHTS)
            stored = want[::-1] if is_conv1d else want  # Conv1D is saved as (in, out)
            if tuple(t.shape) != stored:
                raise ValueError(f"{source}: key {key!r} has shape {tuple(t.shape)}, expected {stored}")
            out[key] = t.t().contiguous() if is_conv1d else t
        if lm_head is not None and not torch.equal(lm_head, out["wte.weight"]):
            raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but GPT-2's LM head is tied to wte")
        return out

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Our weights under the hub's names and layouts (bare keys, Conv1D weights as (in, out))."""
        return {
            k: (t.t() if k.endswith(self.CONV1D_WEIGHTS) else t).detach().contiguous().cpu()
            for k, t in self.state_dict().items()
        }

    def save_pretrained(self, directory: str | Path, extra_files: dict[str, bytes | str] | None = None) -> None:
        """Write config.json + model.safetensors in the hub's GPT-2 format (readable by transformers)."""
        save_pretrained(directory, self.config.to_hf(), self.hf_state_dict(), extra_files=extra_files)


# -----------------------------------------------------------------------------------------------
# Tokenizers
#
# GPT-2's tokenizer is a byte-level BPE:
# 1. the text is pre-split into words, numbers, punctuation runs and whitespace runs by a regex;
# 2. each piece is turned into its UTF-8 bytes, and each byte into one printable unicode character
#    (`bytes_to_unicode`), so the vocabulary can be stored as text in vocab.json;
# 3. within each piece, adjacent symbols are merged greedily, always applying the merge with the best
#    (lowest) rank in merges.txt, until no listed merge applies; the symbols are then looked up in
#    vocab.json. Every byte is a token, so any string can be encoded; decoding joins and maps back.


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map byte -> printable character. Printable latin-1 bytes map to themselves;
    the 68 others (control chars, space, ...) map to chr(256), chr(257), ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def _char_class(chars: list[str]) -> str:
    """Regex character-class body for a sorted list of characters, with runs written as a-z ranges."""
    parts, i = [], 0
    while i < len(chars):
        j = i
        while j + 1 < len(chars) and ord(chars[j + 1]) == ord(chars[j]) + 1:
            j += 1
        parts.append(re.escape(chars[i]) if i == j else f"{re.escape(chars[i])}-{re.escape(chars[j])}")
        i = j + 1
    return "".join(parts)


@functools.cache
def gpt2_pretokenizer() -> re.Pattern:
    r"""GPT-2's pre-tokenizer pattern, rebuilt for the standard library's `re`.

    The original (OpenAI, written for the third-party `regex` module) is
        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    `re` has no \p{L} (letters) or \p{N} (numbers), so we derive them from what it has:
    - `re`'s \w is exactly letters + numbers + "_" (every code point with a category L* or N*);
    - \d is only the decimal digits (Nd); the other numbers (Nl like 'Ⅻ', No like '²' or '½') are
      listed explicitly from `unicodedata` (about 1,100 code points, gathered once);
    so  \p{L} = [^\W\d_<Nl/No>]  and  \p{N} = [\d<Nl/No>].
    - \s in `re` also matches the four ASCII "information separators" \x1c-\x1f, which are not
      Unicode White_Space (what the original \s means): we use [^\S\x1c-\x1f] instead.
    - [^\s\p{L}\p{N}] (punctuation, symbols, emoji, ...) = anything neither space nor letter nor
      number = [^\w\s] or one of "_" and \x1c-\x1f.
    The `\s+(?!\S)` branch keeps the last space of a run for the next word (" world" is one token).
    """
    other_numbers = _char_class(
        [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Nl", "No")]
    )
    letter = rf"[^\W\d_{other_numbers}]"
    number = rf"[\d{other_numbers}]"
    space, nonspace = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
    other = r"(?:[^\w\s]|[_\x1c-\x1f])"
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?{number}+| ?{other}+|{space}+(?!{nonspace})|{space}+"
    )


class GPT2Tokenizer:
    """GPT-2's byte-level BPE tokenizer from vocab.json + merges.txt, with `<|endoftext|>`."""

    EOT = "<|endoftext|>"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], cache_size: int = 65536):
        self.encoder = vocab  # token string -> id
        self.decoder = {i: s for s, i in vocab.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = gpt2_pretokenizer()
        self.eot_id: int | None = vocab.get(self.EOT)
        # Text pieces repeat a lot (" the", " of", ...); memoise piece -> ids.
        self._encode_piece = functools.lru_cache(maxsize=cache_size)(self._encode_piece_uncached)

    @classmethod
    def from_files(cls, vocab_file: str | Path, merges_file: str | Path) -> "GPT2Tokenizer":
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        merges = []
        for n, line in enumerate(Path(merges_file).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{merges_file}:{n}: expected two space-separated symbols, got {line!r}")
            merges.append((pair[0], pair[1]))
        return cls(vocab, merges)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, piece: str) -> list[str]:
        """Merge the symbols of one pre-token (already in byte characters) by rank."""
        word = list(piece)
        while len(word) > 1:
            # The adjacent pair that was learned first (lowest rank) is merged next, everywhere.
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _encode_piece_uncached(self, piece: str) -> tuple[int, ...]:
        # UTF-8 bytes -> byte characters in one str.translate (latin-1 maps byte b to code point b)
        symbols = piece.encode("utf-8").decode("latin-1").translate(self.byte_encoder)
        return tuple(self.encoder[s] for s in self.bpe(symbols))

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. `<|endoftext|>` in the text becomes the special token (as in HF)."""
        ids: list[int] = []
        chunks = text.split(self.EOT) if self.eot_id is not None else [text]
        for n, chunk in enumerate(chunks):
            if n > 0:
                ids.append(self.eot_id)
            for piece in self.pattern.findall(chunk):
                ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. Byte sequences that are not valid UTF-8 (a token sequence cut inside a
        character) become U+FFFD, as in GPT-2's reference code."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece model (`tokenizer.model`) behind the same interface as GPT2Tokenizer."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        eos = self.sp.eos_id()
        self.eot_id: int | None = eos if eos >= 0 else None  # -1 means the model has no </s>

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(name_or_path: str) -> GPT2Tokenizer | SentencePieceTokenizer:
    """The tokenizer of a checkpoint: byte-level BPE (vocab.json + merges.txt), or sentencepiece
    when the checkpoint holds a `tokenizer.model`."""
    name = ALIASES.get(name_or_path, name_or_path)
    files = resolve_files(name, required=[("tokenizer.model", "vocab.json")])
    if "tokenizer.model" in files:
        return SentencePieceTokenizer(files["tokenizer.model"])
    files = resolve_files(name, required=["vocab.json", "merges.txt"])
    return GPT2Tokenizer.from_files(files["vocab.json"], files["merges.txt"])


# -----------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Continue a text prompt with a GPT-2 checkpoint (local directory, cache, or hub name).",
    )
    parser.add_argument("--lm", default="gpt2", help="checkpoint: gpt2, gpt2-medium, ..., or a directory (default gpt2)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="number of tokens to generate (default 30)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 1:
        parser.error("--max-new-tokens and --temperature must be >= 0 and --top-k >= 1")
    try:
        tokenizer = load_tokenizer(args.lm)
        model = GPT.from_pretrained(args.lm)
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("the prompt encodes to zero tokens")
        idx = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            idx,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            eos_token_id=tokenizer.eot_id,
            generator=torch.Generator().manual_seed(args.seed),
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    new = out[0, len(prompt):].tolist()
    if tokenizer.eot_id in new:
        new = new[: new.index(tokenizer.eot_id)]
    print(args.prompt + tokenizer.decode(new))


# =================================================================================================
# Appendix: checkpoint files
#
# Checkpoint files: reading and writing weights, and finding a model's files.
#
# Every pretrained model Seal uses (the GPT-2 decoder, the HuBERT encoder, the tiny models of the micro
# world) is a directory in the Hugging Face format: `config.json` plus the weights, either
# `model.safetensors` or the older `pytorch_model.bin`. This section turns a name such as
# "openai-community/gpt2" or a path such as "./tiny-lm" into those files, and the files into a state dict.
#
# safetensors is a deliberately simple format:
#
#     [8 bytes: N, a little-endian u64] [N bytes: a JSON header] [the data buffer]
#
# The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end)}, byte offsets into
# the data buffer (row-major, little-endian), plus an optional "__metadata__" of string pairs. Reading it
# runs no code, which is why it replaced pickled `.bin` files. We still read `.bin` files, but only through
# `torch.load(weights_only=True)`, whose restricted unpickler refuses anything but tensors and containers.
#
# Where files come from (`resolve_files`), in this order:
#   1. a local directory, or a bare name under the Seal cache ($SEAL_CACHE, default ~/.cache/seal);
#   2. an existing Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub),
#      so nothing is downloaded twice (and nothing at all if transformers already fetched the model);
#   3. a download from $HF_ENDPOINT (default https://huggingface.co) into that same cache layout:
#         models--{org}--{name}/blobs/<etag>               file contents, named by their hash
#         models--{org}--{name}/snapshots/<commit>/<file>  relative symlinks into blobs/, one folder per commit
#         models--{org}--{name}/refs/<revision>            the commit that a branch (e.g. main) pointed to
# HF_HUB_OFFLINE=1 forbids step 3: nothing touches the network.
# Downloads resume partial files (`blobs/<etag>.incomplete`) with an HTTP Range request, check the size,
# check the sha256 of large ("LFS") files against their etag, time out after $SEAL_HTTP_TIMEOUT seconds
# (default 10) and retry transient failures $SEAL_HTTP_RETRIES times (default 4) with exponential backoff.
# =================================================================================================

class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read safely: malformed safetensors, unsafe pickle, bad JSON."""


class CheckpointNotFoundError(FileNotFoundError):
    """The files a model needs are in none of the places looked; the message lists them and the places."""


class DownloadError(OSError):
    """A download failed after all retries, or its bytes do not match the size or hash the hub announced."""


# ---------------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The reference reader's limit: no real model needs a 100 MB header, so a bigger one is corruption
# (or an attempt to make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class _TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data buffer, end exclusive
    end: int


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_safetensors_header(f, path: Path, file_size: int) -> tuple[dict, int]:
    """Reads and parses the JSON header; returns it with the file offset where the data buffer starts."""
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file "
                              f"(expected at least the 8-byte header length)")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n:,} bytes exceeds the limit of {MAX_HEADER_BYTES:,} "
                              f"(corrupt, or not a safetensors file)")
    if 8 + n > file_size:
        raise CheckpointError(f"{path}: header runs past the end of the file (expected 8 + {n:,} header "
                              f"bytes <= file size, got a file of {file_size:,} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _check_safetensors_layout(path: Path, header: dict, data_len: int) -> list[_TensorEntry]:
    """Validates every header entry; returns them sorted by offset. They must tile the data buffer exactly."""
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {str(metadata)[:200]}")
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor '{key}'"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: expected {{dtype, shape, data_offsets}}, got {str(info)[:200]}")
        dtype_name = info.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {dtype_name!r} "
                                  f"(expected one of {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: dtype {dtype_name} and shape {shape} need {nbytes:,} bytes "
                                  f"(prod(shape) * itemsize), but data_offsets [{begin}, {end}] hold {end - begin:,}")
        entries.append(_TensorEntry(key, dtype, tuple(shape), begin, end))
    # Sorted by offset, each tensor must start exactly where the previous one ended, starting at 0:
    # a gap would hide unread bytes, an overlap would alias two tensors.
    entries.sort(key=lambda e: (e.begin, e.end))
    expected_begin, previous = 0, "the start of the data buffer"
    for e in entries:
        if e.begin != expected_begin:
            problem = "overlap" if e.begin < expected_begin else "leave a gap after"
            raise CheckpointError(f"{path}: tensor '{e.key}': data_offsets [{e.begin}, {e.end}] {problem} "
                                  f"{previous} (expected begin {expected_begin}, got {e.begin})")
        if e.end > data_len:
            raise CheckpointError(f"{path}: tensor '{e.key}': data_offsets [{e.begin}, {e.end}] are out of range "
                                  f"(expected end <= data buffer length {data_len:,}, got {e.end:,})")
        expected_begin, previous = e.end, f"tensor '{e.key}'"
    if expected_begin != data_len:
        raise CheckpointError(f"{path}: the data buffer is {data_len:,} bytes but the tensors cover "
                              f"{expected_begin:,} (expected equal; the file has unreferenced trailing bytes)")
    return entries


def _readinto_exactly(f, buffer: np.ndarray, path: Path, key: str) -> None:
    view, done = memoryview(buffer), 0
    while done < len(view):  # a single read may return less than asked (e.g. over 2 GiB on Linux)
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: tensor '{key}': file ended early "
                                  f"(expected {len(view):,} bytes, got {done:,}); was it modified while reading?")
        done += n


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor, as a uint8 numpy array sharing its memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a .safetensors file into CPU tensors, after checking the header against the file."""
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, data_start = _read_safetensors_header(f, path, file_size)
        entries = _check_safetensors_layout(path, header, file_size - data_start)
        # The entries tile the data buffer in order, so one sequential pass reads the file exactly once.
        # Each tensor gets freshly allocated (hence aligned) memory and the bytes are read straight into
        # it: viewing the file in place is not possible in general, since e.g. GPT-2's 14,283-byte
        # header leaves every float misaligned.
        tensors = {}
        for e in entries:
            tensor = torch.empty(e.shape, dtype=e.dtype)
            _readinto_exactly(f, _as_bytes(tensor), path, e.key)
            tensors[e.key] = tensor
    return tensors


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's `__metadata__` (string pairs) alone, without reading any tensor data."""
    path = Path(path)
    with open(path, "rb") as f:
        header, _ = _read_safetensors_header(f, path, os.fstat(f.fileno()).st_size)
    return header.get("__metadata__") or {}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Writes tensors to a .safetensors file (atomically: a crash never leaves a half-written file)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError(f"{path}: metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    for key, t in tensors.items():
        if not isinstance(key, str) or key == "__metadata__" or not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: cannot save entry {key!r} ({type(t).__name__}): expected str -> Tensor")
        if t.dtype not in _SAFETENSORS_NAMES:
            raise TypeError(f"{path}: tensor '{key}': dtype {t.dtype} has no safetensors equivalent")
    # Widest dtypes first, as the reference writer does: with the header padded to a multiple of 8,
    # every tensor then starts at a multiple of its own itemsize.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    flat, offset = [], 0
    for key in order:
        t = tensors[key].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        flat.append(t)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # trailing spaces keep it valid JSON
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in flat:
            f.write(memoryview(_as_bytes(t)))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# pickled PyTorch checkpoints and dispatch

def load_torch_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a pytorch_model.bin / .pt state dict, refusing any pickle that would construct other objects."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        asks = f" (it asks to call {culprit.group(1)})" if culprit else ""
        raise CheckpointError(f"{path}: refusing to unpickle: the file holds objects other than tensors{asks}, "
                              f"and loading them could run arbitrary code. Use a .safetensors checkpoint, or "
                              f"convert this one yourself only if you trust its source.") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (str -> Tensor), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r}: expected a Tensor, got {type(value).__name__}")
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads weights, choosing the reader from the file suffix (.safetensors, .bin, .pt, .pth)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return load_torch_bin(path)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt or .pth)")


# ---------------------------------------------------------------------------------------------------
# Finding a model's files: local directory, Seal cache, Hugging Face cache, download

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")  # preference order: safetensors runs no code
DEFAULT_ENDPOINT = "https://huggingface.co"
HTTP_BACKOFF_S = 0.5  # the wait before retry i is HTTP_BACKOFF_S * 2**i: 0.5, 1, 2, 4 s
DOWNLOAD_CHUNK = 1 << 20  # 1 MiB reads: few syscalls, frequent enough progress updates
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_NAME = re.compile(r"[\w.-]+")  # etags and commits become file names: no slashes from a server


def seal_cache_dir() -> Path:
    """Where Seal keeps models it makes itself (e.g. the micro world's tiny-lm): $SEAL_CACHE or ~/.cache/seal."""
    return Path(os.environ.get("SEAL_CACHE") or "~/.cache/seal").expanduser()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_number(name: str, default: float, kind: type) -> float | int:
    try:
        value = kind(os.environ.get(name) or default)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${name} must be a non-negative {kind.__name__}, got {os.environ[name]!r}")
    return value


def _http_timeout() -> float:
    return _env_number("SEAL_HTTP_TIMEOUT", 10.0, float)


def _http_retries() -> int:
    return _env_number("SEAL_HTTP_RETRIES", 4, int)


def _describe(group: tuple[str, ...]) -> str:
    return " or ".join(group)


def _collect(directory: Path, wanted: list[tuple[str, ...]], optional: Sequence[str]
             ) -> tuple[dict[str, Path], list[tuple[str, ...]]]:
    """Picks, for each wanted group, its first alternative present in directory; also the optional files there.
    Returns (found name -> path, the groups with no alternative present)."""
    found, missing = {}, []
    for group in wanted:
        name = next((n for n in group if (directory / n).is_file()), None)
        if name is None:
            missing.append(group)
        else:
            found[name] = directory / name
    found.update({n: directory / n for n in optional if (directory / n).is_file()})
    return found, missing


def _local_dir(name_or_path: str) -> Path | None:
    """A local directory for name_or_path, or None if it should be looked up as a hub repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{name_or_path}: is a file; expected a model directory (config.json + weights)")
    if path.is_absolute() or name_or_path.startswith(("./", "../", "~", ".\\", "..\\")) or name_or_path in (".", ".."):
        raise CheckpointNotFoundError(f"{name_or_path}: no such directory")
    in_seal_cache = seal_cache_dir() / name_or_path
    if in_seal_cache.is_dir():
        return in_seal_cache
    if not _REPO_ID.fullmatch(name_or_path):
        raise CheckpointNotFoundError(f"{name_or_path}: no such directory, and not a hub repo id (expected 'org/name')")
    return None


def _cached_snapshot(repo_dir: Path, revision: str) -> Path | None:
    """The snapshot folder a revision points to in an HF cache, if the cache knows it."""
    commit = revision
    if not _COMMIT_HASH.fullmatch(revision):
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def resolve_files(name_or_path: str, required: Sequence[str | tuple[str, ...]], optional: Sequence[str] = (),
                  revision: str = "main") -> dict[str, Path]:
    """Finds a model's files; returns {file name: local path} for the files found.

    Each entry of `required` is a file name or a tuple of alternatives in preference order (the first one
    present wins); an `optional` file is returned when present. Order: local directory (or Seal cache),
    existing HF cache, download (unless HF_HUB_OFFLINE=1). See the section docstring.
    """
    wanted = [(r,) if isinstance(r, str) else tuple(r) for r in required]
    local = _local_dir(name_or_path)
    if local is not None:
        found, missing = _collect(local, wanted, optional)
        if missing:
            present = sorted(p.name for p in local.iterdir())
            raise CheckpointNotFoundError(f"{local}: missing {'; '.join(map(_describe, missing))} "
                                          f"(the directory holds: {', '.join(present) or 'nothing'})")
        return found

    repo_id = name_or_path
    repo_dir = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshot = _cached_snapshot(repo_dir, revision)
    # A complete snapshot in the cache is used as is: optional files missing from it are not worth a
    # network round trip (which, with no network, would only end in time-outs).
    missing = wanted
    if snapshot is not None:
        found, missing = _collect(snapshot, wanted, optional)
        if not missing:
            return found
    if _env_flag("HF_HUB_OFFLINE"):
        where = snapshot or repo_dir / "refs" / revision
        raise CheckpointNotFoundError(
            f"{repo_id}: missing {'; '.join(map(_describe, missing))}, and HF_HUB_OFFLINE=1 forbids downloading.\n"
            f"  Looked in: local directory ./{repo_id} (none), the Seal cache {seal_cache_dir() / repo_id} (none), "
            f"the Hugging Face cache {where} ({'incomplete' if snapshot else 'no such revision cached'}).\n"
            f"  To get the files: run once without HF_HUB_OFFLINE=1 (they go to the Hugging Face cache above), "
            f"or on a machine with network run `hf download {repo_id} --local-dir DIR` "
            f"(older: `huggingface-cli download ...`), copy DIR here and pass DIR instead of '{repo_id}'.")
    return _download_files(repo_id, revision, repo_dir, wanted, optional)


def load_checkpoint(name_or_path: str, extra_required: Sequence[str | tuple[str, ...]] = (),
                    optional: Sequence[str] = (), revision: str = "main"
                    ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Path]]:
    """Resolves and loads a checkpoint: returns (config.json as a dict, state dict, {file name: path}).
    Weights come from model.safetensors when the checkpoint has it, else pytorch_model.bin."""
    files = resolve_files(name_or_path, [CONFIG_NAME, WEIGHTS_NAMES, *extra_required], optional, revision)
    config_path = files[CONFIG_NAME]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    weights = next(files[name] for name in WEIGHTS_NAMES if name in files)
    return config, load_state_dict(weights), files


def save_pretrained(directory: str | os.PathLike, config: dict, state_dict: Mapping[str, torch.Tensor],
                    extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Writes a checkpoint directory that load_checkpoint (and transformers) can read:
    config.json, model.safetensors and any extra files (e.g. a tokenizer), given as name -> contents."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # {"format": "pt"} is what transformers writes, and what its 4.x versions check when loading.
    save_safetensors(state_dict, directory / WEIGHTS_NAMES[0], metadata={"format": "pt"})
    for name, contents in (extra_files or {}).items():
        data = contents.encode("utf-8") if isinstance(contents, str) else contents
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


# --- HTTP: every request has a time-out; transient failures are retried with backoff ---------------

_T = TypeVar("_T")
_USER_AGENT = "seal/0.1 (python urllib)"


class _ShortRead(Exception):
    """The server closed the connection before sending the whole file (retried: the next try resumes)."""


def _is_transient(e: Exception) -> bool:
    if isinstance(e, urllib.error.HTTPError):  # an answer from the server: retry only overload/server errors
        return e.code == 429 or e.code >= 500
    return isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, _ShortRead))


def _with_retries(url: str, attempt: Callable[[], _T]) -> _T:
    retries = _http_retries()
    for i in range(retries + 1):
        try:
            return attempt()
        except Exception as e:
            if not _is_transient(e):
                raise
            if i == retries:
                reason = getattr(e, "reason", None) or e  # URLError wraps the socket error in .reason
                attempts = f"{retries + 1} attempt" + ("s" if retries else "")
                raise DownloadError(f"{url}: failed after {attempts} ({_http_timeout():g} s time-out "
                                    f"each; $SEAL_HTTP_TIMEOUT, $SEAL_HTTP_RETRIES): {type(e).__name__}: {reason}. "
                                    f"Check the network or $HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only local "
                                    f"files.") from e
            time.sleep(HTTP_BACKOFF_S * 2**i)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Stops at redirects (urllib then raises HTTPError), so the hub's headers are not lost to the CDN's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_no_redirect_opener = urllib.request.build_opener(_NoRedirect)
_MAX_HUB_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@dataclass(frozen=True)
class _HubFile:
    url: str     # where the bytes are: the resolve URL, or the storage URL it redirects to
    commit: str  # X-Repo-Commit
    etag: str    # sha256 of the contents for LFS files, git blob sha1 for small files
    size: int


def _hub_metadata(url: str) -> _HubFile | None:
    """HEADs a resolve URL and reads the hub's headers; None when the file does not exist (HTTP 404).

    Large (LFS) files answer with a redirect to a storage server on another host; the hub's headers
    (commit, etag, size) are on that redirect, so we stop there. Redirects that stay on the hub's own
    host (e.g. a renamed repo) are followed, as huggingface_hub does.
    """
    def attempt() -> tuple[str, http.client.HTTPMessage, bool]:  # (where the bytes are, headers, redirected)
        target = url
        for _ in range(_MAX_HUB_REDIRECTS):
            request = urllib.request.Request(target, method="HEAD",
                                             headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
            try:
                with _no_redirect_opener.open(request, timeout=_http_timeout()) as response:
                    return target, response.headers, False
            except urllib.error.HTTPError as e:
                e.close()
                location = e.headers.get("Location") if 300 <= e.code < 400 else None
                if location is None:
                    raise
                location = urllib.parse.urljoin(target, location)
                if _origin(location) != _origin(target):
                    return location, e.headers, True
                target = location
        raise DownloadError(f"{url}: more than {_MAX_HUB_REDIRECTS} redirects within the hub")

    try:
        location, headers, redirected = _with_retries(url, attempt)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        if e.code in (401, 403):
            raise CheckpointNotFoundError(f"{url}: HTTP {e.code}: no such repository, or it needs authentication "
                                          f"(Seal downloads public repos only; a local path must be an existing "
                                          f"directory)") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    commit = headers.get("X-Repo-Commit")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    # On a redirect, Content-Length is the length of the redirect's own body, not of the file.
    size = headers.get("X-Linked-Size") or (None if redirected else headers.get("Content-Length"))
    if not (commit and _SAFE_NAME.fullmatch(commit) and _SAFE_NAME.fullmatch(etag) and size and size.isdigit()):
        raise DownloadError(f"{url}: not a Hugging Face hub response (expected headers X-Repo-Commit, "
                            f"X-Linked-Etag or ETag, X-Linked-Size or Content-Length; got commit={commit!r}, "
                            f"etag={etag!r}, size={size!r}); is $HF_ENDPOINT right?")
    return _HubFile(location, commit, etag, int(size))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download_blob(hub_file: _HubFile, blob: Path, label: str) -> None:
    """Downloads into blob + ".incomplete" (resuming what is already there), verifies it, then renames it."""
    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)

    def attempt() -> None:
        have = partial.stat().st_size if partial.exists() else 0
        if have == hub_file.size:
            return
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if 0 < have < hub_file.size:
            headers["Range"] = f"bytes={have}-"
        with urllib.request.urlopen(urllib.request.Request(hub_file.url, headers=headers),
                                    timeout=_http_timeout()) as response:
            if response.status != 206:  # a full answer (no Range sent, or the server ignored it): start over
                have = 0
            with open(partial, "ab" if have else "wb") as f, \
                    tqdm(total=hub_file.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=label) as bar:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        if partial.stat().st_size < hub_file.size:  # http.client reports an early close as a normal end
            raise _ShortRead(f"connection closed after {partial.stat().st_size:,} of {hub_file.size:,} bytes")

    try:
        _with_retries(hub_file.url, attempt)
    except urllib.error.HTTPError as e:  # e.g. an expired storage link: retrying the same URL will not help
        raise DownloadError(f"{hub_file.url}: HTTP {e.code} {e.reason}") from None
    got = partial.stat().st_size
    if got != hub_file.size:
        partial.unlink()
        raise DownloadError(f"{hub_file.url}: expected {hub_file.size:,} bytes (as the hub announced), got {got:,}; "
                            f"the partial file was deleted, try again")
    if _SHA256.fullmatch(hub_file.etag):  # LFS files are named by the sha256 of their contents
        actual = _sha256_of(partial)
        if actual != hub_file.etag:
            partial.unlink()
            raise DownloadError(f"{hub_file.url}: sha256 mismatch (expected {hub_file.etag}, got {actual}); "
                                f"the corrupt download was deleted, try again")
    os.replace(partial, blob)


def _link_snapshot(blob: Path, dest: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, relative so the cache can be moved as a whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    except OSError:  # no symlinks (e.g. Windows without developer mode): a copy costs disk but works
        shutil.copyfile(blob, dest)


def _download_files(repo_id: str, revision: str, repo_dir: Path, wanted: list[tuple[str, ...]],
                    optional: Sequence[str]) -> dict[str, Path]:
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    commit = None  # once known, every later file is fetched at that commit, so all come from one snapshot
    found: dict[str, Path] = {}

    def fetch(filename: str) -> tuple[Path | None, str]:
        nonlocal commit
        url = (f"{endpoint}/{repo_id}/resolve/{urllib.parse.quote(commit or revision, safe='')}/"
               f"{urllib.parse.quote(filename)}")
        hub_file = _hub_metadata(url)
        if hub_file is None:
            return None, url
        commit = hub_file.commit
        blob = repo_dir / "blobs" / hub_file.etag
        if not (blob.is_file() and blob.stat().st_size == hub_file.size):
            _download_blob(hub_file, blob, label=f"{repo_id}/{filename}")
        dest = repo_dir / "snapshots" / hub_file.commit / filename
        _link_snapshot(blob, dest)
        return dest, url

    for group in wanted:
        tried = []
        for filename in group:  # a 404 on a non-preferred alternative is not an error
            path, url = fetch(filename)
            if path is not None:
                found[filename] = path
                break
            tried.append(url)
        else:
            raise CheckpointNotFoundError(
                f"{repo_id}: not a local directory, not in the Seal cache ({seal_cache_dir() / repo_id}), and the "
                f"hub has no {_describe(group)} at revision '{revision}' (HTTP 404 for {', '.join(tried)})")
    for filename in optional:
        path, _ = fetch(filename)
        if path is not None:
            found[filename] = path
    if commit is not None and revision != commit:
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return found


if __name__ == "__main__":
    main()
