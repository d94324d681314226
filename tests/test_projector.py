"""Projector shapes and padding; KL and CE losses against torch's own implementations."""
import pytest
import torch
import torch.nn.functional as F

from projector import Projector, ProjectorConfig, ce_loss, fused_kl_loss, kl_loss


@pytest.mark.parametrize("mode,kernel", [("stack", 0), ("conv", 0), ("conv", 6)])
def test_projector_batch_equals_items(mode, kernel):
    cfg = ProjectorConfig(in_dim=8, out_dim=6, rate=3, mode=mode, kernel_size=kernel, hidden_dim=16)
    proj = Projector(cfg)
    lengths = torch.tensor([10, 7, 3])
    x = torch.randn(3, 10, 8)
    y, out_len = proj(x, lengths)
    assert out_len.tolist() == [4, 3, 1]  # ceil(L / 3): no frame is dropped
    assert y.shape == (3, 4, 6)
    for b in range(3):
        # garbage in the padding must not change the result
        alone, _ = proj(x[b : b + 1, : lengths[b]], lengths[b : b + 1])
        torch.testing.assert_close(y[b, : out_len[b]], alone[0], rtol=1e-5, atol=1e-6)


def test_projector_stack_layout_and_count():
    cfg = ProjectorConfig(in_dim=4, out_dim=5, rate=2, hidden_dim=7)
    proj = Projector(cfg)
    assert proj.num_parameters() == (2 * 4 * 7 + 7) + (7 * 5 + 5)
    x = torch.randn(1, 4, 4)
    y, _ = proj(x)
    # window j is frames 2j and 2j+1 concatenated
    manual = proj.out(proj.act(proj.down(torch.cat([x[:, 0::2], x[:, 1::2]], dim=-1))))
    torch.testing.assert_close(y, manual)


def test_projector_norm_fixes_every_soft_token_norm():
    torch.manual_seed(0)
    free = Projector(ProjectorConfig(in_dim=4, out_dim=5, rate=2, hidden_dim=7))
    fixed = Projector(ProjectorConfig(in_dim=4, out_dim=5, rate=2, hidden_dim=7, norm=2.5))
    fixed.load_state_dict(free.state_dict())  # same weights: only the rescaling differs
    x = torch.randn(2, 6, 4)
    y_free, _ = free(x)
    y, _ = fixed(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((2, 3), 2.5))
    torch.testing.assert_close(y, 2.5 * y_free / y_free.norm(dim=-1, keepdim=True))  # same directions


def test_projector_config_errors():
    with pytest.raises(ValueError, match="mode"):
        ProjectorConfig(mode="pool")
    with pytest.raises(ValueError, match="norm"):
        ProjectorConfig(norm=-1.0)
    with pytest.raises(ValueError, match="kernel_size"):
        ProjectorConfig(mode="conv", rate=4, kernel_size=2)


def _reference_kl(s, t, mask, T):
    per = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t.detach() / T, -1), log_target=True, reduction="none").sum(-1)
    return (per * mask).sum() / mask.sum() * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_loss_matches_kl_div(T):
    s = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.4
    ours = kl_loss(s, t, mask, T)
    (g_ours,) = torch.autograd.grad(ours, s)
    ref = _reference_kl(s, t, mask.double(), T)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(ours.double(), ref)
    torch.testing.assert_close(g_ours.double(), g_ref)
    # the teacher gets no gradient
    assert torch.autograd.grad(kl_loss(s, t, mask, T), t, allow_unused=True)[0] is None


def test_kl_is_zero_for_equal_and_positive_otherwise():
    s = torch.randn(4, 50)
    assert kl_loss(s, s.clone()).abs().item() < 1e-6
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    assert fused_kl_loss(h, h.clone(), w).abs().item() < 1e-6
    assert kl_loss(s, torch.randn(4, 50)).item() > 0.01


@pytest.mark.parametrize("T,use_mask,chunk", [(1.0, False, 3), (2.0, True, 4), (0.5, True, 100)])
def test_fused_kl_equals_plain(T, use_mask, chunk):
    C, V = 8, 37
    hs = torch.randn(2, 7, C, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 7, C, dtype=torch.float64)
    w = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 7) > 0.3) if use_mask else None
    plain = kl_loss(hs @ w.T, ht @ w.T, mask, T)
    g_plain = torch.autograd.grad(plain * 3.0, (hs, w))  # a non-unit upstream gradient
    fused = fused_kl_loss(hs, ht, w, mask, T, chunk_size=chunk)
    g_fused = torch.autograd.grad(fused * 3.0, (hs, w))
    torch.testing.assert_close(fused.double(), plain.double())
    torch.testing.assert_close(g_fused[0], g_plain[0])
    torch.testing.assert_close(g_fused[1].double(), g_plain[1])


def test_fused_kl_sum_reduction_and_frozen_weight():
    hs = torch.randn(6, 8, requires_grad=True)
    ht, w = torch.randn(6, 8), torch.randn(20, 8)  # w does not require grad: no dW is computed
    total = fused_kl_loss(hs, ht, w, reduction="sum", chunk_size=4)
    torch.testing.assert_close(total, kl_loss(hs @ w.T, ht @ w.T) * 6)
    total.backward()
    assert hs.grad is not None and w.grad is None
    with torch.no_grad():  # eval: no gradient work, same value
        torch.testing.assert_close(fused_kl_loss(hs, ht, w, reduction="sum"), total.detach())


def test_ce_loss_matches_cross_entropy():
    logits = torch.randn(2, 6, 13, requires_grad=True)
    targets = torch.randint(0, 13, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ours = ce_loss(logits, targets, mask)
    ref = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    torch.testing.assert_close(ce_loss(logits, targets), F.cross_entropy(logits.reshape(-1, 13), targets.reshape(-1)))
