"""Few-shot evaluation: does the LM learn a spoken task in context from k examples?

After training, Seal is judged the way the paper judges it: intent classification on Fluent Speech
Commands (FSC) and SLURP with k demonstrations in the prompt and *no* gradient step. A prompt is

    [speech_1] => activate lights kitchen\\n
    [speech_2] => bring juice none\\n
    ...                                          (k demonstrations, from the train split only)
    [speech_q] =>                                (the query, from the test split)

where each [speech] span is the projector's soft tokens, and the LM must continue with the query's
label. Labels are natural text ("action object location" for FSC, "scenario action" for SLURP),
so the LM can use what it knows about the words as well as copy from the demonstrations.

Two ways to read the answer off the LM:
- `rank`: score every label of the task by its log-likelihood after the prompt and take the best
  (optionally the mean per token, so that long labels are not penalized for their length);
- `generate`: greedy decoding until the end-of-line, compared with the gold label after
  normalization (lowercase, no punctuation, single spaces).

Ranking looks expensive (31 labels x one forward each), but all candidates share the prompt. We run
the prompt once and keep its keys and values (the KV cache, decoder.py); then all labels run in one
more forward, packed after the cached prompt as their prefix trie ("activate" is computed once for
the 6 FSC labels that start with it), each token seeing only the prompt and its own label; queries are
batched too. `rank_scores_naive` (one full forward per (query, label)) is the oracle the tests
compare against; bench/bench_fewshot.py measures ~18x (micro-world size) to ~30x (GPT-2 size) over it.

Demonstrations are chosen `random`ly per query, `fixed` per seed (the same for every query), or by
`kate` (Liu et al. 2021): the train utterances whose pooled speech features are nearest (cosine) to
the query's, nearest placed last, next to the query. `--mode text` puts the true transcripts where
the speech would be (the upper bound: how well can the LM do if the projector were perfect?), and
`--mode none` leaves the demonstrations' input slot empty while the query keeps its speech (an
ablation: the LM sees the labels in context, but not what they were said for).

Optional contextual calibration (Zhao et al. 2021, "Calibrate before use"): few-shot LMs are biased
towards labels that are frequent or recent in the prompt, or just common words. The bias is
measured by asking the same prompt about a *content-free* input (empty text, "N/A", or silence in
speech mode) and divided out: p_cal(y | x) is proportional to p(y | x) / p(y | content-free).

Run it:   python fewshot.py --task fsc --k 5                 (micro-world checkpoint, synthetic data)
          python fewshot.py --task fsc --k 0 1 3 5 --mode speech text none --seeds 3 --out r.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import data
from decoder import GPT, load_tokenizer
from seal import Prompt, Seal, build_prompt, read_projector

MODES = ("speech", "text", "none")
SELECTIONS = ("random", "fixed", "kate")
SCORINGS = ("rank", "generate")
DEFAULT_TEMPLATE = "{input} => {label}\n"  # the micro world's "utterance => label" lines
SILENCE_SECONDS = 1.0  # length of the content-free speech input used by calibration
CONFIDENCE = 0.95  # confidence level of the interval over seeds


# -----------------------------------------------------------------------------------------------
# 1. Labels and the prompt template


def label_text(task: str, label: str | Sequence[str]) -> str:
    """A dataset label as the natural text the LM reads and writes.

    FSC: the intent (action, object, location), e.g. "activate lights kitchen" ("none" kept: it is
    how FSC spells "no location", and it keeps the 31 labels distinct). SLURP: "scenario action"
    with underscores as spaces, e.g. "iot hue lightoff". Takes data.py's spellings ("activate lights
    kitchen", "iot_hue_lightoff") or a tuple of fields.
    """
    if task not in ("fsc", "slurp"):
        raise ValueError(f"unknown task {task!r}: expected 'fsc' or 'slurp'")
    parts = [label] if isinstance(label, str) else list(label)
    return " ".join(w for p in parts for w in str(p).replace("_", " ").split())


@dataclass(frozen=True)
class Template:
    """One demonstration line, e.g. "{input} => {label}\\n", cut into the text around the two slots.

    The cut before the label is placed *before* the whitespace that precedes it: the candidate text
    is " activate lights kitchen\\n", not "activate lights kitchen\\n". Byte-level BPE (GPT-2) and
    sentencepiece never merge tokens across a space that starts a word, so tokenizing the pieces one
    by one gives exactly the tokens of the whole line, and a candidate's tokens are the same whatever
    precedes it (which is what lets all queries share one batch of candidates). The text after the
    label ends a demonstration, so it is scored with the label (otherwise a label that is a prefix of
    another, "activate lights" vs "activate lights kitchen", could never lose) and stops generation.
    """

    before: str  # text before the input slot
    between: str  # text between the input and the label, trailing whitespace excluded
    label_lead: str  # that trailing whitespace: scored as part of the candidate
    after: str  # text after the label (ends a demonstration)

    @classmethod
    def parse(cls, template: str) -> "Template":
        if template.count("{input}") != 1 or template.count("{label}") != 1:
            raise ValueError(f"template {template!r} must contain '{{input}}' and '{{label}}' exactly once")
        before, rest = template.split("{input}")
        if "{label}" not in rest:
            raise ValueError(f"template {template!r}: '{{input}}' must come before '{{label}}'")
        between, after = rest.split("{label}")
        if not after:
            raise ValueError(f"template {template!r} needs text after '{{label}}' (e.g. a newline) to end a demonstration")
        stripped = between.rstrip()
        return cls(before, stripped, between[len(stripped):], after)

    def candidate(self, label: str) -> str:
        return self.label_lead + label + self.after


def normalize(text: str) -> str:
    """For exact match: lowercase, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# -----------------------------------------------------------------------------------------------
# 2. Choosing demonstrations (always from the train split)


def balanced_pool(labels: Sequence[str], per_class: int, rng: random.Random) -> list[int]:
    """Indices of `per_class` random train examples of every label: a class-balanced pool."""
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    short = {y: len(ix) for y, ix in by_label.items() if len(ix) < per_class}
    if short:
        raise ValueError(f"--pool-per-class {per_class}: these train labels have fewer examples: {short}")
    return sorted(i for y in sorted(by_label) for i in rng.sample(by_label[y], per_class))


def kate_neighbours(queries: Tensor, pool: Tensor, k: int) -> Tensor:
    """KATE: indices (Q, k) of each query's k nearest pool rows by cosine similarity, nearest LAST.

    queries (Q, D), pool (N, D). Liu et al. (2021) put the most similar demonstration right before
    the query, where a causal LM attends to it most easily.
    """
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T  # (Q, N)
    return sim.topk(k, dim=-1).indices.flip(-1)  # topk is sorted most similar first


def select_demos(method: str, k: int, pool: Sequence[int], n_queries: int, rng: random.Random,
                 pool_features: Tensor | None = None, query_features: Tensor | None = None) -> list[list[int]]:
    """Demonstrations (train indices) for each of n_queries queries.

    random: k distinct examples drawn afresh for every query; fixed: one draw shared by every query;
    kate: the k nearest by cosine of pooled features (needs pool_features (N, D) for `pool` and
    query_features (Q, D)).
    """
    if k > len(pool):
        raise ValueError(f"k = {k} demonstrations requested but the train pool holds only {len(pool)} examples")
    if method == "random":
        return [rng.sample(list(pool), k) for _ in range(n_queries)]
    if method == "fixed":
        demos = rng.sample(list(pool), k)
        return [list(demos) for _ in range(n_queries)]
    if method == "kate":
        if k == 0:
            return [[] for _ in range(n_queries)]
        neighbours = kate_neighbours(query_features, pool_features, k)  # (Q, k) into pool
        return [[pool[j] for j in row] for row in neighbours.tolist()]
    raise ValueError(f"unknown demo selection {method!r}: expected one of {SELECTIONS}")


# -----------------------------------------------------------------------------------------------
# 3. Scoring: log-likelihood of every candidate label, and greedy generation


def token_logprobs(lm: GPT, hidden: Tensor, targets: Tensor) -> Tensor:
    """log p(target | hidden) for hidden (..., C) and targets (...), via the tied head.

    log_softmax(z)[y] = z_y - logsumexp(z): computing the two terms separately avoids a second
    (..., V) tensor, which at GPT-2's vocabulary of 50,257 is 200 kB per position.
    """
    logits = F.linear(hidden, lm.wte.weight)  # (..., V)
    return logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


@dataclass
class CandidateTrie:
    """The candidate labels as one packed sequence: every distinct proper prefix is one node.

    "activate lights kitchen" and "activate lights none" share the nodes "activate" and "activate
    lights": the LM runs each node once, however many labels continue it. Node i holds the last
    token of its prefix, sits at position P + depth[i] after a prompt of length P, and may attend
    to the prompt and to its own prefix nodes only (visible), exactly what it would see in the
    sequence prompt + that one label.
    """

    tokens: Tensor  # (M,) each node's last token
    depth: Tensor  # (M,) its prefix length - 1
    visible: Tensor  # (M, M) bool: node j is a prefix of node i (or i itself)
    first: Tensor  # (L,) each candidate's first token (predicted by the prompt's last position)
    node: Tensor  # (Q,) for each later token of each candidate: the node whose output predicts it,
    target: Tensor  # (Q,) that token,
    owner: Tensor  # (Q,) and its candidate.

    @classmethod
    def build(cls, candidates: Sequence[Sequence[int]], device=None) -> "CandidateTrie":
        if any(len(c) == 0 for c in candidates):
            raise ValueError("a candidate label encodes to zero tokens")
        index: dict[tuple[int, ...], int] = {}  # prefix -> node; parents are inserted before children
        for c in candidates:
            for j in range(1, len(c)):
                index.setdefault(tuple(c[:j]), len(index))
        visible = torch.zeros(len(index), len(index), dtype=torch.bool)
        for prefix, i in index.items():
            visible[i, [index[prefix[:j]] for j in range(1, len(prefix) + 1)]] = True
        pairs = [(index[tuple(c[:j])], c[j], l) for l, c in enumerate(candidates) for j in range(1, len(c))]
        node, target, owner = zip(*pairs) if pairs else ((), (), ())
        t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(tokens=t([p[-1] for p in index]), depth=t([len(p) - 1 for p in index]),
                   visible=visible.to(device), first=t([c[0] for c in candidates]),
                   node=t(node), target=t(target), owner=t(owner))


@torch.no_grad()
def rank_scores(lm: GPT, prompt: Prompt, candidates: Sequence[Sequence[int]]) -> Tensor:
    """Summed log-likelihood (B, L) of each of L candidate continuations after each of B prompts.

    1. One forward over the (right-padded) prompts keeps the KV cache. The hidden state at each
       prompt's last real position predicts every candidate's first token.
    2. One more forward runs all candidates at once, packed after the cached prompt as the M nodes
       of their prefix trie (CandidateTrie), with a full attention mask (each node sees the
       prompt's real positions and its own prefix) and positions continuing the prompt's own
       length. Every node's output predicts the next token of the labels through it.
    Cost: B*(T + M) positions, against B*L*(T + N) for the naive scorer: for FSC's 31 labels,
    M is ~120 (labels of 5-16 tokens, the micro world) or ~50 (3-4 tokens, GPT-2's BPE).
    """
    B, T, _ = prompt.embeds.shape
    trie = CandidateTrie.build(candidates, device=prompt.embeds.device)
    mask = prompt.attention_mask  # (B, T), padding on the right
    P = mask.sum(1)  # (B,) prompt lengths
    # No attention_mask here: with right padding a causal LM's real positions never see the
    # padding, and without a mask attention takes the fast causal kernel.
    h, cache = lm(inputs_embeds=prompt.embeds, return_hidden=True, use_cache=True)  # (B, T, C)
    first = F.linear(h[torch.arange(B, device=h.device), P - 1], lm.wte.weight).log_softmax(-1)  # (B, V)
    scores = first[:, trie.first]  # (B, L): log p(first token of each candidate)
    M = len(trie.tokens)
    if M == 0:
        return scores  # single-token labels: the prompt pass said everything
    attn = torch.cat([mask[:, None, None, :].expand(B, 1, M, T), trie.visible.expand(B, 1, M, M)], -1)  # (B, 1, M, T+M)
    pos = P[:, None] + trie.depth  # (B, M)
    h = lm(trie.tokens.expand(B, M), position_ids=pos, attention_mask=attn, kv_cache=cache,
           return_hidden=True)  # (B, M, C)
    logits = F.linear(h, lm.wte.weight)  # (B, M, V)
    # log p(target | node) = logit - logsumexp over the vocabulary, for every (node, target) pair
    lp = logits[:, trie.node, trie.target] - torch.logsumexp(logits, dim=-1)[:, trie.node]  # (B, Q)
    return scores.index_add(1, trie.owner, lp)


@torch.no_grad()
def rank_scores_naive(lm: GPT, prompt: Prompt, candidates: Sequence[Sequence[int]]) -> Tensor:
    """The oracle for `rank_scores`: one full forward over prompt + candidate per (query, label).

    Only the positions that predict the candidate go through the LM head, as the cached scorer
    does, so that the speed comparison measures the cache and the batching, not the head."""
    B = prompt.embeds.shape[0]
    scores = torch.zeros(B, len(candidates))
    for b in range(B):
        x = prompt.embeds[b, : int(prompt.attention_mask[b].sum())]  # (P, C) real positions only
        for l, c in enumerate(candidates):
            c = torch.as_tensor(list(c), dtype=torch.long, device=x.device)
            seq = torch.cat([x, lm.wte(c)])[None, :-1]  # (1, P + n - 1, C): the last token predicts nothing
            h = lm(inputs_embeds=seq, return_hidden=True)[0, x.shape[0] - 1:]  # (n, C): positions predicting c
            scores[b, l] = token_logprobs(lm, h, c).sum()
    return scores


@torch.no_grad()
def generate_greedy(lm: GPT, prompt: Prompt, max_new_tokens: int, stop: Sequence[int],
                    first_token_bias: Tensor | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt until it ends with the token sequence `stop` (or EOT).

    Returns the new tokens per prompt, `stop` excluded. Right-padded prompts continue at their own
    lengths (explicit positions, padding masked), the whole batch in lockstep with one KV cache.
    first_token_bias (B, V) is subtracted from the first step's log-probabilities (calibration).
    """
    B, T, _ = prompt.embeds.shape
    mask = prompt.attention_mask
    P = mask.sum(1)
    h, cache = lm(inputs_embeds=prompt.embeds, return_hidden=True, use_cache=True)
    logits = F.linear(h[torch.arange(B), P - 1], lm.wte.weight)  # (B, V)
    if first_token_bias is not None:
        logits = logits.log_softmax(-1) - first_token_bias
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop = list(stop)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = out[b][-len(stop):] == stop
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=mask.device)], 1)
        h, cache = lm(token[:, None], position_ids=(P + step)[:, None], attention_mask=mask,
                      kv_cache=cache, use_cache=True, return_hidden=True)
        logits = F.linear(h[:, -1], lm.wte.weight)
    return [o[: -len(stop)] if o[-len(stop):] == stop else o for o in out]


# -----------------------------------------------------------------------------------------------
# 4. Inputs: transcripts, speech soft tokens, pooled features


@dataclass
class Split:
    """The utterances of one split: transcripts, label texts, and a loader for the waveforms."""

    texts: list[str]
    labels: list[str]
    audio: Callable[[int], Tensor] | None = None  # i -> waveform (S,) at 16 kHz; None: text only
    name: str = "split"

    def __len__(self) -> int:
        return len(self.labels)


class SpeechBank:
    """Soft tokens (projector output) and pooled encoder features of utterances, computed once.

    The encoder and projector are frozen, so every utterance's soft tokens are fixed: a demo used by
    many queries is encoded once. Only what is asked for is kept (a real train split of 23k clips
    would need GBs of soft tokens, but few of them are ever used as demonstrations).
    """

    def __init__(self, seal: Seal, split: Split, batch_size: int = 16):
        if split.audio is None:
            raise ValueError(f"{split.name}: speech mode needs audio, but this split has none")
        self.seal, self.split, self.batch_size = seal, split, batch_size
        self.soft: dict[int, Tensor] = {}
        self.pooled: dict[int, Tensor] = {}

    @torch.no_grad()
    def _encode(self, indices: Sequence[int], keep_soft: bool) -> None:
        device = self.seal.decoder.wte.weight.device
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start: start + self.batch_size]
            wavs = [self.split.audio(i) for i in chunk]
            wav, lengths = data.pad_batch(wavs, data.WAV_PAD_MULTIPLE)  # (b, S), (b,)
            feats, frames = self.seal.encode(wav.to(device), lengths.to(device))  # (b, T, C_enc), (b,)
            real = (torch.arange(feats.shape[1], device=device)[None, :] < frames[:, None]).float()
            pooled = (feats * real[..., None]).sum(1) / frames[:, None].clamp(min=1)  # masked mean (b, C_enc)
            soft = self.seal.speech_embeds(feats, frames) if keep_soft else [None] * len(chunk)
            for i, p, s in zip(chunk, pooled, soft):
                self.pooled[i] = p
                if keep_soft:
                    self.soft[i] = s

    def soft_tokens(self, indices: Sequence[int]) -> list[Tensor]:
        self._encode(sorted({i for i in indices if i not in self.soft}), keep_soft=True)
        return [self.soft[i] for i in indices]

    def features(self, indices: Sequence[int]) -> Tensor:
        self._encode(sorted({i for i in indices if i not in self.pooled}), keep_soft=False)
        return torch.stack([self.pooled[i] for i in indices])  # (N, C_enc)


@torch.no_grad()
def text_features(lm: GPT, tokenizer, texts: Sequence[str], batch_size: int = 32) -> Tensor:
    """Mean of the LM's final hidden states over each transcript: KATE's features without speech."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(t) or [0] for t in texts[start: start + batch_size]]
        prompt = build_prompt([[i] for i in ids], lm.wte)
        h = lm(inputs_embeds=prompt.embeds, return_hidden=True)  # (b, T, C)
        m = prompt.attention_mask[..., None].float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


# -----------------------------------------------------------------------------------------------
# 5. Few-shot prompts and one evaluation run


@dataclass
class RunConfig:
    k: int = 5  # demonstrations per prompt
    mode: str = "speech"  # speech | text | none
    select: str = "random"  # random | fixed | kate
    scoring: str = "rank"  # rank | generate
    length_norm: bool = False  # rank by mean log-prob per token instead of the sum
    calibrate: bool = False  # contextual calibration (Zhao et al. 2021)
    pool_per_class: int = 0  # >0: demos drawn from a class-balanced pool of this many per label
    truncate: bool = False  # drop the farthest demos of a prompt that exceeds the LM's context
    batch_size: int = 8  # queries per forward

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("select", self.select, SELECTIONS),
                                     ("scoring", self.scoring, SCORINGS)):
            if value not in allowed:
                raise ValueError(f"RunConfig.{name}: expected one of {allowed}, got {value!r}")
        if self.k < 0 or self.batch_size < 1 or self.pool_per_class < 0:
            raise ValueError(f"RunConfig: k and pool_per_class must be >= 0 and batch_size >= 1, got {self}")


class FewShot:
    """Everything a few-shot evaluation needs: the LM, its tokenizer, the splits, the label set,
    and (for speech) a Seal. `run(config, seed)` evaluates the test split once."""

    def __init__(self, lm: GPT, tokenizer, train: Split, test: Split, labels: Sequence[str] | None = None,
                 seal: Seal | None = None, template: str = DEFAULT_TEMPLATE):
        for split in (train, test):
            if len(split) == 0:
                raise ValueError(f"the {split.name} split is empty")
        self.lm, self.tokenizer, self.seal = lm.eval(), tokenizer, seal
        self.train, self.test = train, test
        self.template = Template.parse(template)
        self.labels = sorted(set(train.labels) | set(test.labels)) if labels is None else list(labels)
        known = set(self.labels)
        for split in (train, test):
            missing = sorted({y for y in split.labels if y not in known})
            if missing:
                role = "demo" if split is train else "query"
                raise ValueError(f"{split.name}: {role} label(s) {missing[:5]} not in the label set of "
                                 f"{len(self.labels)} labels ({', '.join(self.labels[:5])}, ...)")
        self.label_index = {y: i for i, y in enumerate(self.labels)}
        self.candidates = [tokenizer.encode(self.template.candidate(y)) for y in self.labels]
        self.trie = CandidateTrie.build(self.candidates)
        enc = tokenizer.encode
        self.between_ids, self.before_ids = enc(self.template.between), enc(self.template.before)
        self.banks = {s.name: SpeechBank(seal, s) for s in (train, test)} if seal is not None and \
            train.audio is not None and test.audio is not None else {}

    @property
    def stop(self) -> list[int]:
        """The tokens of the end-of-demonstration text as they follow a label (where generation
        stops). Encoded on its own, "\n" may differ (sentencepiece prefixes a lone piece with a
        space), so it is read off the candidates: label + end minus label."""
        label = self.template.label_lead + self.labels[0]
        n = len(self.candidates[0]) - len(self.tokenizer.encode(label))
        stop = self.candidates[0][len(self.candidates[0]) - n:] if n > 0 else []
        if not stop or any(c[len(c) - n:] != stop for c in self.candidates):
            raise ValueError(f"the template's end {self.template.after!r} is not tokenized the same after every "
                             f"label (or not at all), so generation cannot tell where a label ends")
        return stop

    # --- what goes into the input slot

    def check(self, config: RunConfig) -> None:
        """Refuse a run that cannot work, before any work is done."""
        if config.mode in ("speech", "none") and not self.banks:
            raise ValueError(f"--mode {config.mode} needs a Seal checkpoint and audio; only --mode text works with an LM alone")
        pool = len(self.train) if not config.pool_per_class else config.pool_per_class * len(set(self.train.labels))
        if config.k > pool:
            raise ValueError(f"k = {config.k} demonstrations requested but the train pool holds only {pool} examples")

    def features(self, split: Split, indices: Sequence[int]) -> Tensor:
        """Pooled features for KATE (N, D): speech features when a Seal is loaded (so that every mode
        sees the same demonstrations), else the LM's pooled hidden states of the transcripts."""
        if self.banks:
            return self.banks[split.name].features(indices)
        return text_features(self.lm, self.tokenizer, [split.texts[i] for i in indices])

    def content_free(self, mode: str) -> list[list[int] | Tensor]:
        """Inputs with no content for calibration: empty text and "N/A" (Zhao et al. 2021); in speech
        mode, empty and a clip of silence, so that the bias is measured in the query's modality."""
        if mode == "text":
            return [[], self.tokenizer.encode("N/A")]
        silence = torch.zeros(1, int(SILENCE_SECONDS * data.SAMPLE_RATE), device=self.lm.wte.weight.device)
        feats, frames = self.seal.encode(silence, torch.tensor([silence.shape[1]], device=silence.device))
        return [[], self.seal.speech_embeds(feats, frames)[0]]

    def _input(self, split: Split, i: int, mode: str, is_query: bool) -> list[int] | Tensor:
        """The segment that fills the input slot of utterance i (token ids or soft tokens)."""
        if mode == "text":
            return self.tokenizer.encode(split.texts[i])
        if mode == "none" and not is_query:
            return []
        return self.banks[split.name].soft_tokens([i])[0]

    def segments(self, demos: Sequence[int], query_input: list[int] | Tensor, mode: str) -> list[list[int] | Tensor]:
        """[before][input_1][between][candidate(label_1)] ... [before][query input][between]."""
        segs: list = []
        for j in demos:
            y = self.train.labels[j]
            segs += [self.before_ids, self._input(self.train, j, mode, is_query=False), self.between_ids,
                     self.candidates[self.label_index[y]]]
        segs += [self.before_ids, query_input, self.between_ids]
        return [s for s in segs if len(s)]

    def _fit(self, demos: list[int], inputs: list[list[int] | Tensor], mode: str, query: int, n_new: int,
             truncate: bool) -> tuple[list[list], int]:
        """Segments of the prompt for each of `inputs` (the query, then any content-free inputs),
        with the same demonstrations, leaving room for n_new positions in the LM's context.

        Too long: with truncate, drop demonstrations from the front (the least similar for kate,
        nearest last) until the longest prompt fits, and report how many were dropped; without, refuse."""
        limit = self.lm.config.block_size - n_new
        for dropped in range(len(demos) + 1):
            prompts = [self.segments(demos[dropped:], x, mode) for x in inputs]
            length = max(sum(len(s) for s in segs) for segs in prompts)
            if length <= limit:
                return prompts, dropped
            if not truncate:
                raise ValueError(
                    f"query {query}: prompt of {length} positions ({len(demos)} demos) + {n_new} label positions "
                    f"exceeds the LM's context of {self.lm.config.block_size}; use a smaller --k or --truncate")
        raise ValueError(f"query {query}: even without demonstrations the prompt ({length} positions) + "
                         f"{n_new} label positions exceeds the LM's context of {self.lm.config.block_size}")

    # --- one run

    @torch.no_grad()
    def run(self, config: RunConfig, seed: int = 0, queries: Sequence[int] | None = None,
            scorer: Callable = rank_scores, progress: tqdm | None = None) -> dict:
        """Evaluate the test queries (default all) once; returns predictions and accuracy.

        `scorer` is rank_scores or rank_scores_naive (same results, different speed)."""
        self.check(config)
        queries = list(range(len(self.test))) if queries is None else list(queries)
        if not queries:
            raise ValueError(f"the {self.test.name} split has no queries to evaluate")
        rng = random.Random(seed)
        pool = list(range(len(self.train)))
        if config.pool_per_class:
            pool = balanced_pool(self.train.labels, config.pool_per_class, rng)
        feats = {}
        if config.select == "kate" and config.k:
            feats = dict(pool_features=self.features(self.train, pool), query_features=self.features(self.test, queries))
        demos = select_demos(config.select, config.k, pool, len(queries), rng, **feats)
        # Room after the prompt: rank_scores packs all labels' trie nodes there; generation its tokens.
        n_new = len(self.trie.tokens) if config.scoring == "rank" else self.max_new_tokens
        cf_inputs = self.content_free(config.mode) if config.calibrate else []

        predictions, dropped = [], 0
        for start in range(0, len(queries), config.batch_size):
            batch = queries[start: start + config.batch_size]
            rows = []
            for q, d in zip(batch, demos[start: start + config.batch_size]):
                # Calibration prompts: the same demonstrations, the query replaced by a content-free input.
                inputs = [self._input(self.test, q, config.mode, is_query=True), *cf_inputs]
                prompts, n = self._fit(d, inputs, config.mode, q, n_new, config.truncate)
                rows.append(prompts)
                dropped += n
            predictions += self._predict(rows, config, scorer)
            if progress is not None:
                progress.update(len(batch))
        gold = [self.test.labels[q] for q in queries]
        correct = [p == g for p, g in zip(predictions, gold)]
        return dict(seed=seed, accuracy=sum(correct) / len(correct), predictions=predictions, gold=gold,
                    demos=[[int(j) for j in d] for d in demos], dropped_demos=dropped)

    @property
    def max_new_tokens(self) -> int:
        return max(len(c) for c in self.candidates) + len(self.stop)  # room to stop after the longest label

    def _predict(self, rows: list[list[list]], config: RunConfig, scorer: Callable) -> list[str]:
        """Predicted label text for each query; rows[b] = [query segments, *content-free segments]."""
        n_cf = len(rows[0]) - 1
        prompt = build_prompt([r for row in rows for r in row], self.lm.wte)  # (B * (1 + n_cf), T, C)
        B = len(rows)
        if config.scoring == "rank":
            scores = scorer(self.lm, prompt, self.candidates)  # (B * (1 + n_cf), L)
            if config.length_norm:
                scores = scores / torch.tensor([len(c) for c in self.candidates], dtype=scores.dtype)
            scores = scores.view(B, 1 + n_cf, -1)
            best = calibrated(scores[:, 0], scores[:, 1:]).argmax(-1) if n_cf else scores[:, 0].argmax(-1)
            return [self.labels[i] for i in best.tolist()]
        # generate: calibrate the first token, the one that commits to a label in most tasks
        bias = None
        if n_cf:
            idx = torch.arange(B * (1 + n_cf)).view(B, 1 + n_cf)
            cf_prompt = subset(prompt, idx[:, 1:].reshape(-1))
            cf_logp = first_token_logprobs(self.lm, cf_prompt).view(B, n_cf, -1)
            bias = cf_logp.exp().mean(1).log()  # (B, V): mean content-free distribution
            prompt = subset(prompt, idx[:, 0])
        out = generate_greedy(self.lm, prompt, self.max_new_tokens, self.stop, first_token_bias=bias)
        by_norm = {normalize(y): y for y in self.labels}
        texts = [self.tokenizer.decode(o) for o in out]
        return [by_norm.get(normalize(t), normalize(t)) for t in texts]


def calibrated(scores: Tensor, cf_scores: Tensor) -> Tensor:
    """Contextual calibration: log p(y | x) - log mean_cf p(y | cf), p normalized over the labels.

    scores (B, L), cf_scores (B, n_cf, L). Dividing by the content-free probability removes the
    prompt's prior for each label (Zhao et al. 2021, with W = diag(p_cf)^-1 and b = 0).
    """
    p_cf = cf_scores.log_softmax(-1).exp().mean(1)  # (B, L)
    return scores.log_softmax(-1) - p_cf.log()


def subset(prompt: Prompt, rows: Tensor) -> Prompt:
    """The prompt restricted to some of its rows."""
    return Prompt(*(getattr(prompt, f)[rows] for f in ("embeds", "attention_mask", "position_ids", "starts", "lengths")))


@torch.no_grad()
def first_token_logprobs(lm: GPT, prompt: Prompt) -> Tensor:
    """log p(next token | prompt) (B, V) at each prompt's last real position."""
    h = lm(inputs_embeds=prompt.embeds, return_hidden=True)
    B = h.shape[0]
    return F.linear(h[torch.arange(B), prompt.attention_mask.sum(1) - 1], lm.wte.weight).log_softmax(-1)


# -----------------------------------------------------------------------------------------------
# 6. Statistics over seeds


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (numpy only): bisection on the CDF, whose density
    Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) * (1 + x^2/df)^(-(df+1)/2) is integrated by Simpson's rule."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0; the density is symmetric, so P(T <= 0) = 1/2
        x = np.linspace(0.0, t, 2001)  # an even number of intervals, as Simpson's rule needs
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + (t / 2000) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1e3  # the 0.999 quantile at df = 1 is 318
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """Mean and half-width of the t-distribution confidence interval (None for a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    sem = float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, t_quantile(0.5 + confidence / 2, n - 1) * sem


def summarize(runs: Sequence[dict], labels: Sequence[str], top_confusions: int = 10) -> dict:
    """Accuracy over seeds (mean, CI), per-label accuracy and most frequent confusions (all seeds pooled)."""
    mean, half = mean_ci([r["accuracy"] for r in runs])
    per_label = {y: [0, 0] for y in labels}
    confusions: Counter = Counter()
    for r in runs:
        for p, g in zip(r["predictions"], r["gold"]):
            per_label[g][0] += p == g
            per_label[g][1] += 1
            if p != g:
                confusions[(g, p)] += 1
    return dict(
        accuracy=mean,
        ci95=half,
        per_seed=[r["accuracy"] for r in runs],
        per_label={y: c / n for y, (c, n) in per_label.items() if n},
        confusions=[dict(gold=g, predicted=p, count=n) for (g, p), n in confusions.most_common(top_confusions)],
        dropped_demos=sum(r["dropped_demos"] for r in runs),
    )


# -----------------------------------------------------------------------------------------------
# 7. Loading data and models, the command line


def load_split(task: str, data_dir: str | Path, split: str) -> Split:
    """A split of FSC (folder `fluent_speech_commands_dataset`) or SLURP (repository clone), read
    with data.py's loaders; labels become natural text (`label_text`). Audio is loaded on demand."""
    dataset = data.FluentSpeechCommands(data_dir, split) if task == "fsc" else data.Slurp(data_dir, split)
    return Split(texts=[r["text"] for r in dataset.rows], labels=[label_text(task, r["label"]) for r in dataset.rows],
                 audio=lambda i: dataset[i]["wav"], name=f"{task}/{split}")


def find_micro_world(task: str) -> tuple[Path | None, Path | None]:
    """The micro world's (python train.py) Seal projector and synthetic set for `task`.

    The projector is the chain's own, $SEAL_CACHE/micro-world/seal-fsc/projector.safetensors, when it
    exists: the command the chain prints then evaluates what the chain trained, even after other
    projectors were trained in the same cache (bench/bench_projector_seeds.py writes its seeds there).
    Otherwise it is the newest `projector.safetensors` under $SEAL_CACHE (default ~/.cache/seal) and ./runs
    trained with the KL loss (Seal; a CE-trained PSRT one only if there is no other). The set is the
    newest folder there in the FSC layout (data/train_data.csv) or SLURP layout (dataset/slurp/train.jsonl).
    """
    from train import PROJECTOR_FOLDERS, PROJECTOR_NAME, WorldConfig  # the chain's layout (train.py is read first)

    roots = [r for r in (data.default_cache_dir(), Path("runs")) if r.is_dir()]
    newest = lambda paths: max(paths, key=lambda p: p.stat().st_mtime, default=None)  # noqa: E731
    ckpt = WorldConfig().world_dir / PROJECTOR_FOLDERS["kl"] / PROJECTOR_NAME
    if not ckpt.is_file():
        ckpts = [p for r in roots for p in r.rglob(PROJECTOR_NAME)]
        ckpt = newest([p for p in ckpts if read_projector(p)[0].loss == "kl"] or ckpts)
    index = ("data", "train_data.csv") if task == "fsc" else ("dataset", "slurp", "train.jsonl")
    sets = [p.parents[len(index) - 1] for r in roots for p in r.rglob(index[-1]) if p.parts[-len(index):] == index]
    return ckpt, newest(sets)


def load_models(ckpt: str | None, lm_name: str | None, encoder_name: str | None,
                device: str) -> tuple[GPT, object, Seal | None]:
    """(LM, tokenizer, Seal or None). With a checkpoint, the encoder and LM it names are loaded;
    --lm / --encoder, when also given, must be the ones it was trained with."""
    if ckpt is None:
        lm = GPT.from_pretrained(lm_name)
        return lm.to(device).eval(), load_tokenizer(lm_name), None
    seal = Seal.from_pretrained(ckpt)
    for flag, asked, trained in (("--lm", lm_name, seal.config.lm), ("--encoder", encoder_name, seal.config.encoder)):
        if asked is not None and asked != trained:
            raise ValueError(f"{ckpt}: this projector was trained for {flag[2:]} {trained!r}, not {asked!r}; "
                             f"a projector only works with the encoder and LM it was trained with")
    seal = seal.to(device).eval()
    return seal.decoder, seal.tokenizer, seal


def plot_accuracy(results: list[dict], chance: float, path: Path) -> bool:
    """Accuracy vs k, one line per mode (error bars: the CI over seeds). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in dict.fromkeys(r["mode"] for r in results):
        rs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["k"])
        ax.errorbar([r["k"] for r in rs], [r["accuracy"] for r in rs], yerr=[r["ci95"] or 0 for r in rs],
                    marker="o", capsize=3, label=mode)
    ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xticks(sorted({r["k"] for r in results}))
    ax.set_xlabel("k (demonstrations)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Few-shot intent classification with Seal: k spoken demonstrations in the prompt, no training. "
                    "Without --ckpt/--data-dir it evaluates the micro world (python train.py) on its synthetic set.",
)
    p.add_argument("--task", choices=("fsc", "slurp"), default="fsc", help="Fluent Speech Commands or SLURP (default: fsc)")
    p.add_argument("--k", type=int, nargs="+", default=[5], help="demonstrations per prompt; several values: one run each (default: 5)")
    p.add_argument("--mode", choices=MODES, nargs="+", default=["speech"],
                   help="input slot: speech (Seal), text (true transcripts: the upper bound), none (demos without input); "
                        "several: one run each (default: speech)")
    p.add_argument("--select", choices=SELECTIONS, default="random",
                   help="demos: random per query, fixed per seed, or kate (nearest neighbours of the query) (default: random)")
    p.add_argument("--scoring", choices=SCORINGS, default="rank",
                   help="rank the task's labels by log-likelihood, or generate greedily and match exactly (default: rank)")
    p.add_argument("--length-norm", action="store_true", help="rank by mean log-prob per label token")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration with content-free inputs")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1 and report a 95%% CI over seeds (default: 1)")
    p.add_argument("--pool-per-class", type=int, default=0, help="draw demos from a class-balanced pool of N per label (default: the whole train split)")
    p.add_argument("--truncate", action="store_true",
                   help="drop the farthest demos of a prompt longer than the LM's context (default: refuse)")
    p.add_argument("--ckpt", help="Seal projector checkpoint (default: the micro world's, "
                                  "$SEAL_CACHE/micro-world/seal-fsc; without it, the newest Seal projector "
                                  "under $SEAL_CACHE and ./runs)")
    p.add_argument("--lm", help="LM for --mode text without a checkpoint (with --ckpt: must match it)")
    p.add_argument("--encoder", help="with --ckpt: the encoder it must have been trained with")
    p.add_argument("--data-dir", help="real FSC folder (fluent_speech_commands_dataset) or SLURP clone "
                                      "(default: the micro world's synthetic set)")
    p.add_argument("--split", default="test", help="split to evaluate; demos always come from train (default: test)")
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of N queries (default: all)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="demonstration line with {input} and {label} (default: %(default)r)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward (default: 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    p.add_argument("--out", help="write results as JSON here (and a PNG of accuracy vs k next to it)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.limit < 0 or min(args.k) < 0:
        p.error("--seeds must be >= 1, --limit >= 0 and every --k >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return evaluate_cli(args)
    except (ValueError, OSError) as e:  # user mistakes: a message, not a stack trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluate_cli(args: argparse.Namespace) -> dict:
    world_ckpt, world_data = find_micro_world(args.task) if args.ckpt is None or args.data_dir is None else (None, None)
    synthetic = args.data_dir is None
    ckpt = args.ckpt
    if ckpt is None and args.lm is None:
        if world_ckpt is None:
            raise ValueError("no --ckpt given and no micro-world checkpoint (projector.safetensors) under "
                             "$SEAL_CACHE or ./runs: run `python train.py` first, or pass --ckpt (or --lm for --mode text)")
        ckpt = str(world_ckpt)
    if synthetic:
        if world_data is None:
            raise ValueError(f"no --data-dir given and no synthetic {args.task.upper()}-style set under $SEAL_CACHE "
                             f"or ./runs: run `python train.py` (or `python data.py synth --out DIR`) first")
        data_dir = world_data
        print(f"data: the micro world's SYNTHETIC {args.task.upper()}-style set at {data_dir} (not the real dataset)")
    else:
        data_dir = Path(args.data_dir)
    lm, tokenizer, seal = load_models(ckpt, args.lm, args.encoder, args.device)
    train, test = load_split(args.task, data_dir, "train"), load_split(args.task, data_dir, args.split)
    # FSC has a fixed set of 31 intents; SLURP's labels are those its splits use.
    labels = sorted(label_text("fsc", i.label) for i in data.fsc_grammar().intents) if args.task == "fsc" else None
    fewshot = FewShot(lm, tokenizer, train, test, labels=labels, seal=seal, template=args.template)
    queries = list(range(len(test)))
    if args.limit and args.limit < len(queries):
        queries = sorted(random.Random(0).sample(queries, args.limit))  # the same queries for every run
    print(f"{args.task}: {len(train)} train (demo pool), {len(queries)} {args.split} queries, "
          f"{len(fewshot.labels)} labels (chance {1 / len(fewshot.labels):.1%}); model: {ckpt or args.lm}")

    configs = [RunConfig(k=k, mode=mode, select=args.select, scoring=args.scoring, length_norm=args.length_norm,
                         calibrate=args.calibrate, pool_per_class=args.pool_per_class, truncate=args.truncate,
                         batch_size=args.batch_size) for mode in args.mode for k in args.k]
    for config in configs:
        fewshot.check(config)
    results = []
    with tqdm(total=len(configs) * args.seeds * len(queries), desc="few-shot", unit="query") as bar:
        for config in configs:
            bar.set_postfix(mode=config.mode, k=config.k)
            runs = [fewshot.run(config, seed, queries, progress=bar) for seed in range(args.seeds)]
            results.append(dict(mode=config.mode, k=config.k, **summarize(runs, fewshot.labels), runs=runs))
    for r in results:
        ci = f" ± {r['ci95']:.1%} (95% CI, {args.seeds} seeds)" if r["ci95"] is not None else ""
        print(f"{r['mode']:>6} k={r['k']}: accuracy {r['accuracy']:.1%}{ci}")
    if len(results) == 1:
        worst = sorted(results[0]["per_label"].items(), key=lambda kv: kv[1])[:5]
        print("  lowest per-label accuracy: " + ", ".join(f"{y!r} {a:.0%}" for y, a in worst))
        for c in results[0]["confusions"][:5]:
            print(f"  confused: {c['gold']!r} -> {c['predicted']!r} ({c['count']}x)")
    report = dict(
        accuracy=results[0]["accuracy"] if len(results) == 1 else {f"{r['mode']} k={r['k']}": r["accuracy"] for r in results},
        task=args.task, data=str(data_dir), synthetic=synthetic, checkpoint=ckpt, lm=args.lm,
        labels=fewshot.labels, queries=len(queries), settings={k: v for k, v in vars(args).items() if k != "out"},
        results=results,
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        png = out.with_suffix(".png")
        print(f"wrote {out}" + (f" and {png}" if plot_accuracy(results, 1 / len(fewshot.labels), png) else " (no plot: matplotlib not installed)"))
    return report


if __name__ == "__main__":
    main()
