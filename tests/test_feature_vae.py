"""Feature VAE: it trains, and after training rare feature vectors reconstruct worse than common ones."""

import pytest
import torch

from texad.errors import TexadError
from texad.methods.blind_vae import FeatureVAE, residual_map_fca, residual_norm, smooth_and_clear_border
from texad.methods.components.fca import FCA


def _contaminated_features(seed=0, b=4, c=8, n=16, rare_fraction=0.03):
    """Mostly one family of vectors (common: a 1-D manifold plus noise) and a few rare, scattered
    random vectors (each different, as defects are, so the VAE cannot memorise them)."""
    g = torch.Generator().manual_seed(seed)
    common_a, common_b = torch.rand(c, generator=g), torch.rand(c, generator=g)
    mix = torch.rand(b, 1, n, n, generator=g)
    x = mix * common_a[None, :, None, None] + (1 - mix) * common_b[None, :, None, None]
    x = x + 0.02 * torch.randn(b, c, n, n, generator=g)
    rare = torch.rand(b, 1, n, n, generator=g) < rare_fraction
    x = torch.where(rare, torch.rand(b, c, n, n, generator=g), x)
    return x.clamp(0, 1), rare[:, 0]


def _train(vae, x, steps=300, lr=1e-2):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        recon, mu, logvar = vae(x)
        total, _, _ = vae.loss(x, recon, mu, logvar, kl_weight=1e-3)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses


def test_shapes_and_loss_terms():
    vae = FeatureVAE(in_channels=8, hidden=32, latent=4)
    x = torch.rand(2, 8, 5, 6)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 4, 5, 6)
    total, rec, kl = vae.loss(x, recon, mu, logvar, kl_weight=0.5)
    torch.testing.assert_close(total, rec + 0.5 * kl)
    # the KL term is zero exactly at the prior (mu=0, sigma=1)
    _, _, kl0 = vae.loss(x, recon, torch.zeros_like(mu), torch.zeros_like(logvar))
    assert kl0.item() == 0.0
    # reconstruct() decodes mu (no sampling): it equals the decoder applied to forward()'s mu, draws
    # no random numbers, and differs from forward()'s sampled reconstruction
    torch.manual_seed(1)
    sampled, mu, _ = vae(x)
    state = torch.get_rng_state()
    recon_mu = vae.reconstruct(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(recon_mu, vae.decoder(mu))
    assert not torch.allclose(recon_mu, sampled)


def test_channel_last_forward_equals_the_conv_form():
    """The VAE runs its 1×1 convs as matrix products on channel-last vectors (faster on a CPU): the same
    function as the convs themselves, with the same random draws in forward()."""
    torch.manual_seed(0)
    vae = FeatureVAE(in_channels=6, hidden=16, latent=4)
    x = torch.rand(2, 6, 5, 7)
    hidden = vae.encoder(x)
    mu_conv, logvar_conv = vae.to_mu(hidden), vae.to_logvar(hidden)
    mu, logvar = vae.encode(x)
    torch.testing.assert_close(mu, mu_conv)
    torch.testing.assert_close(logvar, logvar_conv)
    torch.testing.assert_close(vae.reconstruct(x), vae.decoder(mu_conv))
    torch.manual_seed(3)
    sampled, _, _ = vae(x)
    torch.manual_seed(3)
    z = mu_conv + torch.exp(0.5 * logvar_conv) * torch.randn_like(mu_conv)
    torch.testing.assert_close(sampled, vae.decoder(z))
    # the training batch shape (1, C, n, 1)
    flat = torch.rand(1, 6, 300, 1)
    torch.testing.assert_close(vae.reconstruct(flat), vae.decoder(vae.to_mu(vae.encoder(flat))))




def test_training_lowers_loss_and_rare_vectors_keep_larger_residuals(one_thread):
    torch.manual_seed(0)
    x, rare = _contaminated_features()
    vae = FeatureVAE(in_channels=8, hidden=64, latent=8)
    losses = _train(vae, x)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Measured: the loss falls ~30x (0.073 -> 0.0022); a 5x drop is the bar.
    assert last < 0.2 * first, (first, last)
    norm = residual_norm(x, vae)
    assert norm.shape == (4, 16, 16)
    # Measured: the mean rare residual is ~10x the common one (0.53 vs 0.053); 3x is the bar.
    assert norm[rare].mean() > 3 * norm[~rare].mean(), (norm[rare].mean(), norm[~rare].mean())


def test_residual_map_fca_shapes_and_needs_unnormalised_fca():
    x, _ = _contaminated_features(b=2, n=20)
    vae = FeatureVAE(in_channels=8, hidden=16, latent=4)
    maps = residual_map_fca(x, vae, FCA(patch_size=7, normalize=None))
    assert maps.shape == (2, 20, 20) and torch.isfinite(maps).all()
    post = residual_map_fca(x, vae, FCA(patch_size=7, normalize=None), smooth_kernel=5, zero_border=5)
    assert (post[:, :5] == 0).all() and (post[:, :, -5:] == 0).all()
    with pytest.raises(TexadError, match="normalize=None"):
        residual_map_fca(x, vae, FCA(patch_size=7))


def test_smooth_keeps_constant_maps():
    m = torch.full((1, 12, 12), 3.0)
    torch.testing.assert_close(smooth_and_clear_border(m, 5, 1.0, border=0), m)
