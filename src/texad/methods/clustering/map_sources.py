"""Where the clustering's anomaly maps come from: another texad localiser, fitted in the same run.

``maps_from`` names the source:

* ``fca`` — the FCA method (``texad.methods.fca``), zero-shot, on each image alone;
* ``blind_vae`` — the blind VAE method (``texad.methods.blind_vae``): its per-location feature VAE
  is trained on the *clustered set* (unlabelled: the images to be clustered, as the paper's blind
  pipeline trains on its test set) and the map is FCA on the VAE's residual;
* ``cfa`` — the CFA method (``texad.methods.cfa``) fitted on the *normal training images* (memory
  bank, then its coupled-hypersphere loss), scoring every image;
* ``gt`` — the ground-truth masks (an oracle, for ablations).

The localisers are the other methods' own LightningModules, built from their own configs
(``conf/method/clustering.yaml`` pulls ``conf/method/{fca,blind_vae,cfa}.yaml`` in through its
defaults list, so their current defaults apply), and used only through the public ``Localizer``
protocol of ``texad.methods.base``: ``fit_on(datamodule)`` fits each with its own Lightning hooks
(``prepare_fit``, ``on_fit_start``, ``training_step``, ``on_fit_end``), ``predict_maps`` gives the maps.
Nothing of their training is copied here; what is chosen here is only *which images* they fit on:
the blind VAE gets a datamodule whose training set is the clustered images (``ClusteredImages``),
CFA the run's datamodule (its normal training images). Sp-CFA's superpixel views are not supported
here (original view only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from texad.data.batch import collate
from texad.data.datamodule import EpochSeededShuffle
from texad.errors import TexadError
from texad.methods.base import Localizer

log = logging.getLogger(__name__)

MAP_SOURCES = ("fca", "blind_vae", "cfa", "gt")
LOCALIZED = ("fca", "blind_vae", "cfa")


def build_localizer(source: str, backbone: nn.Module, factories: Mapping[str, Any]) -> nn.Module | None:
    """The localising method for ``source`` (None for ``gt``), built with the shared backbone.

    ``factories[source]`` is a callable taking ``backbone=`` (Hydra's ``_partial_: true`` of the
    method's config) or a config mapping with a ``_target_``.
    """
    if source not in MAP_SOURCES:
        raise TexadError(f"method.maps_from must be one of {list(MAP_SOURCES)} (or set method.maps_dir), got {source!r}")
    if source == "gt":
        return None
    factory = factories.get(source)
    if factory is None:
        raise TexadError(f"method.maps_from={source} needs the localiser's config under method.{source} "
                         f"(conf/method/{source}.yaml, pulled in by conf/method/clustering.yaml)")
    try:
        if isinstance(factory, Mapping):

            conf = {k: v for k, v in factory.items() if k != "_partial_"}
            return instantiate(conf, backbone=backbone, _convert_="all")
        return factory(backbone=backbone)
    except TexadError as err:
        raise TexadError(f"method.{source}: {err}") from err


def localizer_epochs(localizer: nn.Module) -> int:
    return int(getattr(localizer, "hparams", {}).get("epochs", 0) or 0)


class ClusteredImages(L.LightningDataModule):
    """The clustered images as a training set, for a localiser fitted on them (the blind VAE).

    Training batches of ``batch_size`` images in an order reshuffled each epoch (seeded, as the
    datamodules' ``EpochSeededShuffle``), and the same images in a fixed order for statistics."""

    def __init__(self, samples: list, dataset: Dataset, batch_size: int, eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.train_samples = list(samples)
        self._dataset, self.batch_size, self.eval_batch_size, self.seed = dataset, batch_size, eval_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset, batch_size=self.batch_size,
                          sampler=EpochSeededShuffle(len(self._dataset), self.seed), collate_fn=collate)

    def fit_statistics_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        indices = list(range(rank, len(self._dataset), world_size))
        return DataLoader(Subset(self._dataset, indices), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=collate)


def fit_localizer(source: str, localizer: Localizer | None, datamodule: Any, clustered: ClusteredImages) -> dict[str, Any]:
    """Fit the localiser through its public ``fit_on`` (nothing for ``fca`` / ``gt``); returns what to record.

    The blind VAE fits on the clustered images, CFA on the datamodule's normal training images."""
    if localizer is None or source == "fca":
        return {}
    if source == "cfa" and len(getattr(localizer, "view_region_sizes", [])) > 0:
        raise TexadError("method.maps_from=cfa: superpixel views are not supported for clustering maps; "
                         "set method.cfa.region_sizes=[null,null]")
    if not isinstance(localizer, Localizer):
        raise TexadError(f"method.maps_from={source}: {type(localizer).__name__} does not meet the Localizer "
                         "protocol of texad.methods.base (fit_on, predict_maps)")
    info = localizer.fit_on(clustered if source == "blind_vae" else datamodule)
    log.info("%s localiser fitted: %s", source, info)
    return info
