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
defaults list, so their current defaults apply), and their maps are their ``predict_maps``. Only
the *fitting* loop is written here, because those modules fit under a Lightning trainer with hooks
the clustering run does not have: the blind VAE's loop draws ``vectors_per_step`` random feature
vectors of a few images per step exactly as its ``training_step`` does (same loss, same optimiser
from its ``configure_optimizers``); CFA builds its memory bank with ``build_bank_step`` /
``finalize_banks`` and minimises ``CFAModel.loss`` with its own optimiser, as its ``on_fit_start`` and
``training_step`` do (and calibrates its head on the normal images when its ``calibration`` is on, as
its ``on_fit_end`` does). Sp-CFA's superpixel views are not supported here (original view only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from texad.errors import TexadError
from texad.methods.blind_vae.torch_model import FeatureVAE

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


def fit_localizer(source: str, localizer: nn.Module | None, datamodule: Any,
                  clustered_batches: Callable[[], Iterable[Any]], device: torch.device, seed: int) -> dict[str, Any]:
    """Fit the localiser as its method would (nothing for ``fca`` / ``gt``); returns what to record."""
    if source == "blind_vae":
        return fit_blind_vae(localizer, clustered_batches, getattr(datamodule, "batch_size", 4), device, seed)
    if source == "cfa":
        return fit_cfa(localizer, datamodule, device)
    return {}


def fit_blind_vae(method: nn.Module, batches: Callable[[], Iterable[Any]], images_per_step: int,
                  device: torch.device, seed: int) -> dict[str, Any]:
    """Train the blind VAE on the clustered images (unlabelled), as ``BlindVAEMethod.training_step``."""
    hp = method.hparams
    feats = []
    with torch.no_grad():
        for batch in batches():
            feats.append(method.scaled_features(batch.image.to(device)).cpu())
    feats = torch.cat(feats)
    n, c = feats.shape[:2]
    vectors = feats.permute(0, 2, 3, 1).reshape(n, -1, c)  # (N, hw, C)
    optimizer = method.configure_optimizers()
    g = torch.Generator().manual_seed(int(seed))
    vae = method.model.vae.train()
    steps_per_epoch = math.ceil(n / max(1, int(images_per_step)))
    max_steps = int(hp.get("max_steps") or -1)  # as its trainer: a step budget, else epochs
    budget = max_steps if max_steps > 0 else steps_per_epoch * int(hp.epochs)
    losses = []
    while budget > 0:
        order = torch.randperm(n, generator=g)
        epoch_loss, steps = 0.0, min(steps_per_epoch, budget)
        budget -= steps
        for s in range(steps):
            images = order[s * images_per_step:(s + 1) * images_per_step]
            pool = vectors[images].reshape(-1, c)
            pick = torch.randperm(len(pool), generator=g)[: min(int(hp.vectors_per_step), len(pool))]
            x = pool[pick].to(device).T.reshape(1, c, -1, 1)
            recon, mu, logvar = vae(x)
            loss, _, _ = FeatureVAE.loss(x, recon, mu, logvar, hp.kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach())
        losses.append(epoch_loss / steps)
    vae.eval()
    method.calibrate(feats)  # its per-location level on the same unlabelled images (method.calibration)
    log.info("blind VAE: %d images, %d epochs, loss %.4f -> %.4f", n, len(losses),
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return {"localizer_images": n, "localizer_epochs": len(losses),
            "localizer_loss_first_epoch": losses[0] if losses else None,
            "localizer_loss_last_epoch": losses[-1] if losses else None}


def fit_cfa(method: nn.Module, datamodule: Any, device: torch.device) -> dict[str, Any]:
    """Memory bank from the normal training images, then CFA's loss for its epochs (original view)."""
    hp = method.hparams
    if len(method.model.view_names) > 1:
        raise TexadError("method.maps_from=cfa: superpixel views are not supported for clustering maps; "
                         "set method.cfa.region_sizes=[null,null]")
    datamodule.setup("fit")
    with torch.no_grad():
        for batch in datamodule.fit_statistics_dataloader():
            batch.image = batch.image.to(device)
            method.model.build_bank_step(method._feats(batch, method.model.views_without_bank))
    method.model.finalize_banks(hp.gamma_c, hp.seed)
    optimizer = method.configure_optimizers()
    losses = []
    loader = datamodule.train_dataloader()
    for epoch in range(int(hp.epochs)):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            batch.image = batch.image.to(device)
            loss, _ = method.model.loss(method._feats(batch, ["org"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
    def normal_batches():  # CFA's per-location calibration on the normal images, as its on_fit_end
        for batch in datamodule.fit_statistics_dataloader():
            batch.image = batch.image.to(device)
            yield batch

    method.calibrate(normal_batches())
    log.info("CFA: %d normal images, %d epochs", len(datamodule.train_samples), len(losses))
    return {"localizer_images": len(datamodule.train_samples), "localizer_epochs": len(losses),
            "localizer_loss_first_epoch": losses[0] if losses else None,
            "localizer_loss_last_epoch": losses[-1] if losses else None}
