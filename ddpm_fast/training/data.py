"""Training data: an image folder, or the built-in "digits" set, as tensors in the model's data range.

- `ImageFolder(root, image_size, channels, data_range)`: every PNG/JPEG under `root` (recursively),
  converted to grayscale or RGB to match the model, resized so the short side is `image_size` and
  centre-cropped to a square, then scaled from [0, 1] pixels to `data_range` (default [-1, 1]).
  Files are checked when the dataset is built, so a corrupt or unreadable image fails at once with
  its path in the message instead of hours into a run.
- `digits_dataset(...)`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped with
  scikit-learn, nothing downloaded), upscaled to 16x16 with antialiased bicubic resampling. Needs the
  optional extra `pip install ddpm_fast[data]` (scikit-learn).
- `load_dataset(spec, config)`: what the trainer calls; `spec` is a folder path, "digits", a tensor
  [N, C, H, W] already in the data range, or any map-style dataset returning such images.

Every dataset here returns single images [C, H, W] float32; in-memory ones also expose `.images`
(the whole [N, C, H, W] tensor) so the trainer can gather a batch with one index instead of a loader.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ModelConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BUILTIN_DATASETS = ("digits",)


class DataError(ValueError):
    """Bad training data: a missing or empty folder, an unreadable image, a wrong shape."""


def to_data_range(x01: torch.Tensor, data_range: Sequence[float]) -> torch.Tensor:
    """Map pixels in [0, 1] linearly to [low, high]."""
    lo, hi = float(data_range[0]), float(data_range[1])
    return x01 * (hi - lo) + lo


class TensorImages(Dataset):
    """Images held in memory as one float32 tensor [N, C, H, W] (already in the data range)."""

    def __init__(self, images: torch.Tensor, name: str = "tensor"):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"in-memory training images must be a tensor [N, C, H, W], got {got}")
        if images.shape[0] == 0:
            raise DataError("the in-memory training set is empty (N = 0)")
        if not images.is_floating_point():
            raise DataError(f"training images must be floating point, got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise DataError("training images contain NaN or Inf")
        self.images = images.detach().to(torch.float32).contiguous()
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __repr__(self) -> str:
        return f"TensorImages({self.name}, {tuple(self.images.shape)})"


def _find_images(root: Path, exclude: Sequence[Path] = ()) -> List[Path]:
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist "
                        f"(or name a built-in dataset: {', '.join(BUILTIN_DATASETS)})")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is not a folder (give a folder of PNG/JPEG images, or 'digits')")
    skip = {os.path.realpath(p) for p in exclude}
    files, seen = [], set()
    # Symlinked folders are followed (a folder of links to image folders is a common layout); each real
    # folder is walked once, so a symlink loop cannot hang the scan. Sorted for a stable order.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skip:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / f)
    if not files:
        raise DataError(f"data folder {str(root)!r} contains no images "
                        f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)} files)")
    return files


def _pil_to_mode(img, channels: int):
    """Convert any PIL image to 'L' (1 channel) or 'RGB' (3 channels), handling alpha and 16-bit."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert('L') would clip at 255, so rescale by the type's range.
        a = np.asarray(img, dtype=np.float64)
        a = a / (65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels onto white, the usual look of such images.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("L" if channels == 1 else "RGB")


# PIL refuses images over ~179 MP as possible decompression bombs; a user's own photos can be larger
# (a 200 MP phone camera), so the limit for training files is raised, not removed.
MAX_IMAGE_PIXELS = 1 << 30


@contextmanager
def open_image(path: Union[str, Path]):
    """PIL's Image.open with MAX_IMAGE_PIXELS as the decompression-bomb limit (and no warning below it)."""
    import warnings

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(path: Union[str, Path], image_size: int, channels: int) -> torch.Tensor:
    """One image file -> float32 [channels, image_size, image_size] in [0, 1] (resize + centre crop)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_image(path) as im:
            # JPEG: let the decoder scale down by up to 8x while it decodes (never below the target's
            # short side), which makes large photos several times cheaper to read.
            im.draft(im.mode, (image_size, image_size))
            im.load()
            # Camera photos store their rotation in EXIF; apply it, as every image viewer does.
            img = _pil_to_mode(ImageOps.exif_transpose(im), channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image file {str(path)!r}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise DataError(f"image file {str(path)!r} has an empty size {w}x{h}")
    # Short side to image_size (antialiased bicubic), then a centre square crop.
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(img, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


class ImageFolder(Dataset):
    """Every PNG/JPEG under `root`, as [channels, size, size] float32 tensors in `data_range`.

    Every file is decoded once when the dataset is built (each header first, which is cheap), so a
    missing, empty, truncated or unreadable image raises `DataError` naming the file before training
    starts, never hours into a run. `cache` keeps the decoded images in memory as one tensor
    (`.images`): True, False, or "auto" (the default: cache when that tensor stays under 1 GiB, e.g.
    ~87k RGB images at 32x32); uncached folders are decoded again at each use. `exclude`: folders
    under `root` to leave out (the trainer's own output folder). `progress`: a bar while decoding.
    """

    def __init__(self, root: Union[str, Path], image_size: int, channels: int = 3,
                 data_range: Tuple[float, float] = (-1.0, 1.0), cache: Union[bool, str] = "auto",
                 verify: bool = True, exclude: Sequence[Path] = (), progress: bool = False):
        if channels not in (1, 3):
            raise DataError(f"image channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = Path(root)
        self.files = _find_images(self.root, exclude)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.data_range = tuple(float(v) for v in data_range)
        if cache == "auto":
            cache = len(self.files) * channels * self.image_size ** 2 * 4 < (1 << 30)
        if verify:
            self._verify_headers()
        self.images = None
        if cache or verify:
            from tqdm.auto import tqdm

            bar = tqdm(range(len(self.files)), desc="reading images", unit="img", leave=False,
                       disable=not progress or len(self.files) < 500)
            decoded = [self._load(i) for i in bar]
            self.images = torch.stack(decoded) if cache else None

    def _verify_headers(self) -> None:
        for f in self.files:
            try:
                with open_image(f) as im:
                    im.verify()  # structure and CRCs, without decoding: fails fast before the full pass
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                raise DataError(f"cannot read image file {str(f)!r}: {type(e).__name__}: {e}") from None

    def _load(self, i: int) -> torch.Tensor:
        return to_data_range(load_image(self.files[i], self.image_size, self.channels), self.data_range)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return self._load(i)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, {self.channels}x{self.image_size}x{self.image_size})"


def digits_images(image_size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as float32 [1797, 1, image_size, image_size] in [0, 1], and labels.

    The raw values are 0..16 ink intensities (white-on-black); they are scaled to [0, 1] and
    upscaled with antialiased bicubic resampling, clamped back into [0, 1] (bicubic overshoots).
    Returns (images, labels) as fresh tensors (the decoded set is cached per size).
    """
    x, y = _digits_cached(int(image_size))
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=4)
def _digits_cached(image_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the built-in 'digits' dataset needs scikit-learn: pip install 'ddpm_fast[data]' "
                          "(or pip install scikit-learn)") from None
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic",
                                            align_corners=False, antialias=image_size < 8)
        x = x.clamp_(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def digits_dataset(image_size: int = 16, channels: int = 1,
                   data_range: Tuple[float, float] = (-1.0, 1.0)) -> TensorImages:
    """The built-in "digits" training set in the model's size, channels and data range."""
    x, _ = digits_images(image_size)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif channels != 1:
        raise DataError(f"the digits dataset can feed 1- or 3-channel models, not {channels}")
    return TensorImages(to_data_range(x, data_range), name="digits")


def load_dataset(spec, config: ModelConfig, cache: Union[bool, str] = "auto", exclude: Sequence[Path] = (),
                 progress: bool = False) -> Dataset:
    """Resolve the trainer's `data` argument into a dataset of images matching `config` (`exclude` and
    `progress`: see ImageFolder)."""
    u, rng = config.unet, config.diffusion.data_range
    if isinstance(spec, torch.Tensor):
        ds = TensorImages(spec)
    elif isinstance(spec, Dataset):
        ds = spec
    elif isinstance(spec, (str, os.PathLike)):
        s = str(spec)
        if s in BUILTIN_DATASETS and not Path(s).exists():
            try:
                return digits_dataset(u.image_size, u.image_channels, rng)
            except ImportError as e:  # a missing optional extra is bad input here, not a broken install
                raise DataError(str(e)) from None
        ds = ImageFolder(s, u.image_size, u.image_channels, rng, cache=cache, exclude=exclude, progress=progress)
    else:
        raise DataError(f"data must be a folder path, one of {BUILTIN_DATASETS}, a tensor [N, C, H, W] "
                        f"or a torch Dataset; got {type(spec).__name__}")
    _check_first_item(ds, config)
    return ds


def _check_first_item(ds: Dataset, config: ModelConfig) -> None:
    u = config.unet
    try:
        n = len(ds)
    except TypeError:
        raise DataError("the dataset must be map-style (define __len__ and __getitem__)") from None
    if n == 0:
        raise DataError("the training set is empty")
    x = ds[0]
    want = (u.image_channels, u.image_size, u.image_size)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"training images must have shape {list(want)} for this model, got {got}")
