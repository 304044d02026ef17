"""FCA core: equals a loop-per-patch reference, finds a planted texture, rejects bad settings."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from texad.errors import TexadError
from texad.methods.components.fca import FCA, patch_reference




def brute_force_fca(x: np.ndarray, t: int, stride: int = 1, sigma_p: float = 3.0, blur_kernel: int = 5,
                    sigma_s: float = 1.0, border: str = "official") -> np.ndarray:
    """FCA written as the method reads: one patch at a time, one channel at a time (numpy/scipy).

    ``official``: reflect-padded map, a patch centred every ``stride`` pixels, weighted sum.
    ``valid``: windows fully inside the map (starts every ``stride``, plus one ending at the border),
    each pixel's weighted shares divided by the Gaussian weights it received.
    """
    c, h, w = x.shape
    p = t // 2 if border == "official" else 0
    padded = np.pad(x, ((0, 0), (p, p), (p, p)), mode="reflect")
    tiles = np.stack([np.sort(x[:, i:i + t, j:j + t].reshape(c, -1), axis=1)
                      for i in range(0, h - t + 1, t) for j in range(0, w - t + 1, t)])
    reference = np.sort(tiles, axis=0)[(len(tiles) - 1) // 2]  # lower median over tiles, per rank
    g = np.exp(-0.5 * ((np.arange(t) - (t - 1) / 2) / sigma_p) ** 2)
    g /= g.sum()
    weight = np.outer(g, g)
    out = np.zeros(padded.shape[1:])
    received = np.zeros(padded.shape[1:])
    if border == "official":
        starts_y, starts_x = range(0, h, stride), range(0, w, stride)
    else:
        starts_y = sorted(set(range(0, h - t + 1, stride)) | {h - t})
        starts_x = sorted(set(range(0, w - t + 1, stride)) | {w - t})
    for a in starts_y:
        for b in starts_x:
            patch = padded[:, a:a + t, b:b + t].reshape(c, -1)
            shares = np.zeros_like(patch)
            for ch in range(c):
                order = np.argsort(patch[ch], kind="stable")
                shares[ch, order] = np.abs(patch[ch, order] - reference[ch])
            share_map = shares.mean(axis=0).reshape(t, t)
            # scipy 'mirror' == torch 'reflect'; truncate so the kernel has blur_kernel taps
            share_map = ndi.gaussian_filter(share_map, sigma_s, mode="mirror", truncate=(blur_kernel // 2) / sigma_s)
            out[a:a + t, b:b + t] += share_map * weight
            received[a:a + t, b:b + t] += weight
    if border == "official":
        return out[p:p + h, p:p + w]
    return np.where(received > 0, out / np.maximum(received, 1e-300), 0.0)


@pytest.mark.parametrize("border", ["official", "valid"])
@pytest.mark.parametrize("t,stride", [(3, 1), (5, 1), (5, 2), (3, 3), (3, 4)])
def test_vectorised_equals_brute_force(t, stride, border, one_thread):
    x = torch.rand(3, 12, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(t * 10 + stride))
    expected = brute_force_fca(x.numpy(), t, stride, border=border)
    for chunk_rows in (1, 3, 8, 100):
        got = FCA(patch_size=t, stride=stride, chunk_rows=chunk_rows, normalize=None, border=border)(x[None])[0]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("border", ["official", "valid"])
def test_ties_follow_a_stable_sort(border):
    # ReLU-like features: many exact zeros; ties are ranked by position as a stable sort does.
    x = torch.relu(torch.randn(4, 11, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    expected = brute_force_fca(x.numpy(), 5, border=border)
    got = FCA(patch_size=5, chunk_rows=4, normalize=None, border=border)(x[None])[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_valid_border_equals_official_inside_and_differs_at_the_border():
    # Pixels at least t-1 from the border lie in t² windows in both modes, whose weights sum to 1.
    x = torch.rand(4, 20, 22, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    official = FCA(patch_size=5, normalize=None, border="official")(x[None])[0]
    valid = FCA(patch_size=5, normalize=None, border="valid")(x[None])[0]
    torch.testing.assert_close(valid[4:-4, 4:-4], official[4:-4, 4:-4], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(valid[0], official[0])


def test_batch_images_are_independent_and_float32_matches_float64():
    x = torch.rand(2, 5, 16, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fca = FCA(patch_size=5)
    both = fca(x)
    assert both.shape == (2, 16, 20)
    torch.testing.assert_close(both[1], fca(x[1:])[0])
    torch.testing.assert_close(fca(x.float()).double(), both, rtol=1e-4, atol=1e-6)


def test_median_reference_is_rankwise_median_over_tiles():
    x = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(3))
    ref = patch_reference(x, 3)  # 4 tiles (the last row and column are dropped)
    tiles = [x[:, i:i + 3, j:j + 3].reshape(2, 9).sort(dim=1).values for i in (0, 3) for j in (0, 3)]
    assert torch.equal(ref, torch.stack(tiles).median(dim=0).values)
    random_ref = patch_reference(x, 3, "random", torch.Generator().manual_seed(0))
    assert random_ref.shape == (2, 9) and torch.all(random_ref[:, 1:] >= random_ref[:, :-1])


# --- planted texture ---------------------------------------------------------------------------

def _oriented_noise(n, angle, rng):
    img = ndi.gaussian_filter(rng.standard_normal((n, n)), (0.7, 3.0))  # streaks along x
    img = ndi.rotate(img, np.degrees(angle), reshape=False, mode="wrap")
    return (img - img.mean()) / img.std()


def _filter_bank(img, n_orient=6):
    """A tiny hand-made "feature extractor": rectified oriented derivatives, locally averaged."""
    feats = []
    for k in range(n_orient):
        a = np.pi * k / n_orient
        d = np.cos(a) * ndi.sobel(img, 1) + np.sin(a) * ndi.sobel(img, 0)
        feats.append(ndi.gaussian_filter(np.abs(d), 1.0))
    return np.stack(feats)


def _planted(seed, n=48, size=10):
    """Horizontal streaks with a 10×10 patch of vertical streaks, the patch re-standardised to the
    mean and variance of the pixels it replaces (so intensity alone cannot find it)."""
    rng = np.random.default_rng(seed)
    img = _oriented_noise(n, 0.0, rng)
    other = _oriented_noise(n, np.pi / 2, rng)
    mask = np.zeros((n, n), bool)
    y, x = rng.integers(8, n - 8 - size, 2)
    mask[y:y + size, x:x + size] = True
    inside, pasted = img[mask], other[mask]
    img[mask] = (pasted - pasted.mean()) / pasted.std() * inside.std() + inside.mean()
    return img, mask


def test_fca_finds_a_planted_texture(one_thread):
    fca_auroc, intensity_auroc = [], []
    for seed in range(5):
        img, mask = _planted(seed)
        features = torch.tensor(_filter_bank(img), dtype=torch.float32)[None]
        score = FCA(patch_size=9)(features)[0].numpy()
        fca_auroc.append(roc_auc_score(mask.ravel(), score.ravel()))
        intensity_auroc.append(max(roc_auc_score(mask.ravel(), img.ravel()), roc_auc_score(mask.ravel(), -img.ravel())))
    # Measured (seeds 0-4, t=9, deterministic data): FCA pixel AUROC 0.92/0.97/0.80/0.94/0.94
    # (mean 0.915, worst 0.80). The best raw-intensity threshold per image reaches 0.59-0.73 (mean
    # 0.63): the streaky texture has local intensity bias, not the patch. Bars sit ~0.07-0.1 below
    # the measurement so a different BLAS or scipy rotation does not flip them.
    assert np.mean(fca_auroc) >= 0.85, fca_auroc
    assert min(fca_auroc) >= 0.70, fca_auroc
    assert max(intensity_auroc) <= 0.75, intensity_auroc
    assert np.mean(fca_auroc) >= np.mean(intensity_auroc) + 0.2, (fca_auroc, intensity_auroc)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(patch_size=8), "odd"),
    (dict(patch_size=0), "odd"),
    (dict(stride=0), "stride"),
    (dict(stride=-1), "stride"),
    (dict(blur_kernel=4), "blur_kernel"),
    (dict(reference="mean"), "reference"),
    (dict(border="reflect"), "border"),
])
def test_bad_settings_raise(kwargs, needle):
    with pytest.raises(TexadError, match=needle):
        FCA(**kwargs)


def test_patch_larger_than_map_names_both_sizes():
    with pytest.raises(TexadError, match=r"patch_size 9 .*7x12"):
        FCA(patch_size=9)(torch.rand(1, 2, 7, 12))
