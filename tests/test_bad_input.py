"""Bad input gets a clear error that names the file or key and what was expected."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_entry
from texad.data.datamodule import MVTecDataModule
from texad.errors import TexadError
from texad.outputs import atomic_write, write_json


def make_folder(root: Path, n_train: int = 3, with_gt: bool = True, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/crack"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), rng.integers(0, 255, (size, size), np.uint8))
    cv2.imwrite(str(root / "test/good/000.png"), rng.integers(0, 255, (size, size), np.uint8))
    cv2.imwrite(str(root / "test/crack/000.png"), rng.integers(0, 255, (size, size), np.uint8))
    if with_gt:
        (root / "ground_truth/crack").mkdir(parents=True)
        mask = np.zeros((size, size), np.uint8)
        mask[10:20, 10:20] = 255
        cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), mask)
    return root


def datamodule(root: Path) -> MVTecDataModule:
    return MVTecDataModule(root=str(root), image_size=32, val_fraction=0.0)


def test_missing_dataset_root_names_path_and_layout(tmp_path):
    with pytest.raises(TexadError, match=r"does not exist.*MVTec AD layout"):
        datamodule(tmp_path / "nowhere").setup()


def test_empty_train_good_is_an_error(tmp_path):
    root = make_folder(tmp_path / "set", n_train=0)
    with pytest.raises(TexadError, match=r"no training images in .*train/good"):
        datamodule(root).setup()


def test_defective_image_without_mask_while_masks_exist(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(TexadError, match=r"test/crack/000.png.*has no mask"):
        datamodule(root).setup()


def test_folder_without_ground_truth_gives_image_labels_only(tmp_path):
    dm = datamodule(make_folder(tmp_path / "set", with_gt=False))
    dm.setup()
    assert not dm.has_masks
    items = [dm.test_dataset()[i] for i in range(2)]
    assert all(it["mask"] is None for it in items)
    assert sorted(it["label"] for it in items) == [0, 1]


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "set")
    (root / "test/good/000.png").write_bytes(b"not a png at all")
    dm = datamodule(root)
    with pytest.raises(TexadError, match=r"cannot read image .*test/good/000.png"):
        dm.test_dataset()[1]  # test/crack sorts before test/good


def test_mask_of_other_size_names_both_files(tmp_path):
    root = make_folder(tmp_path / "set")
    cv2.imwrite(str(root / "ground_truth/crack/000_mask.png"), np.zeros((16, 16), np.uint8))
    dm = datamodule(root)
    with pytest.raises(TexadError, match=r"000_mask.png.* is 16x16 but its image .*crack/000.png.* is 32x32"):
        dm.test_dataset()[0]


@pytest.mark.slow
def test_unknown_method_and_dataset_list_the_choices():
    proc = run_entry("train.py", "method=nope", check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown method 'nope'; choices:" in proc.stderr
    assert all(m in proc.stderr for m in ("cfa", "spcfa", "fca"))
    proc = run_entry("train.py", "dataset=textures/nope", check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown dataset 'textures/nope'" in proc.stderr
    assert "mvtec/wood" in proc.stderr and "textures/gravel" in proc.stderr


@pytest.mark.slow
def test_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_entry("evaluate.py", f"ckpt_path={tmp_path}/none.ckpt", f"hydra.run.dir={tmp_path}/eval", check=False)
    assert proc.returncode == 1
    assert "none.ckpt' does not exist" in proc.stderr


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = write_json(tmp_path / "metrics.json", {"pixel_auroc": 0.5})

    def crash(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text().strip().startswith("{") and '"pixel_auroc": 0.5' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_ksdd2_and_mtd_layouts_are_read(tmp_path):
    from texad.data.layout import read_ksdd2, read_mtd

    rng = np.random.default_rng(0)
    blank, spot = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    spot[4:8, 4:8] = 255
    for split, items in (("train", [blank, blank, spot]), ("test", [blank, spot])):
        (tmp_path / "ksdd2" / split).mkdir(parents=True)
        for i, gt in enumerate(items):
            cv2.imwrite(str(tmp_path / "ksdd2" / split / f"{i}.png"), rng.integers(0, 255, (16, 16), np.uint8))
            cv2.imwrite(str(tmp_path / "ksdd2" / split / f"{i}_GT.png"), gt)
    split = read_ksdd2(tmp_path / "ksdd2")
    assert len(split.train) == 2 and all(s.label == 0 for s in split.train)  # the defective one is left out
    assert [s.label for s in split.test] == [0, 1] and split.has_masks

    for kind, n in (("MT_Free", 5), ("MT_Crack", 2)):
        (tmp_path / "mtd" / kind / "Imgs").mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(tmp_path / "mtd" / kind / "Imgs" / f"{i}.jpg"), rng.integers(0, 255, (16, 16), np.uint8))
            cv2.imwrite(str(tmp_path / "mtd" / kind / "Imgs" / f"{i}.png"), spot if kind != "MT_Free" else blank)
    a, b = read_mtd(tmp_path / "mtd", 0.6, seed=1), read_mtd(tmp_path / "mtd", 0.6, seed=1)
    assert [s.path for s in a.train] == [s.path for s in b.train]  # deterministic split
    assert len(a.train) == 3 and sum(s.label == 0 for s in a.test) == 2
    assert {s.defect_type for s in a.test if s.label} == {"crack"}
    with pytest.raises(TexadError, match="MT_Free"):
        read_mtd(tmp_path / "ksdd2")


# --- issue 11, point 10: one `texad: error:` line, also through Hydra's instantiate and DataLoader workers


def stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_headline_command_without_data_names_paths_data_root_and_layout(monkeypatch):
    monkeypatch.delenv("TEXAD_DATA_ROOT", raising=False)
    proc = run_entry("train.py", "method=spcfa", "dataset=mvtec/wood", "logger=none", check=False, timeout=300)
    assert proc.returncode == 1
    last = stderr_lines(proc)[-1]
    assert last.startswith("texad: error: paths.data_root is not set"), proc.stderr[-2000:]
    assert "TEXAD_DATA_ROOT" in last and "<paths.data_root>/wood/train/good/*.png" in last
    assert "Error in call to target" not in proc.stderr and "Traceback" not in proc.stderr


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    from conftest import compose_cfg

    monkeypatch.setenv("TEXAD_DATA_ROOT", str(tmp_path / "mvtec"))
    cfg = compose_cfg("train", ["dataset=mvtec/wood"], tmp_path / "run")
    assert cfg.paths.data_root == str(tmp_path / "mvtec") and cfg.dataset.root == str(tmp_path / "mvtec")
    monkeypatch.delenv("TEXAD_DATA_ROOT")
    cfg = compose_cfg("train", ["dataset=mvtec/wood"], tmp_path / "run")
    assert cfg.paths.data_root is None  # unset: the run stops with the message above


def test_folder_without_root_names_dataset_root(tmp_path):
    from texad.cli import check_data_root
    from conftest import compose_cfg

    cfg = compose_cfg("train", ["dataset=folder"], tmp_path / "run")
    with pytest.raises(TexadError, match=r"^dataset.root is not set.*<dataset.root>/train/good/\*.png"):
        check_data_root(cfg)
    check_data_root(compose_cfg("train", ["dataset=folder", f"dataset.root={tmp_path}"], tmp_path / "run"))


def test_instantiate_and_worker_wrappers_are_unwrapped():
    """Hydra's InstantiationException (cause) and torch's worker re-raise (message) give the original."""
    from hydra.errors import InstantiationException
    from torch._utils import ExceptionWrapper

    from texad.cli import error_message, find_texad_error

    original = TexadError("cannot read image '/x/000.png': corrupt or not an image file")
    try:
        try:
            raise original
        except TexadError as err:
            raise InstantiationException("Error in call to target 'X':\nTexadError(...)") from err
    except InstantiationException as wrapped:
        assert find_texad_error(wrapped) is original
    assert find_texad_error(RuntimeError("unrelated")) is None
    try:
        raise original
    except TexadError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(TexadError) as caught:
        wrapper.reraise()
    assert str(caught.value).startswith("Caught TexadError in DataLoader worker process 0.")
    assert error_message(caught.value) == str(original)
    assert error_message(original) == str(original)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_training_image_last_line_names_the_file(tmp_path, num_workers):
    root = make_folder(tmp_path / "set", n_train=6, size=64)
    (root / "train/good/002.png").write_bytes(b"not a png at all")
    proc = run_entry(
        "train.py", "dataset=folder", f"dataset.root={root}", "dataset.image_size=64", f"dataset.num_workers={num_workers}",
        "dataset.val_fraction=0.0", "method.epochs=1", "logger=none", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}", check=False, timeout=300,
    )
    assert proc.returncode == 1
    expected = f"texad: error: cannot read image {str(root / 'train/good/002.png')!r}: corrupt or not an image file"
    assert stderr_lines(proc)[-1] == expected, proc.stderr[-3000:]
    assert "Caught TexadError" not in proc.stderr
