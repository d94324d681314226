"""The projector and the losses that train it.

Seal keeps the speech encoder and the language model frozen. The only thing that learns is a
small network between them, the *projector*: it turns the encoder's frames (50 per second for
HuBERT, 768 wide for hubert-base) into "soft tokens" that the LM reads exactly like the
embeddings of text tokens (768 wide for gpt2).

Speech is much longer than its transcript (one second of speech is ~50 HuBERT frames but only
~3 GPT-2 tokens), so the projector first *downsamples* in time by a factor k (the rate):
either by stacking k consecutive frames into one vector of k * C_enc features, or with a
strided convolution. Then a two-layer MLP maps to the LM width.

The losses live here too, because they are what make the projector useful:

- `kl_loss`: KL(teacher || student) between the LM's next-token distributions given the
  transcript (teacher) and given the speech (student), written by hand.
- `fused_kl_loss`: the same number, computed from the LM's final hidden states and its tied
  embedding matrix chunk by chunk, with a handwritten backward. It never holds the
  (tokens x vocab) logits of both models at once: at GPT-2's vocabulary of 50,257 those are
  200 kB per token per model in fp32.
- `ce_loss`: next-token cross-entropy, for the PSRT baseline (projector trained as ASR).

Read seal.py next: it builds the teacher and student prompts that feed these losses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Projector


@dataclass
class ProjectorConfig:
    in_dim: int = 768  # encoder width (hubert-base: 768)
    out_dim: int = 768  # LM embedding width (gpt2: 768)
    rate: int = 4  # downsampling factor k: 50 frames/s -> 12.5 soft tokens/s
    mode: str = "stack"  # "stack": concatenate k frames; "conv": strided Conv1d
    kernel_size: int = 0  # conv only; 0 means kernel_size = rate (non-overlapping windows)
    hidden_dim: int = 2048  # MLP width
    # > 0: every soft token is rescaled to this L2 norm (its direction is what is learned). The frozen
    # LM has only ever seen token embeddings of about one size; left free, the KL pushes soft tokens
    # to several times that norm (3-8x in the micro world), which the LM still copies from at the
    # start of a prompt but which derail it in the middle of a few-shot prompt. train.py sets it to
    # the LM's mean token-embedding norm with --match-embedding-norm.
    norm: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("stack", "conv"):
            raise ValueError(f"ProjectorConfig.mode: expected 'stack' or 'conv', got {self.mode!r}")
        if self.norm < 0:
            raise ValueError(f"ProjectorConfig.norm: expected >= 0 (0 = free norm), got {self.norm}")
        if self.rate < 1:
            raise ValueError(f"ProjectorConfig.rate: expected >= 1, got {self.rate}")
        if self.kernel_size and self.kernel_size < self.rate:
            raise ValueError(
                f"ProjectorConfig.kernel_size: expected 0 or >= rate ({self.rate}), got {self.kernel_size}"
                " (a kernel shorter than the stride would skip frames)"
            )

    @property
    def kernel(self) -> int:
        return self.kernel_size or self.rate

    def to_dict(self) -> dict:
        return asdict(self)


class Projector(nn.Module):
    """Encoder frames (B, T, C_enc) + lengths -> soft tokens (B, ceil(T / k), C_lm) + lengths.

    Padding never leaks: frames past an item's length are zeroed before they are mixed, and
    the time axis is right-padded with zeros to whole windows, so an item gives the same
    output in a batch as on its own (tests check this).
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        k, c = config.rate, config.in_dim
        if config.mode == "stack":
            # Stacking k frames then a Linear is a strided conv with kernel = stride = k, written
            # as a reshape: cheap and easy to read.
            self.down = nn.Linear(k * c, config.hidden_dim)
        else:
            self.down = nn.Conv1d(c, config.hidden_dim, kernel_size=config.kernel, stride=k)
        self.act = nn.GELU()
        self.out = nn.Linear(config.hidden_dim, config.out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        # A window is kept as soon as it holds one real frame: ceil(L / k). No frame is dropped.
        return torch.div(lengths + self.config.rate - 1, self.config.rate, rounding_mode="floor")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape  # (B, T, C_enc)
        if C != self.config.in_dim:
            raise ValueError(f"Projector: expected {self.config.in_dim} input features, got {C}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        k = self.config.rate
        # Windows over the whole padded axis, ceil(T / k): taken from the shape, not from lengths.max(),
        # so there is no device->host sync and torch.compile sees no data-dependent shape.
        T_out = -(-T // k)
        real = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T)
        x = x * real[..., None].to(x.dtype)  # zero the padding frames
        # Right-pad with zeros so that the last window (and the conv kernel) is complete.
        need = (T_out - 1) * k + self.config.kernel if self.config.mode == "conv" else T_out * k
        x = F.pad(x[:, :need], (0, 0, 0, max(0, need - T)))  # (B, need, C)
        if self.config.mode == "stack":
            h = self.down(x.reshape(B, T_out, k * C))  # (B, T_out, H)
        else:
            h = self.down(x.transpose(1, 2)).transpose(1, 2)  # (B, T_out, H)
        y = self.out(self.act(h))  # (B, T_out, C_lm)
        if self.config.norm > 0:
            y = self.config.norm * F.normalize(y, dim=-1)  # ||y_t|| = norm for every soft token
        return y, self.output_lengths(lengths)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# KL(teacher || student), written by hand
#
# With p = softmax(t / T) (teacher) and q = softmax(s / T) (student), per token:
#     KL(p || q) = sum_v p_v * (log p_v - log q_v)
# The loss is T^2 * KL averaged over the selected tokens. The T^2 factor (Hinton et al.) keeps the
# gradient's size independent of T: d(KL)/ds = (q - p) / T, so T^2 * KL has gradient T * (q - p).


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Softmax over 50k entries in bf16/fp16 loses too much; fp64 inputs (tests) stay fp64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    # An all-padding batch gives 0, not 0/0.
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over masked positions of T^2 * KL(softmax(t/T) || softmax(s/T)), summed over the vocab.

    student_logits, teacher_logits: (..., V); mask: (...) bool, True = position counts.
    The teacher is detached: only the student learns. Computed in fp32 (or fp64) whatever the input dtype.
    """
    T = temperature
    log_q = F.log_softmax(_at_least_fp32(student_logits) / T, dim=-1)  # (..., V) student
    log_p = F.log_softmax(_at_least_fp32(teacher_logits.detach()) / T, dim=-1)  # (..., V) teacher
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...) expectation under the teacher
    return _masked_mean(per_token, mask) * T * T


# -----------------------------------------------------------------------------
# The fused, memory-lean KL
#
# Both models share the LM head: logits = hidden @ W.T with W the tied token embedding (V, C).
# Instead of building (N, V) logits for student and teacher, we walk over the N tokens in chunks of
# `chunk_size`. For each chunk we build its two (n, V) logit blocks, reduce them to the KL of the chunk
# and, since the loss is a scalar at the end of the graph, *also* compute the chunk's gradient right
# away: dL/ds = T * (q - p) / N, hence dL/dh_s = dL/ds @ W and dL/dW = dL/ds.T @ h_s. Backward then only
# multiplies the stored (N, C) gradient by the incoming scalar. This needs the same three big matmuls
# as the naive version (two forward, one backward) instead of recomputing the logits in backward,
# and the peak memory is a few (chunk, V) blocks instead of several (N, V) tensors.


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, h_t, weight, temperature, chunk_size, n_div, grad_h, grad_w):
        # h_s, h_t: (N, C) student / teacher hidden states; weight: (V, C).
        N = h_s.shape[0]
        T = temperature
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        d_hs = torch.zeros_like(h_s) if grad_h else None  # (N, C)
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_w else None
        for i in range(0, N, chunk_size):
            hs, ht = h_s[i : i + chunk_size], h_t[i : i + chunk_size]  # (n, C)
            log_q = torch.log_softmax((hs @ weight.T).float() / T, dim=-1)  # (n, V)
            log_p = torch.log_softmax((ht @ weight.T).float() / T, dim=-1)  # (n, V)
            p = log_p.exp_()  # in place: log_p is not needed as such any more
            # sum_v p (log p - log q), with log p recovered from p; p log p is 0 where p underflows to 0.
            total += (torch.xlogy(p, p) - p * log_q).sum()
            if grad_h or grad_w:
                # dL/ds = T^2 * (q - p) / T / n_div, built in place in log_q's storage.
                g = log_q.exp_().sub_(p).mul_(T / n_div).to(weight.dtype)  # (n, V)
                if grad_h:
                    d_hs[i : i + chunk_size] = g @ weight
                if grad_w:
                    d_w += (g.T @ hs).float()
        ctx.save_for_backward(d_hs, d_w)
        return total * (T * T / n_div)

    @staticmethod
    def backward(ctx, grad_out):
        d_hs, d_w = ctx.saved_tensors
        g_h = d_hs * grad_out.to(d_hs.dtype) if d_hs is not None else None
        g_w = d_w * grad_out if d_w is not None else None
        return g_h, None, g_w, None, None, None, None, None


def fused_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    reduction: str = "mean",
) -> torch.Tensor:
    """kl_loss(h_s @ W.T, h_t @ W.T, mask, T) without materializing the full logits.

    student_hidden, teacher_hidden: (..., C) final (post-LayerNorm) hidden states; weight: (V, C), the
    tied embedding. mask: (...) bool. Gradients flow to student_hidden and, if it requires grad, to
    weight through the student only (the teacher is detached, as in kl_loss).
    reduction: "mean" over the selected tokens, or "sum" (the caller divides, e.g. by a token count
    summed over gradient-accumulation steps and DDP ranks).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"fused_kl_loss: student {tuple(student_hidden.shape)} != teacher {tuple(teacher_hidden.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_kl_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    C = student_hidden.shape[-1]
    h_s, h_t = student_hidden.reshape(-1, C), teacher_hidden.detach().reshape(-1, C)  # (N, C)
    if mask is not None:  # drop unselected tokens before any vocab-sized work
        keep = mask.reshape(-1)
        h_s, h_t = h_s[keep], h_t[keep]
    n_div = max(h_s.shape[0], 1) if reduction == "mean" else 1
    grad = torch.is_grad_enabled()
    # Under autocast the matmuls would silently run in another dtype; we pick it ourselves: the
    # hidden states' dtype for the matmuls, fp32 for softmax and sums.
    with torch.autocast(device_type=h_s.device.type, enabled=False):
        dtype = torch.promote_types(h_s.dtype, weight.dtype)
        return _FusedKL.apply(
            h_s.to(dtype), h_t.to(dtype), weight.to(dtype), float(temperature), int(chunk_size), float(n_div),
            grad and student_hidden.requires_grad, grad and weight.requires_grad,
        )


# -----------------------------------------------------------------------------
# Cross-entropy for the PSRT baseline


def ce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked positions of -log softmax(logits)[target].

    logits: (..., V) where position i predicts targets[i] (the caller has already shifted by one:
    the logits at position i - 1 of the prompt predict token i); targets: (...) long; mask: (...) bool.
    """
    logits = _at_least_fp32(logits)
    # -log softmax(z)_y = logsumexp(z) - z_y
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[..., None]).squeeze(-1)  # (...)
    return _masked_mean(nll, mask)
