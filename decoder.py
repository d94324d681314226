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

Run it:  python decoder.py --lm gpt2 --prompt "Hello, my name is" --max-new-tokens 20
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Checkpoint files (safetensors / .bin reading, hub resolution and downloads) live in the appendix
# `_ckpt.py` and are re-exported from here: everyone imports them from `decoder`.
from _ckpt import (  # noqa: F401  (re-exported)
    load_checkpoint,
    load_safetensors,
    load_state_dict,
    load_torch_bin,
    resolve_files,
    save_pretrained,
    save_safetensors,
)

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
        attention_mask: bool (B, T_past + T), True = real token, False = padding (left or right).
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
            if attention_mask.shape != (B, T_past + T):
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


if __name__ == "__main__":
    main()
