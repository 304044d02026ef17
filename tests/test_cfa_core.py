"""CFA's separable pieces: memory bank, chunked nearest-centroid search, loss, scorer."""

import torch

from texad.methods.cfa.descriptor import CoordConvDescriptor
from texad.methods.cfa.loss import CoupledHypersphereLoss
from texad.methods.cfa.memory_bank import MemoryBank
from texad.methods.components.nearest import nearest_sq_distances
from texad.methods.cfa.scorer import softmin_nearest_score


def test_chunked_nearest_search_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)
    full = torch.cdist(q, c) ** 2
    ref_d, ref_i = full.topk(5, dim=1, largest=False)
    d, i = nearest_sq_distances(q, c, 5, budget_mb=0.01)  # forces many small chunks
    assert torch.allclose(d, ref_d, atol=1e-4)
    assert torch.equal(i, ref_i)
    # training path: distances recomputed as ‖q − c‖², differentiable in the queries
    q_train = q.clone().requires_grad_()
    d_train, i_train = nearest_sq_distances(q_train, c, 5, budget_mb=0.01)
    assert torch.equal(i_train, ref_i) and torch.allclose(d_train, ref_d, atol=1e-4)
    d_train[:, 0].sum().backward()
    assert torch.allclose(q_train.grad, 2 * (q - c[ref_i[:, 0]]), atol=1e-4)


def test_blocked_selection_is_exact_for_any_bank_size():
    """The block-minimum shortcut and the padding of a bank that is not a square number change nothing."""
    g = torch.Generator().manual_seed(1)
    for m, k in [(1, 1), (7, 3), (50, 6), (101, 3), (257, 6), (1000, 1)]:
        q, c = torch.randn(300, 12, generator=g), torch.randn(m, 12, generator=g)
        ref_d, ref_i = (torch.cdist(q, c, compute_mode="donot_use_mm_for_euclid_dist") ** 2).topk(
            min(k, m), dim=1, largest=False
        )
        d, i = nearest_sq_distances(q, c, k)
        assert torch.allclose(d, ref_d, atol=1e-4), (m, k)
        assert torch.equal(i, ref_i), (m, k)


def test_memory_bank_is_descriptor_of_the_mean_feature_map():
    torch.manual_seed(0)
    desc = CoordConvDescriptor(8, 6)
    feats = [torch.randn(3, 8, 5, 7) for _ in range(4)]
    bank = MemoryBank()
    for f in feats:
        bank.accumulate(f)
    bank.finalize(desc)
    running = torch.stack([desc(f).mean(0) for f in feats]).mean(0)  # official running mean of φ₀(p)
    assert bank.centroids.shape == (35, 6)
    assert torch.allclose(bank.centroids, running.flatten(1).t(), atol=1e-5)
    state = bank.state_dict()
    fresh = MemoryBank()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.centroids, bank.centroids)


def test_radius_is_learned_and_switches_on_repulsion():
    loss_fn = CoupledHypersphereLoss(k=3, j=3, r0=1e-5, margin=0.1, nu=1e-3)
    sq = torch.tensor([[0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    assert loss_fn.radius.requires_grad
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        loss_fn(sq).backward()
        opt.step()
    assert loss_fn.radius.item() > 0.5  # r moved: it is a real parameter (anomalib's never does)
    with torch.no_grad():
        loss_fn.radius.fill_(1.0)  # r² = 1 > d_hard + α for the first hard negative
        attract = (sq[:, :3] - 1.0).clamp_min(0).mean()
        repel = (1.0 - sq[:, 3:] - 0.1).clamp_min(0).mean()
        assert repel > 0
        assert torch.isclose(loss_fn(sq), (attract + repel) / 1e-3)


def test_softmin_score_weights_the_nearest_distance():
    sq = torch.tensor([[1.0, 4.0, 9.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.softmax(-d, 0)[0] * 1.0
    score = softmin_nearest_score(sq)
    assert torch.isclose(score[0], expected)
    assert score[1] == 0
