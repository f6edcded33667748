"""Image folders as users have them: symlinked subfolders (and loops), camera photos with an EXIF
rotation, very large photos, truncated files in folders too big to cache, the run's own output folder
inside the data folder, and a misspelt built-in dataset name."""
import os

import numpy as np
import pytest
import torch

from ddpm_fast.training import data as data_mod
from ddpm_fast.training.data import DataError, ImageFolder, load_dataset, load_image
from ddpm_fast.training import train

from test_training import QUIET, TINY


def _png(path, value=128, size=(8, 8), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)


def test_symlinked_subfolders_are_followed_once_and_loops_end(tmp_path):
    _png(tmp_path / "real" / "a" / "1.png")
    _png(tmp_path / "real" / "b" / "2.png")
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(tmp_path / "real" / "a", links / "a")
    os.symlink(tmp_path / "real" / "b", links / "b")
    os.symlink(links, links / "loop")  # a cycle: must not hang or count images twice
    os.symlink(tmp_path / "real" / "a", links / "a_again")  # the same real folder under two names
    ds = ImageFolder(links, 8, 1)
    assert sorted(p.name for p in ds.files) == ["1.png", "2.png"]


def test_exif_rotation_is_applied(tmp_path):
    from PIL import Image

    # Stored 16 wide x 8 high with the left half black; EXIF orientation 6 means "rotate 90 degrees
    # clockwise to display": shown 8 wide x 16 high with the TOP half black.
    arr = np.full((8, 16), 255, np.uint8)
    arr[:, :8] = 0
    img = Image.fromarray(arr, mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "photo.jpg", 8, 1)[0]  # centre 8x8 crop of the displayed 8x16 image
    # The displayed image's top half is black, so the crop's rows go from dark (top) to light (bottom).
    assert x[0].mean() < 0.3 and x[-1].mean() > 0.7, x


def test_photos_above_pils_bomb_limit_load(tmp_path, monkeypatch):
    from PIL import Image

    _png(tmp_path / "big.png", size=(40, 40))  # 1600 px, above twice the lowered limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # stands in for PIL's ~179 MP default
    with pytest.raises(Image.DecompressionBombError):
        with Image.open(tmp_path / "big.png") as im:
            im.load()
    assert load_image(tmp_path / "big.png", 8, 1).shape == (1, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    monkeypatch.setattr(data_mod, "MAX_IMAGE_PIXELS", 100)  # our own limit still refuses a real bomb
    with pytest.raises(DataError, match="big.png"):
        load_image(tmp_path / "big.png", 8, 1)


def test_truncated_jpeg_fails_at_construction_even_uncached(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "ok.jpg", quality=90)
    blob = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(blob[: len(blob) // 2])  # passes PIL's header verify()
    with pytest.raises(DataError, match="half.jpg"):
        ImageFolder(tmp_path, 8, 3, cache=False)


def test_the_runs_own_folder_inside_the_data_is_not_training_data(tmp_path):
    for i in range(8):
        _png(tmp_path / "imgs" / f"{i}.png", value=20 * i)
    out = tmp_path / "imgs" / "run"
    train(tmp_path / "imgs", out, preset=TINY, steps=1, batch_size=4, progress=False, sample_every=1)
    assert any((out / "samples").iterdir())  # the run wrote a grid inside the data folder
    ds = load_dataset(tmp_path / "imgs", TINY, exclude=[out])
    assert len(ds) == 8
    assert train(tmp_path / "imgs", out, preset=TINY, steps=2, batch_size=4, resume=True, **QUIET).step == 2


def test_a_misspelt_builtin_dataset_names_the_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="built-in dataset: digits"):
        load_dataset("digit", TINY)


def test_uncached_and_cached_folders_give_the_same_images(tmp_path):
    for i in range(5):
        _png(tmp_path / f"{i}.png", value=40 * i, size=(12, 10), mode="RGB")
    a, b = ImageFolder(tmp_path, 8, 3, cache=True), ImageFolder(tmp_path, 8, 3, cache=False)
    assert a.images is not None and b.images is None
    assert all(torch.equal(a[i], b[i]) for i in range(5))
