"""Seal: a frozen speech encoder, a trainable projector, a frozen language model.

    waveform --HuBERT (frozen)--> frames (B, T, 768) --Projector--> soft tokens (B, T/k, C_lm)
    soft tokens are spliced into the LM's input embeddings, next to ordinary text tokens.

The LM never learns anything: it is asked to treat a span of soft tokens exactly as it treats
the transcript of that speech. We train the projector so that the LM's next-token distributions
match in these two prompts (REFERENCE.md, "The method"):

    teacher:  [t] [sep] [o]            t = transcript tokens, sep = separator text, o = target text
    student:  [speech(s)] [sep] [o]
    loss   =  mean over the positions that predict o of KL(teacher || student) over the vocabulary

With o = t (the default) the LM must *copy* the transcript after the separator, which it can only
do from the student prompt if the soft tokens carry the words: this is the induction-head skill
that in-context learning needs. Few-shot prompts put speech in the middle of a prompt, after
other lines, so training can do the same: with config.lines = L, L examples share a row, one line
each ([s1][sep][o1] \n [s2][sep][o2] \n ...), teacher and student alike, and the KL covers every
line's o. The soft tokens then have to work wherever a line starts, not only at position 0.
The PSRT baseline instead trains [speech] [sep] [t] with next-token cross-entropy on t (speech
recognition through the LM).

Both prompts, and the few-shot prompts of fewshot.py (k x ([speech_i] [sep] [label_i]) + query),
are built by one function, `build_prompt`, from a list of *segments* per example: a text segment is
a list of token ids, a speech segment is a (L, C_lm) tensor of soft tokens. It returns right-padded
input embeddings, the attention mask and where every segment landed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoder import load_safetensors, read_safetensors_metadata, save_safetensors
from projector import Projector, ProjectorConfig, ce_loss, fused_kl_loss

# A text segment is a sequence of token ids (list or 1-D long tensor); a speech segment is a
# 2-D float tensor (L, C_lm) of soft tokens, usually produced by Seal.speech_embeds.
Segment = Union[Sequence[int], torch.Tensor]

CHECKPOINT_FORMAT = "seal-projector-v1"  # stored in the safetensors metadata, checked on load


# -----------------------------------------------------------------------------
# Prompts built from segments


@dataclass
class Prompt:
    embeds: torch.Tensor  # (B, T, C) input embeddings, right-padded with zeros
    attention_mask: torch.Tensor  # (B, T) bool, True = real position
    position_ids: torch.Tensor  # (B, T) 0, 1, 2, ... in every row (padding sits at the end)
    starts: torch.Tensor  # (B, S) index in the row where segment s begins
    lengths: torch.Tensor  # (B, S) its length (0 for a row with fewer segments)

    def positions(self, seg: int | Sequence[int]) -> torch.Tensor:
        """Flat indices into (B * T) of segment `seg`'s positions, row by row (for several segments:
        row by row, and within a row in the order given)."""
        return self._span(_segment_list(seg), shift=0)

    def predicting(self, seg: int | Sequence[int]) -> torch.Tensor:
        """Flat indices into (B * T) of the positions whose *next* token is in segment `seg` (or in
        each of several segments, ordered as in `positions`).

        A causal LM's output at position i predicts token i + 1, so these are the segment's
        positions shifted left by one. The segment's first token is predicted by the last
        position of the segment before it, hence `seg` must not start a row.
        """
        segs = _segment_list(seg)
        if bool(((self.starts[:, segs] == 0) & (self.lengths[:, segs] > 0)).any()):
            raise ValueError(f"Prompt.predicting: segment {seg} starts a row; nothing predicts its first token")
        return self._span(segs, shift=-1)

    def _span(self, segs: list[int], shift: int) -> torch.Tensor:
        B, T = self.attention_mask.shape
        L = self.lengths[:, segs].reshape(-1)  # (B * S,) row-major: row b's segments, then row b + 1's
        rows = torch.arange(B, device=L.device).repeat_interleave(len(segs))  # (B * S,)
        row = torch.repeat_interleave(rows, L)  # (N,)
        first = torch.repeat_interleave(self.starts[:, segs].reshape(-1) + shift, L)  # (N,)
        offset = torch.arange(int(L.sum()), device=L.device) - torch.repeat_interleave(L.cumsum(0) - L, L)
        return row * T + first + offset


def _segment_list(seg: int | Sequence[int]) -> list[int]:
    return [seg] if isinstance(seg, int) else list(seg)


def _is_speech(seg: Segment) -> bool:
    return isinstance(seg, torch.Tensor) and seg.is_floating_point()


def build_prompt(rows: Sequence[Sequence[Segment]], wte: nn.Embedding) -> Prompt:
    """Concatenate each row's segments into LM input embeddings; right-pad the batch.

    Text segments are embedded with the LM's token embedding `wte` (all of them in one lookup);
    speech segments are used as given (their gradient flows back to the projector). Positions are
    0..len-1 in every row and padding sits at the end, so a causal LM's real positions never see
    padding, and an example gives the same result alone or in a batch.

    A training step or a few-shot batch holds hundreds of segments, so the layout is planned in
    Python and the tensors are assembled by one gather: every position (b, t) reads one row of
    [text embeddings; speech segments; a zero row for padding].
    """
    device, dtype = wte.weight.device, wte.weight.dtype
    C = wte.weight.shape[1]
    n_seg = max((len(r) for r in rows), default=0)
    token_ids: list[int] = []  # every text token, in row order
    speech: list[torch.Tensor] = []
    lengths = [[0] * n_seg for _ in rows]  # (B, S)
    sources: list[list[tuple[bool, int]]] = []  # per row, per segment: (is speech, start in its source)
    n_speech = 0
    for b, row in enumerate(rows):
        sources.append([])
        for s, seg in enumerate(row):
            if _is_speech(seg):
                if seg.dim() != 2 or seg.shape[1] != C:
                    raise ValueError(f"build_prompt: speech segment must be (L, {C}), got {tuple(seg.shape)}")
                sources[b].append((True, n_speech))
                speech.append(seg.to(device=device, dtype=dtype))
                lengths[b][s] = seg.shape[0]
                n_speech += seg.shape[0]
            else:
                ids = seg.reshape(-1).tolist() if isinstance(seg, torch.Tensor) else list(seg)
                sources[b].append((False, len(token_ids)))
                lengths[b][s] = len(ids)
                token_ids += ids
    row_len = [sum(r) for r in lengths]
    B, T = len(rows), max(row_len, default=0)
    # the source: text embeddings, then speech, then one zero row that every padding position reads
    n_text = len(token_ids)
    pad = n_text + n_speech
    index = []  # (B * T,)
    for b in range(B):
        for (is_speech, start), n in zip(sources[b], lengths[b]):
            first = n_text + start if is_speech else start
            index += range(first, first + n)
        index += [pad] * (T - row_len[b])
    text = wte(torch.tensor(token_ids, dtype=torch.long, device=device))  # (n_text, C)
    source = torch.cat([text, *speech, text.new_zeros(1, C)])  # (n_text + n_speech + 1, C)
    embeds = source[torch.tensor(index, dtype=torch.long, device=device)].view(B, T, C)  # (B, T, C)
    lengths_t = torch.tensor(lengths, dtype=torch.long).reshape(B, n_seg)
    positions = torch.arange(T, device=device)
    return Prompt(
        embeds=embeds,
        attention_mask=positions[None, :] < torch.tensor(row_len, device=device).reshape(B, 1),
        position_ids=positions[None, :].expand(B, T),
        starts=(lengths_t.cumsum(1) - lengths_t).to(device),
        lengths=lengths_t.to(device),
    )


# -----------------------------------------------------------------------------
# The model


@dataclass
class SealConfig:
    encoder: str = ""  # name or path the encoder was loaded from (checked when loading a projector)
    lm: str = ""  # name or path of the LM
    encoder_layer: int = -1  # which encoder layer feeds the projector: -1 = the last, 0 = before layer 1
    separator: str = " =>"  # text between the speech (or transcript) and o
    loss: str = "kl"  # "kl" (Seal) or "ce" (PSRT)
    temperature: float = 1.0  # KL temperature T
    lines: int = 1  # examples per training row, one line each (see the module docstring)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self) -> None:
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig(**self.projector)
        if self.lines < 1:
            raise ValueError(f"SealConfig.lines: expected >= 1, got {self.lines}")
        if self.loss not in ("kl", "ce"):
            raise ValueError(f"SealConfig.loss: expected 'kl' or 'ce', got {self.loss!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Seal(nn.Module):
    def __init__(self, encoder: nn.Module, projector: Projector, decoder: nn.Module, tokenizer=None,
                 config: SealConfig | None = None):
        super().__init__()
        self.config = config or SealConfig(projector=projector.config)
        self.encoder, self.projector, self.decoder = encoder, projector, decoder
        self.tokenizer = tokenizer
        # Only the projector learns. Frozen modules stay in eval mode (no dropout) for good: see train().
        for frozen in (encoder, decoder):
            frozen.requires_grad_(False).eval()
        lm_width = decoder.wte.weight.shape[1]
        if projector.config.out_dim != lm_width:
            raise ValueError(f"Seal: projector out_dim {projector.config.out_dim} != LM width {lm_width}")
        self.sep_ids: list[int] = list(tokenizer.encode(self.config.separator)) if tokenizer is not None else []
        # The ids "\n" adds after text, as in the LM's training text (encoding "\n" on its own would
        # give sentencepiece's word-start piece first); taken after the separator, which must encode.
        self.newline_ids: list[int] = (list(tokenizer.encode(self.config.separator + "\n"))[len(self.sep_ids):]
                                       if tokenizer is not None else [])

    def train(self, mode: bool = True) -> "Seal":
        super().train(mode)
        self.encoder.eval()
        self.decoder.eval()
        return self

    @property
    def projector_module(self) -> Projector:
        # train.py wraps the projector in DistributedDataParallel under torchrun; checkpoints and
        # configs always refer to the plain module inside.
        return getattr(self.projector, "module", self.projector)

    # --- speech -> soft tokens

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder: wav (B, S) -> features (B, T, C_enc) of config.encoder_layer, frame lengths (B,)."""
        if self.config.encoder_layer == -1:
            feats, frame_lengths = self.encoder(wav, lengths)[:2]
        else:
            _, frame_lengths, layers = self.encoder(wav, lengths, output_hidden_states=True)
            feats = layers[self.config.encoder_layer]
        return feats, frame_lengths

    def speech_embeds(self, feats: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Projector on a padded batch of features; one (L_i, C_lm) soft-token tensor per example."""
        soft, soft_lengths = self.projector(feats, lengths)  # (B, T', C_lm), (B,)
        return [soft[b, :n] for b, n in enumerate(soft_lengths.tolist())]

    # --- the LM on prompts

    def prompt(self, rows: Sequence[Sequence[Segment]]) -> Prompt:
        return build_prompt(rows, self.decoder.wte)

    def hidden(self, prompt: Prompt) -> torch.Tensor:
        """Final (post-LayerNorm) hidden states (B, T, C) of the LM on a prompt."""
        # Right padding + causal attention: real positions never attend to padding, so no mask is
        # needed here (and without one, attention can take the fast causal kernel).
        return self.decoder(inputs_embeds=prompt.embeds, return_hidden=True)

    def _target_hidden(self, first: Sequence[Segment], targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Hidden states (N, C) at the positions predicting each example's target, example by example.

        Examples go config.lines to a row, one line each:  [f1][sep][o1][\n] ... [fL][sep][oL]
        (the last row may hold fewer). Line l's target is segment 4 * l + 2 of its row."""
        if not self.sep_ids:
            raise ValueError("Seal: empty separator; give the Seal a tokenizer and a non-empty config.separator")
        L = self.config.lines
        rows = []
        for r in range(0, len(first), L):
            row = [seg for f, o in zip(first[r : r + L], targets[r : r + L]) for seg in (f, self.sep_ids, o, self.newline_ids)]
            rows.append(row[:-1])  # no newline after the last line
        prompt = self.prompt(rows)  # a row longer than the LM's context is refused by the LM itself
        h = self.hidden(prompt)  # (B, T, C)
        h = h.reshape(-1, h.shape[-1])
        # row by row, line by line: example order (a shorter last row's missing lines have length 0)
        return h[prompt.predicting([4 * l + 2 for l in range(min(L, len(first)))])]

    @torch.no_grad()
    def teacher_hidden(self, text_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Teacher: frozen LM on [t][sep][o]; hidden states (N, C) at the positions predicting o."""
        return self._target_hidden([list(t) for t in text_ids], target_ids if target_ids is not None else text_ids)

    def student_hidden(self, speech: Sequence[torch.Tensor], target_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Student: frozen LM on [speech][sep][o]; hidden states (N, C) at the positions predicting o."""
        return self._target_hidden(list(speech), target_ids)

    def loss(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        text_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]] | None = None,
        teacher_hidden: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, int]:
        """The training loss on a batch of encoder features, and the number of target tokens.

        kl: fused KL(teacher || student) on the positions predicting o (default o = t). Pass
            `teacher_hidden` (N, C) to reuse cached teacher states instead of running the teacher.
        ce: PSRT, cross-entropy of t after [speech][sep].
        reduction "sum" lets the caller normalize by a token count spanning several micro-batches.
        """
        return self.speech_loss(self.speech_embeds(feats, lengths), text_ids, target_ids, teacher_hidden, reduction)

    def speech_loss(
        self,
        speech: Sequence[torch.Tensor],
        text_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]] | None = None,
        teacher_hidden: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, int]:
        """loss() from soft tokens already projected (one (L_i, C) tensor per example): for a caller that
        projects more clips in the same projector call (train.py's match rows, under DDP)."""
        targets = target_ids if target_ids is not None else text_ids
        if self.config.loss == "ce":
            targets = text_ids  # PSRT always predicts the transcript
        h_s = self.student_hidden(speech, targets)  # (N, C)
        n = h_s.shape[0]
        W = self.decoder.wte.weight  # (V, C) tied LM head
        if self.config.loss == "kl":
            h_t = teacher_hidden if teacher_hidden is not None else self.teacher_hidden(text_ids, targets)
            loss = fused_kl_loss(h_s, h_t.to(h_s.device), W, temperature=self.config.temperature, reduction=reduction)
        else:
            y = torch.cat([torch.as_tensor(o, dtype=torch.long) for o in targets]).to(h_s.device)  # (N,)
            loss = ce_loss(h_s @ W.T, y)
            loss = loss * n if reduction == "sum" else loss
        return loss, n

    @torch.no_grad()
    def top1(self, hidden: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
        """Argmax token (N,) of the tied LM head on hidden states (N, C), a chunk of tokens at a time."""
        W = self.decoder.wte.weight  # (V, C)
        top = [(h.to(W.dtype) @ W.T).argmax(-1) for h in hidden.split(chunk_size)]  # (n, V) logits at a time
        return torch.cat(top) if top else torch.zeros(0, dtype=torch.long, device=hidden.device)

    def episode_loss(self, rows: Sequence[Sequence[tuple[torch.Tensor, Sequence[int], Sequence[int]]]],
                     separator_ids: Sequence[int], reduction: str = "mean") -> tuple[torch.Tensor, int]:
        """KL(teacher || student) on in-context rows, at the positions predicting each line's label.

        A row is a list of lines (soft tokens, transcript ids, label ids): the student reads
        `[speech_1][sep][label_1] ... [speech_n][sep][label_n]`, the teacher the same row with each
        transcript in place of its speech. train.match_episodes builds rows whose labels are arbitrary
        words tied to transcripts and whose last line says an earlier line's transcript again in
        another clip: the teacher names its label by *matching* the two lines, so the student is
        trained to make two spoken lines match as their transcripts do (the copy KL trains reading
        one). Returns (loss, number of label positions)."""
        C = self.decoder.wte.weight.shape[1]
        lines = max(len(row) for row in rows)

        def at_labels(segments: list[list[Segment]]) -> torch.Tensor:  # (N, C) hidden states predicting labels
            prompt = self.prompt(segments)
            h = self.hidden(prompt).reshape(-1, C)
            return h[prompt.predicting([3 * l + 2 for l in range(lines)])]  # row by row, line by line

        with torch.no_grad():
            h_t = at_labels([[seg for _, t, y in row for seg in (list(t), separator_ids, y)] for row in rows])
        h_s = at_labels([[seg for x, _, y in row for seg in (x, separator_ids, y)] for row in rows])
        W = self.decoder.wte.weight  # (V, C) tied LM head
        return fused_kl_loss(h_s, h_t, W, temperature=self.config.temperature, reduction=reduction), h_s.shape[0]

    # --- checkpoints: only the projector, plus the config naming what it was trained with

    def save_projector(self, path: str | Path) -> None:
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.projector_module.state_dict().items()}
        meta = {"seal_format": CHECKPOINT_FORMAT, "seal_config": json.dumps(self.config.to_dict())}
        save_safetensors(state, str(path), metadata=meta)

    def load_projector(self, path: str | Path) -> None:
        """Load projector weights, refusing a checkpoint trained for another encoder, layer or LM."""
        config, state = read_projector(path)
        for key in ("encoder", "encoder_layer", "lm"):
            expected, actual = getattr(self.config, key), getattr(config, key)
            if expected != actual:
                raise ValueError(
                    f"{path}: projector was trained with {key}={actual!r}, but this Seal uses {key}={expected!r}"
                )
        if config.projector != self.projector_module.config:
            raise ValueError(f"{path}: projector config {config.projector} != this Seal's {self.projector_module.config}")
        self.projector_module.load_state_dict(state)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Seal":
        """Rebuild a Seal from a projector checkpoint: loads the encoder and LM it names."""
        from decoder import GPT, load_tokenizer
        from encoder import HuBERT

        config, state = read_projector(path)
        projector = Projector(config.projector)
        projector.load_state_dict(state)
        return cls(HuBERT.from_pretrained(config.encoder), projector, GPT.from_pretrained(config.lm),
                   load_tokenizer(config.lm), config)


def read_projector(path: str | Path) -> tuple[SealConfig, dict[str, torch.Tensor]]:
    """(SealConfig, projector state_dict) from a checkpoint written by Seal.save_projector."""
    meta = read_safetensors_metadata(path)
    if meta.get("seal_format") != CHECKPOINT_FORMAT or "seal_config" not in meta:
        raise ValueError(f"{path}: not a Seal projector checkpoint (metadata 'seal_format' is {meta.get('seal_format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    return SealConfig(**json.loads(meta["seal_config"])), load_safetensors(str(path))
