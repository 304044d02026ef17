"""CFA's separable pieces: memory bank, chunked nearest-centroid search, loss, scorer."""

import torch

from texad.methods.cfa.descriptor import CoordConvDescriptor
from texad.methods.cfa.loss import CoupledHypersphereLoss
from texad.methods.cfa.memory_bank import MemoryBank, nearest_sq_distances
from texad.methods.cfa.scorer import softmin_nearest_score


def test_chunked_nearest_search_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)
    full = torch.cdist(q, c) ** 2
    ref_d, ref_i = full.topk(5, dim=1, largest=False)
    d, i = nearest_sq_distances(q, c, 5, budget_mb=0.01)  # forces many small chunks
    assert torch.allclose(d, ref_d, atol=1e-4)
    assert torch.equal(i, ref_i)


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
    loss_fn = CoupledHypersphereLoss(k=3, j=3, r0=1e-5, alpha=0.1, nu=1e-3)
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
