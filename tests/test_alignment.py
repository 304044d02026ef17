"""Maps in the right place: feature cells resampled at their true centres (texad.geometry).

A bright dot at a known pixel must come back within 1 px in every layer's aligned response, for
three backbones and near every border and corner; a planted square's map centroid must sit on the
square. The legacy alignment (`F.interpolate(align_corners=False)`, texad ≤ 0.1) fails both.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from conftest import compose_cfg
from texad.backbones import FeatureExtractor, padded_features
from texad.geometry import PIXELS, Grid, even_grid, resample, sampling_matrix
from texad.geometry.probe import _probe_side, probe_offsets
from texad.pipeline import build

SIDE = 256
#: nominal dot places: the centre and 16 px from every border and corner
PLACES = [(128, 128), (16, 16), (16, 128), (16, 240), (128, 16), (128, 240), (240, 16), (240, 128), (240, 240)]


def random_backbone(name: str, alignment: str = "probed") -> FeatureExtractor:
    """Random weights (fine for geometry): every kernel's absolute random values (normalised to sum 1),
    norms as identities.

    Positive kernels make a dot's response one blob around the dot, as trained early layers roughly do;
    signed random kernels scatter it, so its largest cell can be a neighbour of the dot's. (timm also
    zero-initialises each residual block's last norm, which would leave only the 1×1 shortcuts alive.)"""
    torch.manual_seed(0)
    fe = FeatureExtractor(name, layers=(1, 2, 3), pretrained=False, alignment=alignment)
    for m in fe.modules():
        if isinstance(m, torch.nn.Conv2d):  # averaging kernels: 50 layers of random positive ones overflow
            m.weight.data = m.weight.data.abs() / m.weight.data.abs().sum(dim=(1, 2, 3), keepdim=True)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()
    return fe


#: input padding around the probe images, as CFA, FCA and the blind VAE pad theirs (`method.input_padding`):
#: the dots are then seen as in those methods, and the test also checks that padding and alignment compose.
#: (Without it, a deep layer's cell at the image's right or bottom border answers a dot more weakly than
#: its inner neighbour: the paths through out-of-image cells are cut. A magnitude effect, not geometry.)
PAD = 32


def layer_maps(fe: FeatureExtractor, images: torch.Tensor):
    """Each layer's maps and grids for `images` padded by PAD zeros (a blank canvas, like the probe's)."""
    def extract(x):
        maps = fe(x)
        return maps, fe.grids(x.shape[-2:], maps)

    return padded_features(extract, images, PAD, "zeros")


#: the aligned peaks are read on a target grid of FINE px, so a grid off by a fraction of a pixel shows
FINE = 1 / 8


def reference_grids(fe: FeatureExtractor) -> list[Grid]:
    """Each layer's cell centres on the (cropped) probe images as the impulse probe measures them for this
    network, run here directly: independent of the extractor's `LayerGeometry` (its cache, its bookkeeping,
    the padding crop), which is what is under test. The probe itself is checked against a network of known
    geometry (`test_probe_finds_the_hand_computed_centres_of_strided_box_convolutions`)."""
    period = 2 * max(fe.strides)
    side = _probe_side(SIDE + 2 * PAD, period)
    offsets, _ = probe_offsets(fe.forward, fe.strides, (side, side))
    # PAD is a multiple of every stride: dropping PAD/s cells and PAD pixels leaves cell i at offset + s·i
    return [Grid((float(s), float(s)), o) for s, o in zip(fe.strides, offsets)]


def dot_places(fe: FeatureExtractor) -> list[list[tuple[float, float, int, int]]]:
    """Per layer, (reference centre y, x, dot y, x): the dot on the pixel nearest to the reference centre
    nearest to each nominal place."""
    out = []
    for grid in reference_grids(fe):
        rows = []
        for y, x in PLACES:
            cy = grid.offset[0] + grid.stride[0] * round((y - grid.offset[0]) / grid.stride[0])
            cx = grid.offset[1] + grid.stride[1] * round((x - grid.offset[1]) / grid.stride[1])
            rows.append((cy, cx, int(round(cy)), int(round(cx))))
        out.append(rows)
    return out


def aligned_peaks(fe: FeatureExtractor, places: list[list[tuple[float, float, int, int]]]) -> list[list[tuple[float, float]]]:
    """Per layer and place: where the layer's response to a dot at that place peaks, resampled by the
    extractor's own geometry onto a 1/8-px grid (image coordinates): the centre of the cell that answers most."""
    blank = torch.zeros(1, 3, SIDE, SIDE)
    reference, grids = layer_maps(fe, blank)
    fine = Grid((FINE, FINE), (0.0, 0.0))
    peaks = []
    for layer, (grid, ref) in enumerate(zip(grids, reference)):
        row = []
        for cy, cx, py, px in places[layer]:
            image = blank.clone()
            image[0, :, py, px] = 5.0
            response = (layer_maps(fe, image)[0][layer] - ref).abs().sum(1)
            # a window of ±2 strides around the dot, on the fine target grid
            reach = 2 * grid.stride[0]
            y0, x0 = max(0.0, py - reach), max(0.0, px - reach)
            n = int(2 * reach / FINE) + 1
            window = Grid((FINE, FINE), (y0, x0))
            aligned = resample(response, grid, (n, n), window)[0]
            at = int(aligned.flatten().argmax())
            row.append((y0 + FINE * (at // n), x0 + FINE * (at % n)))
        peaks.append(row)
    return peaks


def check_dots_land(fe: FeatureExtractor) -> None:
    """The cell that answers a dot most is the one it sits on, and the extractor draws that cell's peak within
    half a pixel of where the probe measures its centre: a grid off by 1 px or more fails."""
    places = dot_places(fe)
    peaks = aligned_peaks(fe, places)
    for layer, (rows, found) in enumerate(zip(places, peaks)):
        for (cy, cx, py, px), (qy, qx) in zip(rows, found):
            assert abs(qy - cy) < 0.5 and abs(qx - cx) < 0.5, (
                f"{fe.name} layer {fe.layers[layer]}: dot at {(py, px)} on a cell centred at ({cy:.2f}, {cx:.2f}) "
                f"peaks at ({qy:.2f}, {qx:.2f})")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_dots_land_on_their_pixel_in_every_layer_of_efficientnet_lite0():
    check_dots_land(FeatureExtractor("efficientnet_lite0", layers=(1, 2, 3), weights="package"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_dots_land_on_their_pixel_in_every_layer_of_random_resnets(name):
    check_dots_land(random_backbone(name))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_legacy_alignment_draws_the_deep_layers_far_down_right():
    # what texad <= 0.1 did: stride-16 cells assumed 7.5 px right of where the geometry puts them, and
    # lite0's ImageNet weights look another ~5 px up-left: the dot comes back ~12 px down-right
    fe = FeatureExtractor("efficientnet_lite0", layers=(1, 2, 3), weights="package")
    places = dot_places(fe)
    legacy = FeatureExtractor("efficientnet_lite0", layers=(1, 2, 3), weights="package", alignment="legacy")
    peaks = aligned_peaks(legacy, places)
    shifts = torch.tensor([[qy - cy, qx - cx] for (cy, cx, _, _), (qy, qx) in zip(places[2], peaks[2])]).float()
    assert (shifts.median(0).values >= 9).all(), shifts


def test_resample_on_the_legacy_grid_is_bilinear_interpolate():
    x = torch.randn(2, 3, 16, 12)
    for size in [(64, 48), (37, 29), (16, 12)]:
        want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        got = resample(x, even_grid((16, 12), size), size)
        assert torch.allclose(got, want, atol=1e-5)


def test_resample_equals_a_loop_of_linear_interpolation_at_the_target_centres():
    x = torch.randn(5, 7, dtype=torch.float64)
    source, target = Grid((4.0, 8.0), (-0.6, 3.2)), Grid((1.5, 3.0), (2.0, -7.0))
    got = resample(x, source, (11, 13), target)
    for i in range(11):
        for j in range(13):
            u = min(max((target.offset[0] + target.stride[0] * i - source.offset[0]) / source.stride[0], 0), 4)
            v = min(max((target.offset[1] + target.stride[1] * j - source.offset[1]) / source.stride[1], 0), 6)
            i0, j0 = min(int(u), 3), min(int(v), 5)
            a, b = u - i0, v - j0
            want = ((1 - a) * (1 - b) * x[i0, j0] + a * (1 - b) * x[i0 + 1, j0] + (1 - a) * b * x[i0, j0 + 1]
                    + a * b * x[i0 + 1, j0 + 1])
            assert abs(float(got[i, j]) - float(want)) < 1e-12


def test_area_resampling_gives_a_mask_its_coverage_of_each_cell():
    mask = torch.zeros(1, 16, 16)
    mask[0, 2:6, 4:12] = 1.0
    cells = resample(mask, PIXELS, (4, 4), Grid((4.0, 4.0), (1.5, 1.5)), mode="area")  # cells of 4×4 pixels
    want = F.avg_pool2d(mask[None], 4)[0]
    assert torch.allclose(cells, want)
    # a grid shifted by 2 px: each cell covers pixels [4i, 4i+4) - 2
    shifted = resample(mask, PIXELS, (4, 4), Grid((4.0, 4.0), (-0.5, -0.5)), mode="area")
    assert torch.allclose(shifted[0, 1], torch.tensor([0.0, 0.5, 1.0, 0.5]))
    assert torch.allclose(sampling_matrix(16, 1.0, 0.0, 4, 4.0, -0.5, "area").sum(1), torch.ones(4, dtype=torch.float64))


def test_grids_follow_padding_and_resizing():
    grid = Grid((8.0, 8.0), (-3.0, -2.0))
    # 32 px of padding cropped as 4 cells: the same cells in the unpadded image
    assert grid.cropped((4, 4), (32, 32)) == grid
    # on a 2× enlarged image, cell i at -3 + 8i enlarged px is at (-3 + 8i + 0.5) / 2 - 0.5 original px
    small = grid.through_resize((512, 512), (256, 256))
    assert small.stride == (4.0, 4.0) and small.offset == (-1.75, -1.25)


SQUARE_IMAGE = 128
SQUARE_SIDE = 24
#: top-left corners of the planted squares: off-centre, near a corner, lower left
SQUARES = [(40, 72), (70, 30), (20, 20)]
METHOD_OVERRIDES = {
    "patchcore": [],
    "padim": [],
    "cfa": ["method.epochs=0"],
    "fca": ["method.feature_input_size=512"],
}


def blob_centroid(amap: torch.Tensor) -> tuple[float, float]:
    """Centroid of the map's peak blob: pixels above half-way from the median to the maximum, connected
    to the maximum, weighted by their height above that level."""
    level = float(amap.median() + 0.5 * (amap.max() - amap.median()))
    regions, _ = ndimage.label((amap > level).numpy())
    peak = int(amap.flatten().argmax())
    w = torch.where(torch.from_numpy(regions == regions.flat[peak]), amap - level, torch.zeros_like(amap)).double()
    ys, xs = torch.meshgrid(torch.arange(amap.shape[0]), torch.arange(amap.shape[1]), indexing="ij")
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


def planted_square_errors(tmp_path, method: str, *overrides: str) -> torch.Tensor:
    """(squares, 2): each planted square's map centroid minus the square's centre, (dy, dx) px.

    The method is fitted on gravel normals (memory bank / Gaussians only); a held-out normal gets a
    uniform bright square (a defect without inner structure, so only geometry can move its centroid).
    """
    cfg = compose_cfg("train", [
        "dataset=textures/gravel", f"dataset.generated_size={SQUARE_IMAGE}", f"dataset.image_size={SQUARE_IMAGE}",
        "dataset.n_train=16", "dataset.n_test_good=2", "dataset.n_per_type=1", "dataset.val_fraction=0.25",
        f"method={method}", "logger=none", "trainer.enable_progress_bar=false", *METHOD_OVERRIDES[method], *overrides,
    ], tmp_path)
    L.seed_everything(0)
    datamodule, model = build(cfg)
    datamodule.setup("fit")
    if model.needs_fit:
        trainer = L.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, datamodule=datamodule)
    model.eval()
    batch = next(iter(datamodule.val_dataloader()))
    normal = batch.image[batch.label == 0][:1]
    errors = []
    for top, left in SQUARES:
        image = normal.clone()
        image[..., top:top + SQUARE_SIDE, left:left + SQUARE_SIDE] = 0.9
        planted = type(batch)(image=image, label=torch.ones(1, dtype=torch.long), path=["planted"],
                              defect_type=["square"])
        with torch.no_grad():
            amap = model.predict_maps(planted)["anomaly_map"][0]
        cy, cx = blob_centroid(amap)
        errors.append([cy - (top + (SQUARE_SIDE - 1) / 2), cx - (left + (SQUARE_SIDE - 1) / 2)])
    return torch.tensor(errors)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_a_planted_square_is_drawn_on_itself(tmp_path, method, one_thread):
    # measured (gravel 128², mean over the 3 squares): aligned within 1.5 px for every method; legacy
    # PatchCore, PaDiM and CFA 7-11 px down-right
    errors = planted_square_errors(tmp_path / "aligned", method)
    assert (errors.mean(0).abs() <= 2).all(), (method, errors)
    if method in ("patchcore", "padim", "cfa"):  # the memory-bank methods were drawn down-right before
        legacy = planted_square_errors(tmp_path / "legacy", method, "backbone.alignment=legacy")
        assert (legacy.mean(0) > 5).all(), (method, legacy)


class StridedBoxes(torch.nn.Module):
    """Three strided convolutions with all-ones kernels, so each cell answers its receptive field evenly and
    its centre is where convolution arithmetic puts it (worked out by hand, pixel i spans [i - ½, i + ½]):

    * a: kernel 2, stride 2, no padding: cell i reads pixels 2i, 2i+1, centred at 2i + 0.5;
    * b: kernel 3, stride 2, padding 1 on a: cell j reads a's cells 2j-1, 2j, 2j+1, centred on a's
      cell 2j, i.e. at 2·(2j) + 0.5 = 4j + 0.5;
    * c: kernel 4, stride 2, padding 1 on b: cell k reads b's cells 2k-1 … 2k+2, centred between b's cells
      2k and 2k+1, i.e. at 4·(2k + 0.5) + 0.5 = 8k + 2.5.
    """

    CENTRES = [(2, 0.5), (4, 0.5), (8, 2.5)]  # (stride, offset of cell 0)

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 2, 2, stride=2, padding=0, bias=False)
        self.b = torch.nn.Conv2d(2, 2, 3, stride=2, padding=1, bias=False)
        self.c = torch.nn.Conv2d(2, 2, 4, stride=2, padding=1, bias=False)
        for conv in (self.a, self.b, self.c):
            torch.nn.init.ones_(conv.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.a(x)
        b = self.b(a)
        return [a, b, self.c(b)]


@torch.no_grad()
def test_probe_finds_the_hand_computed_centres_of_strided_box_convolutions():
    net = StridedBoxes()
    strides = [s for s, _ in StridedBoxes.CENTRES]
    offsets, _ = probe_offsets(net, strides, (64, 64))
    for (stride, centre), (oy, ox) in zip(StridedBoxes.CENTRES, offsets):
        assert oy == pytest.approx(centre, abs=0.02) and ox == pytest.approx(centre, abs=0.02), (stride, oy, ox)
    # and through LayerGeometry, as the extractors use it: cell i of each layer at offset + stride·i
    from texad.geometry import LayerGeometry

    geometry = LayerGeometry(net, strides, lambda: net, "strided boxes")
    grids = geometry.grids_of((64, 64), net(torch.zeros(1, 3, 64, 64)))
    assert [v for g in grids for v in g.offset] == pytest.approx([c for _, c in StridedBoxes.CENTRES for _ in "yx"],
                                                                 abs=0.02)
    assert [g.stride for g in grids] == [(float(s), float(s)) for s in strides]
