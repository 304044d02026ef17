"""One LightningDataModule for every data set; subclasses only say how to list their samples.

Splits: the normal training images minus a seeded validation hold-out (`val_fraction`), or, where the
data set ships validation normals of its own (`val/good/`, as the embedded texture sets do), those.
The validation set is these normals plus `val_copies` synthetic-defect copies of each (exact masks),
drawn round-robin from `val_defects` (by default every generator of `texad.data.synthetic`, including
the validation-only Perlin and CutPaste ones), so sweeps select settings on anomalies without ever
touching the test set. `setting="blind"` trains on the unlabelled test images themselves (the
transductive protocol of blind localization).
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from texad.data.batch import collate
from texad.data.checks import check_inputs
from texad.data.embedded import TEXTURES, ensure_elpv_set, ensure_texture_set
from texad.data.images import as_hw, read_mask, read_rgb, resize_mask, resize_rgb, to_tensor
from texad.data.layout import GOOD, Sample, SampleSplit, read_ksdd2, read_mtd, read_mvtec_layout
from texad.data.synthetic import ALL_GENERATORS, plant_defect
from texad.data.type_families import TYPE_FAMILIES, plant_family
from texad.errors import TexadError
from texad.outputs import current_umask

log = logging.getLogger(__name__)

SETTINGS = ("standard", "blind")


class AnomalyDataset(Dataset):
    """Decodes, resizes and normalises samples; optionally plants a synthetic defect (validation).

    `synthetic` maps an index to a defect type: that item is an anomalous copy of its normal image,
    made deterministically from (seed, index).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        with_masks: bool,
        hide_labels: bool = False,
        synthetic: dict[int, str] | None = None,
        seed: int = 0,
        views: Any = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.with_masks = with_masks
        self.hide_labels = hide_labels
        self.synthetic = synthetic or {}
        self.seed = seed
        self.views = views  # callable(image uint8, path) -> dict of extra tensors (superpixel views)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None, int, str]:
        """Image (uint8, model size), mask (bool or None), label, defect type of one item."""
        s = self.samples[index]
        image = read_rgb(s.path)
        mask = None
        if s.mask_path is not None:
            mask = read_mask(s.mask_path, s.path, image.shape[:2])
        image = resize_rgb(image, self.image_size)
        label, defect_type = s.label, s.defect_type
        if index in self.synthetic:

            defect_type = self.synthetic[index]
            rng = np.random.default_rng([self.seed, index])
            plant = plant_family if defect_type in TYPE_FAMILIES else plant_defect
            image, mask = plant(image, defect_type, rng)
            label = 1
        elif mask is not None:
            mask = resize_mask(mask, self.image_size)
        if self.with_masks and mask is None:
            mask = np.zeros(self.image_size, dtype=bool)
        return image, mask, label, defect_type

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask, label, defect_type = self.load(index)
        item: dict[str, Any] = {
            "image": to_tensor(image, self.mean, self.std),
            "mask": None if (mask is None or self.hide_labels) else torch.from_numpy(mask)[None].float(),
            "label": -1 if self.hide_labels else label,
            "defect_type": "unknown" if self.hide_labels else defect_type,
            "path": str(self.samples[index].path) + (f"#synthetic-{defect_type}" if index in self.synthetic else ""),
            "index": torch.tensor(index),
        }
        if self.views is not None:
            item.update(self.views(image, str(self.samples[index].path), self.mean, self.std))
        return item


class EpochSeededShuffle(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): a resumed run sees the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class AnomalyDataModule(L.LightningDataModule):
    """Shared splitting, loaders and validation logic; subclasses implement `list_samples`."""

    def __init__(
        self,
        image_size: int | Sequence[int] = 256,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        val_synthetic: bool = True,
        val_copies: int = 3,
        val_defects: Sequence[str] | None = None,
        setting: str = "standard",
        seed: int = 0,
        name: str = "dataset",
    ) -> None:
        super().__init__()
        if setting not in SETTINGS:
            raise TexadError(f"dataset.setting must be one of {list(SETTINGS)}, got {setting!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise TexadError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        self.image_size = as_hw(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.val_fraction, self.val_synthetic = val_fraction, val_synthetic
        self.val_copies, self.val_defects = _check_val_generators(val_copies, val_defects)
        self.setting, self.seed, self.name = setting, seed, name
        self.views = None  # set by methods that need superpixel views (Sp-CFA)
        self.split: SampleSplit | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.input_report: dict[str, Any] = {}  # texad.data.checks: what metrics.json records of the inputs

    @abstractmethod
    def list_samples(self) -> SampleSplit:
        """The data set's normal training images and labelled test images."""

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self._split_samples()
        # before any training step: every image header, every mask (texad.data.checks)
        self.input_report = check_inputs(self.train_samples, self.val_samples, self.split.test)

    def _split_samples(self) -> None:
        try:
            split = self.list_samples()
        except TexadError as err:
            if self.setting == "blind" and "no test images" in str(err):
                raise TexadError(f"setting=blind needs a test split, but dataset {self.name!r} has none ({err})") from err
            raise
        if self.setting == "blind":
            if not split.test:
                raise TexadError(f"setting=blind needs a test split, but dataset {self.name!r} has none")
            self.split = split
            self.train_samples, self.val_samples = list(split.test), []
            return
        if split.val:  # the data set's own validation normals: no training image is held out
            self.val_samples, self.train_samples = list(split.val), list(split.train)
            self.split = split
            return
        order = np.random.default_rng(self.seed).permutation(len(split.train))
        n_val = int(round(self.val_fraction * len(split.train)))
        if n_val >= len(split.train):
            n_val = len(split.train) - 1
        self.val_samples = [split.train[i] for i in sorted(order[:n_val])]
        self.train_samples = [split.train[i] for i in sorted(order[n_val:])]
        self.split = split

    @property
    def has_masks(self) -> bool:
        self.setup()
        return self.split.has_masks

    @property
    def defect_types(self) -> list[str]:
        self.setup()
        return self.split.defect_types

    def _dataset(self, samples, **kwargs) -> AnomalyDataset:
        return AnomalyDataset(
            samples, self.image_size, self.mean, self.std, seed=self.seed, views=self.views, **kwargs
        )

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
        )

    def train_dataset(self) -> AnomalyDataset:
        self.setup()
        return self._dataset(self.train_samples, with_masks=False, hide_labels=True)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        return self._loader(ds, self.batch_size, EpochSeededShuffle(len(ds), self.seed))

    def fit_statistics_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training images in a fixed order, for statistics such as a memory bank.

        Under DDP each rank gets every world_size-th image; the statistic is then reduced exactly.
        """
        ds = self.train_dataset()
        if world_size > 1:
            ds = Subset(ds, list(range(rank, len(ds), world_size)))
        return self._loader(ds, self.eval_batch_size)

    def val_dataset(self) -> AnomalyDataset:
        self.setup()
        normals = list(self.val_samples)
        samples = list(normals)
        synthetic: dict[int, str] = {}
        if self.val_synthetic and normals:
            # copy c of held-out normal i gets generator (i·copies + c) mod G: every generator appears
            # ⌊n·copies/G⌋ or one more times, and one normal's copies differ in kind
            for i, sample in enumerate(normals):
                for c in range(self.val_copies):
                    synthetic[len(samples)] = self.val_defects[(i * self.val_copies + c) % len(self.val_defects)]
                    samples.append(sample)
        return self._dataset(samples, with_masks=self.val_synthetic, synthetic=synthetic)

    def typed_validation_dataset(self, families: Sequence[str] = TYPE_FAMILIES, per_family: int = 10) -> AnomalyDataset:
        """Validation normals, each turned into defective copies of known type (`texad.data.type_families`).

        For choosing a defect-type clustering: `per_family` images of every family, copy j of a family
        drawn on validation normal j mod n, so every family sits on the same normals and a cluster cannot
        follow the underlying crop. Deterministic in (dataset seed, index); no test image is touched.
        """
        self.setup()
        unknown = [f for f in families if f not in TYPE_FAMILIES]
        if unknown:
            raise TexadError(f"unknown validation type families {unknown}; choose from {list(TYPE_FAMILIES)}")
        if not self.val_samples:
            raise TexadError(f"dataset {self.name!r} has no validation normals to draw typed validation defects on "
                             "(val/good/ or a val_fraction > 0 of the training images)")
        samples, synthetic = [], {}
        for family in families:
            for j in range(int(per_family)):
                synthetic[len(samples)] = family
                samples.append(self.val_samples[j % len(self.val_samples)])
        return self._dataset(samples, with_masks=True, synthetic=synthetic)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset(), self.eval_batch_size)

    def test_dataset(self) -> AnomalyDataset:
        self.setup()
        return self._dataset(self.split.test, with_masks=self.split.has_masks)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset(), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def _check_val_generators(copies: int, defects: Sequence[str] | None) -> tuple[int, tuple[str, ...]]:
    if int(copies) < 1:
        raise TexadError(f"dataset.val_copies must be >= 1 (synthetic copies per held-out normal), got {copies}")
    defects = tuple(ALL_GENERATORS if defects is None else defects)
    unknown = [d for d in defects if d not in ALL_GENERATORS]
    if unknown or not defects:
        raise TexadError(f"dataset.val_defects: unknown generator(s) {unknown}; choose from {list(ALL_GENERATORS)}")
    return int(copies), defects


def check_root(root: str | Path | None, key: str = "dataset.root") -> Path:
    if root is None or str(root) in ("", "???"):
        raise TexadError(f"{key} is not set: give the path of the data set folder ({key}=/path/to/data)")
    return Path(str(root)).expanduser().absolute()


class MVTecDataModule(AnomalyDataModule):
    """MVTec AD (one category), or any folder in MVTec layout."""

    def __init__(self, root: str, category: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = check_root(root)
        self.category = category

    def list_samples(self) -> SampleSplit:
        return read_mvtec_layout(self.root / self.category if self.category else self.root)


class KSDD2DataModule(AnomalyDataModule):
    """Kolektor Surface-Defect Dataset 2 (its own train/test layout with *_GT.png masks)."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = check_root(root)

    def list_samples(self) -> SampleSplit:
        return read_ksdd2(self.root)


class MTDDataModule(AnomalyDataModule):
    """Magnetic Tile Defects, with a seeded train/test split of its normal images."""

    def __init__(self, root: str, train_fraction: float = 0.8, split_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = check_root(root)
        self.train_fraction = train_fraction
        self.split_seed = split_seed  # the train/test split's own seed: fixed, so every run sees one test set

    def list_samples(self) -> SampleSplit:
        return read_mtd(self.root, self.train_fraction, self.split_seed)


class TextureDataModule(AnomalyDataModule):
    """Embedded texture sets (scikit-image brick/grass/gravel + synthetic defects), generated once; training,
    validation (`n_val_good` normals of their own) and test images from disjoint parts of each photo."""

    def __init__(
        self,
        texture: str,
        cache_dir: str,
        generated_size: int = 256,
        n_train: int = 40,
        n_val_good: int = 10,
        n_test_good: int = 64,
        n_per_type: int = 16,
        generation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.texture, self.cache_dir = texture, Path(cache_dir).expanduser().absolute()
        self.gen = dict(
            image_size=generated_size, n_train=n_train, n_val_good=n_val_good, n_test_good=n_test_good,
            n_per_type=n_per_type, seed=generation_seed,
        )

    def list_samples(self) -> SampleSplit:
        if self.texture not in TEXTURES:
            raise TexadError(f"unknown embedded texture {self.texture!r}; choices: {list(TEXTURES)}")
        return read_mvtec_layout(generated(self.cache_dir, lambda: ensure_texture_set(self.texture, self.cache_dir, **self.gen)))


class ELPVDataModule(AnomalyDataModule):
    """ELPV solar cells (image labels only): normal = defect probability 0, defective = 1."""

    def __init__(
        self, cache_dir: str, cell_type: str = "all", test_fraction_normal: float = 0.3, limit: int | None = None,
        split_seed: int = 0, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cache_dir = Path(cache_dir).expanduser().absolute()
        self.cell_type, self.test_fraction_normal, self.limit = cell_type, test_fraction_normal, limit
        self.split_seed = split_seed  # the train/test split's own seed: fixed, so every run sees one test set

    def list_samples(self) -> SampleSplit:
        root = generated(self.cache_dir, lambda: ensure_elpv_set(
            self.cache_dir, cell_type=self.cell_type, test_fraction_normal=self.test_fraction_normal,
            seed=self.split_seed, limit=self.limit,
        ))
        return read_mvtec_layout(root)


def generated(cache_dir: Path, ensure: Callable[[], Path]) -> Path:
    """A generated set under the cache dir: built once (texad.data.embedded), readable by the group.

    A cache dir that is read-only or full is one line naming it. The set is built in a temp folder
    (mkdtemp: 0700) and renamed into place; its top folder then gets the umask's mode (0755 under 022),
    like every file inside it (written with plain open/imwrite).
    """
    try:
        root = ensure()
    except OSError as err:
        raise TexadError(f"cache dir {str(cache_dir)!r} (paths.cache_dir, TEXAD_CACHE): cannot build the data set "
                         f"there: {err.strerror or err}{f' ({err.filename})' if err.filename else ''}") from err
    wanted = 0o777 & ~current_umask()
    try:
        if root.stat().st_mode & 0o777 != wanted:
            os.chmod(root, wanted)
    except OSError:
        pass  # a set built by another user in a shared cache: theirs to open
    return root


__all__ = [
    "AnomalyDataModule",
    "AnomalyDataset",
    "ELPVDataModule",
    "EpochSeededShuffle",
    "GOOD",
    "KSDD2DataModule",
    "MTDDataModule",
    "MVTecDataModule",
    "TextureDataModule",
]
