"""Feature Correspondence Analysis (FCA): zero-shot texture anomaly maps from one image.

FCA asks, for every t×t patch and every channel, how each patch element's value differs from the
element of equal rank in a reference distribution of the whole image (its share of the 1-D
Wasserstein distance). Shares are averaged over channels, blurred inside the patch, weighted by a
Gaussian centred on the patch, and summed over all patches that contain a pixel.

Follows the official code (TArdelean/AnomalyLocalizationFCA, ``sc_methods.ScFCA``); see
``texad/methods/fca/README.md``. Deliberate differences, none of which changes a score:

* **Ranks by counting instead of sorting.** The official code sorts every (patch, channel) and
  inverts the permutation. A pixel's rank in a patch is the number of patch elements below it, and
  the patches containing a pixel all lie in its (2t−1)² neighbourhood, so one set of (2t−1)²
  comparisons per pixel and channel, plus box sums, gives its rank in all t² patches at once. This is
  several times faster than ``torch.sort`` on CPU and needs one byte per count. Ties are broken by
  position (row-major inside the patch), i.e. a *stable* sort; the official unstable sort leaves
  tied elements (e.g. ReLU zeros) in an arbitrary order.
* **Blur and Gaussian weight as one t²×t² matrix** applied to all patches (the same linear map as
  torchvision's reflect-padded ``GaussianBlur`` followed by the weight).
* ``stride`` > 1 is supported (patches start every ``stride`` pixels; the official code is stride 1).
* ``reference="random"`` draws from a seeded generator and may use the last tile position.

**Border** (``border``; issue 12). The official code reflect-pads the feature map by t//2 and centres
a patch on every pixel, then *sums* the weighted shares. Near the border a patch then holds mirrored
copies of in-image values: its distribution has duplicated entries that no interior patch has, so
its rank-wise mismatch to the reference is larger, and the border of a normal image lights up.
``border="valid"`` (texad's default) uses only windows that lie fully inside the map (stride 1:
all (h−t+1)(w−t+1) of them; with a stride, the last window is shifted inward to end at the
border) and turns the sum into a *weighted mean*: each pixel's Gaussian-weighted shares are divided
by the sum of the Gaussian weights it received. Inside (≥ t−1 from the border) the weights a pixel
receives sum to 1, so the map equals the official one there; a border pixel is scored only from
real windows, at its true position in them. ``border="official"`` is the official behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from texad.errors import TexadError
from texad.methods.components.feature_maps import scale_features_minmax
from texad.methods.components.gaussian import gaussian_taps

__all__ = ["BORDERS", "FCA", "check_fca_keys", "check_map_fits", "patch_reference", "window_starts"]

#: how patches near the map border are formed: in-image windows + weighted mean | reflect pad + sum
BORDERS = ("valid", "official")


def check_fca_keys(patch_size: int, stride: int, prefix: str = "method.", border: str = "valid") -> None:
    """Config errors named by their key, before FCA's own (key-less) checks."""
    if border not in BORDERS:
        raise TexadError(f"{prefix}border must be one of {list(BORDERS)}, got {border!r}")
    if int(patch_size) < 1 or int(patch_size) % 2 == 0:
        raise TexadError(f"{prefix}patch_size must be a positive odd integer, got {patch_size}")
    if int(stride) <= 0:
        raise TexadError(f"{prefix}stride must be positive, got {stride}")


def check_map_fits(patch_size: int, h: int, w: int, how: str, key: str = "method.patch_size") -> None:
    if patch_size > min(h, w):
        raise TexadError(f"{key}={patch_size} is larger than the feature map {h}x{w} ({how}); "
                         f"use a smaller patch or a larger method.feature_input_size")


def patch_reference(features: torch.Tensor, patch_size: int, kind: str = "median",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted reference distribution per channel, (C, t²), for one image (C, H, W).

    ``median``: split the map into non-overlapping t×t tiles (the remainder at the right and bottom
    is dropped), sort each tile per channel and take the median over tiles at each rank (the lower
    median for an even tile count, as ``torch.median``). ``random``: the sorted values of one tile
    at a random position.
    """
    c, h, w = features.shape
    t = patch_size
    if kind == "median":
        nh, nw = h // t, w // t
        tiles = features[:, : nh * t, : nw * t].reshape(c, nh, t, nw, t)
        tiles = tiles.permute(0, 1, 3, 2, 4).reshape(c, nh * nw, t * t)
        return tiles.sort(dim=-1).values.median(dim=1).values
    if kind == "random":
        y0 = int(torch.randint(0, h - t + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, w - t + 1, (1,), generator=generator))
        tile = features[:, y0:y0 + t, x0:x0 + t].reshape(c, t * t)
        return tile.sort(dim=-1).values
    raise TexadError(f"FCA reference must be 'median' or 'random', got {kind!r}")


def window_starts(size: int, patch_size: int, stride: int) -> list[int]:
    """Starts of the in-image windows along one side: every ``stride``, the last one shifted
    inward so that it ends at the border (``border="valid"``)."""
    last = size - patch_size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """Per channel, each pixel's position in a stable sort of the channel: (C, H, W) integers.

    Comparing keys equals comparing values with ties broken by row-major position, which inside
    any patch is its row-major order, so ranks from keys are those of a stable sort of the patch.
    """
    c = x.shape[0]
    n = x[0].numel()
    order = torch.sort(x.reshape(c, n), dim=-1, stable=True).indices
    dtype = torch.int16 if n <= 2 ** 15 else torch.int32
    positions = torch.arange(n, device=x.device, dtype=dtype).expand(c, n)
    return torch.empty((c, n), dtype=dtype, device=x.device).scatter_(1, order, positions).view_as(x)


def _patch_blur_matrix(patch_size: int, blur_kernel: int | None, sigma_s: float | None) -> torch.Tensor:
    """t²×t² matrix of a reflect-padded Gaussian blur on a t×t patch (identity when off)."""
    n = patch_size * patch_size
    if not blur_kernel or blur_kernel <= 1 or sigma_s is None:
        return torch.eye(n, dtype=torch.float64)
    k1 = gaussian_taps(blur_kernel, sigma_s)
    kernel = torch.outer(k1, k1)[None, None]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, patch_size, patch_size)
    r = blur_kernel // 2
    blurred = F.conv2d(F.pad(basis, (r, r, r, r), mode="reflect"), kernel)
    # Column k is the blurred image of basis pixel k: out = B @ patch.
    return blurred.reshape(n, n).T.contiguous()


class FCA(nn.Module):
    """Zero-shot anomaly map (B, h, w) at feature resolution from a feature map (B, C, h, w).

    Args:
        patch_size: t, odd; the patch and reference tile side.
        stride: distance between patch starts (1 = every pixel is a patch centre).
        sigma_p: σ of the normalised Gaussian weight centred on each patch.
        blur_kernel, sigma_s: Gaussian blur of the per-patch share map (None or σ None: no blur).
        reference: ``"median"`` (rank-wise median over tiles) or ``"random"`` (one tile, ``seed``).
        chunk_rows: padded rows processed at once; peak memory grows linearly with it
            (about (2t−1)·t·C·chunk_rows·(w+t) bytes of counts, 10 MB per row at C=512, w=128).
        normalize: ``"minmax"`` scales each channel of each image to [0, 1] first; None leaves the
            features as they are (for VAE residuals, as the official blind code does).
        seed: seed of the random reference.
        border: ``"valid"`` (in-image windows only, weighted mean of the shares a pixel receives) or
            ``"official"`` (reflect-padded map, every pixel a patch centre, weighted sum); see the
            module docstring.

    Higher is more anomalous. Not differentiable (ranks); runs under ``torch.no_grad``.
    """

    def __init__(self, patch_size: int = 9, stride: int = 1, sigma_p: float = 3.0, blur_kernel: int | None = 5,
                 sigma_s: float | None = 1.0, reference: str = "median", chunk_rows: int = 8,
                 normalize: str | None = "minmax", seed: int = 0, border: str = "valid"):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise TexadError(f"FCA patch_size must be a positive odd integer, got {patch_size}")
        if stride <= 0:
            raise TexadError(f"FCA stride must be positive, got {stride}")
        if blur_kernel and blur_kernel > 1 and sigma_s is not None:
            if blur_kernel % 2 == 0:
                raise TexadError(f"FCA blur_kernel must be odd, got {blur_kernel}")
            if blur_kernel // 2 >= patch_size:
                raise TexadError(f"FCA blur_kernel {blur_kernel} is too large for patch_size {patch_size} "
                                 f"(reflect padding needs blur_kernel // 2 < patch_size)")
        if reference not in ("median", "random"):
            raise TexadError(f"FCA reference must be 'median' or 'random', got {reference!r}")
        if normalize not in ("minmax", None):
            raise TexadError(f"FCA normalize must be 'minmax' or None, got {normalize!r}")
        if chunk_rows <= 0:
            raise TexadError(f"FCA chunk_rows must be positive, got {chunk_rows}")
        if border not in BORDERS:
            raise TexadError(f"FCA border must be one of {list(BORDERS)}, got {border!r}")
        self.patch_size = patch_size
        self.stride = stride
        self.sigma_p = sigma_p
        self.blur_kernel = blur_kernel
        self.sigma_s = sigma_s
        self.reference = reference
        self.chunk_rows = chunk_rows
        self.normalize = normalize
        self.seed = seed
        self.border = border
        g = gaussian_taps(patch_size, sigma_p)
        self.register_buffer("weight_1d", g, persistent=False)  # float64
        weight = torch.outer(g, g).reshape(-1)
        # Blur inside the patch, then weight by the Gaussian: one linear map per patch.
        patch_map = weight[:, None] * _patch_blur_matrix(patch_size, blur_kernel, sigma_s)
        self.register_buffer("patch_map", patch_map, persistent=False)  # float64; cast per call

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, stride={self.stride}, sigma_p={self.sigma_p}, "
                f"blur_kernel={self.blur_kernel}, sigma_s={self.sigma_s}, reference={self.reference!r}, "
                f"chunk_rows={self.chunk_rows}, normalize={self.normalize!r}, border={self.border!r}")

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4:
            raise TexadError(f"FCA expects features of shape (B, C, h, w), got {tuple(features.shape)}")
        h, w = features.shape[-2:]
        if self.patch_size > min(h, w):
            raise TexadError(f"FCA patch_size {self.patch_size} is larger than the feature map {h}x{w}")
        if not features.is_floating_point() or features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()
        if self.normalize == "minmax":
            features = scale_features_minmax(features)
        generator = torch.Generator().manual_seed(self.seed) if self.reference == "random" else None
        return torch.stack([self._score_image(f, generator) for f in features])

    def _score_image(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(C, H, W) -> (H, W)."""
        reference = patch_reference(x, self.patch_size, self.reference, generator)  # (C, t²), sorted
        if self.border == "official":
            return self._score_reflect(x, reference)
        return self._score_valid(x, reference)

    @staticmethod
    def _patches(shares: torch.Tensor, t: int, width: int, n_y: int, n_x: int, s: int) -> torch.Tensor:
        """Each patch's t×t share map: patch (a, b), position (i, j) -> shares[i*t+j, a*s+i, b*s+j];
        (t, t, n_y, n_x), a view of ``shares`` (t², rows, width)."""
        hs = shares.shape[1]
        return shares.as_strided((t, t, n_y, n_x), (t * hs * width + width, hs * width + 1, s * width, s))

    def _score_reflect(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Official: reflect-pad by t//2, a patch every ``stride`` pixels from the corner, weighted sum."""
        t, s = self.patch_size, self.stride
        pad = t // 2
        _, h, w = x.shape
        padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
        # shares[k, y, x]: channel-mean share of padded pixel (y, x) in the patch where it sits at
        # in-patch position k = i*t + j, i.e. the patch starting at (y - i, x - j).
        shares = self._pixel_shares(padded, reference)
        n_y, n_x = (h - 1) // s + 1, (w - 1) // s + 1
        per_patch = self._patches(shares, t, padded.shape[-1], n_y, n_x, s).reshape(t * t, n_y * n_x)
        weighted = self.patch_map.to(per_patch) @ per_patch  # blur + Gaussian weight, (t², L)
        folded = F.fold(weighted[None], output_size=padded.shape[-2:], kernel_size=t, stride=s)
        return folded[0, 0, pad:pad + h, pad:pad + w]

    def _score_valid(self, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """In-image windows only; each pixel gets the weighted mean of the shares it receives."""
        t, s = self.patch_size, self.stride
        _, h, w = x.shape
        shares = self._pixel_shares(x, reference)
        ys, xs = window_starts(h, t, s), window_starts(w, t, s)
        n_y, n_x = h - t + 1, w - t + 1
        per_patch = self._patches(shares, t, w, n_y, n_x, 1)  # every in-image window
        if s > 1:
            iy = torch.tensor(ys, device=x.device)
            ix = torch.tensor(xs, device=x.device)
            used = per_patch.index_select(2, iy).index_select(3, ix).reshape(t * t, -1)
            weighted = self.patch_map.to(used) @ used
            full = weighted.new_zeros(t * t, n_y, n_x)
            full[:, iy[:, None], ix[None, :]] = weighted.reshape(t * t, len(ys), len(xs))
            weighted = full.reshape(t * t, n_y * n_x)
        else:
            per_patch = per_patch.reshape(t * t, n_y * n_x)
            weighted = self.patch_map.to(per_patch) @ per_patch
        folded = F.fold(weighted[None], output_size=(h, w), kernel_size=t, stride=1)[0, 0]
        # The Gaussian weight a pixel receives is separable: (weights along y) x (weights along x).
        g = self.weight_1d.to(folded)
        received = self._received(h, ys, g)[:, None] * self._received(w, xs, g)[None, :]
        # a stride above t leaves pixels in no window: they score 0, as in the official code
        return folded / received.clamp_min(torch.finfo(folded.dtype).tiny)

    @staticmethod
    def _received(size: int, starts: list[int], g: torch.Tensor) -> torch.Tensor:
        """Sum over windows starting at ``starts`` of g at each pixel's position in them: (size,)."""
        t = len(g)
        total = g.new_zeros(size)
        for a in starts:
            total[a:a + t] += g
        return total

    def _pixel_shares(self, padded: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(t², Hp', Wp) with Hp' >= Hp: channel-mean share of every padded pixel at every in-patch
        position, computed chunk_rows rows at a time into buffers allocated once (fresh large
        allocations page-fault on every call and cost more than the arithmetic on CPU)."""
        c, hp, wp = padded.shape
        t, rows = self.patch_size, min(self.chunk_rows, hp)
        m = t - 1
        n_chunks = -(-hp // rows)
        keys = _order_keys(padded)
        # A margin lets every pixel look at its full (2t-1)² neighbourhood and makes every chunk
        # full height. Values read there only feed (pixel, position) pairs whose patch would leave
        # the padded map, or rows past Hp; neither is ever gathered.
        margin = (m, m, m, m + n_chunks * rows - hp)
        extended = F.pad(padded, margin)
        keys = F.pad(keys, margin)
        row_stride = keys.stride(1)
        count_dtype = torch.uint8 if t * t <= 256 else torch.int32
        device = padded.device
        before = torch.empty((2 * m + 1, c, rows, wp), dtype=keys.dtype, device=device)
        counts = torch.empty((2 * m + 1, 2 * m + 1, c, rows, wp), dtype=count_dtype, device=device)
        row_counts = torch.empty((2 * m + 1, t, c, rows, wp), dtype=count_dtype, device=device)
        ranks = torch.empty((t, t, c, rows, wp), dtype=count_dtype, device=device)
        index = torch.empty((t, c, rows, wp), dtype=torch.int64, device=device)
        values = torch.empty((t, c, rows, wp), dtype=padded.dtype, device=device)
        channel_sum = torch.empty((t, rows, wp), dtype=padded.dtype, device=device)
        flat_reference = reference.reshape(-1).contiguous()
        channel_offset = (torch.arange(c, device=device) * (t * t)).view(1, c, 1, 1)
        shares = padded.new_empty(t * t, n_chunks * rows, wp)
        for r0 in range(0, n_chunks * rows, rows):
            centre = extended[:, m + r0:m + r0 + rows, m:m + wp]
            centre_keys = keys[:, m + r0:m + r0 + rows, m:m + wp]
            for a in range(2 * m + 1):
                # Keys at column offsets -m..m of row offset a - m, all at once; keys are unique
                # integers, so clamp(centre - neighbour, 0, 1) is exactly [neighbour < centre]
                # (vectorised, unlike comparison ops on CPU).
                neighbours = keys.as_strided((2 * m + 1, c, rows, wp), (1, keys.stride(0), row_stride, 1),
                                             keys.storage_offset() + (r0 + a) * row_stride)
                torch.sub(centre_keys, neighbours, out=before).clamp_(0, 1)
                counts[a].copy_(before)
            self._window_sums(counts, t, dim=1, out=row_counts)  # over column offsets
            self._window_sums(row_counts, t, dim=0, out=ranks)  # then over row offsets
            for i in range(t):  # one in-patch row at a time keeps the gather buffers small
                index.copy_(ranks[i]).add_(channel_offset)
                torch.take(flat_reference, index, out=values)
                values.sub_(centre).abs_()
                torch.sum(values, dim=1, out=channel_sum)
                shares[i * t:(i + 1) * t, r0:r0 + rows] = channel_sum
        return shares.div_(c)

    @staticmethod
    def _window_sums(planes: torch.Tensor, t: int, dim: int, out: torch.Tensor) -> torch.Tensor:
        """out[..., j, ...] = sum of planes[..., t-1-j : 2t-1-j, ...] along ``dim`` (size 2t-1).

        In-patch position j sees offsets -j .. t-1-j, i.e. planes t-1-j .. 2t-2-j. Sliding sums
        in integer arithmetic: uint8 may wrap in between but every final sum is < t² <= 256.
        """
        m = t - 1
        plane = planes.select(dim, m)
        acc = out.select(dim, 0)
        acc.copy_(plane)
        for k in range(m + 1, 2 * m + 1):
            acc += planes.select(dim, k)
        for j in range(1, t):
            nxt = out.select(dim, j)
            torch.add(acc, planes.select(dim, m - j), out=nxt)
            nxt -= planes.select(dim, 2 * m - j + 1)
            acc = nxt
        return out
