"""Images: sampled tensors to uint8 arrays and PIL images, grids, output-path checks and atomic image files.

One rounding rule (`to_uint8_hwc`) serves every output path: grids, PIL lists, folders of PNGs and .npz files.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import check_int
from .atomic import check_destination, write_atomic

__all__ = ["make_grid", "save_image_atomic", "image_format_for_path", "image_mode", "to_uint8_hwc", "pil_from_hwc",
           "to_output"]

_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# Formats whose PIL writer stores resized copies of the image, not the image (ICO: sizes up to 256 x 256).
_RESIZING_FORMATS = ("ICO", "ICNS")


def make_grid(images, nrow: Optional[int] = None, padding: int = 2) -> Image.Image:
    """Tile images into one PIL image, `nrow` images per row (default ceil(sqrt(n))), with `padding`
    black pixels between and around them (torchvision's layout).

    images: a list of PIL images of one size, a tensor [B, C, H, W] or an array [B, H, W, C] with
    values in [0, 1] (C = 1 or 3). Grayscale in gives grayscale out.
    """
    arr = _images_to_uint8(images)
    n, h, w, c = arr.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    nrow = check_int("nrow", nrow, low=1)
    padding = check_int("padding", padding, low=0)
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    return pil_from_hwc(grid)


def image_format_for_path(path, mode: Optional[str] = None) -> str:
    """PIL's format name for `path`'s extension, after checking its directory is writable and, given a
    PIL `mode` ("RGB", "L": see `image_mode`), that PIL can write an image of that mode in that format.

    Raises ValueError naming the problem (unknown extension, a format PIL cannot write in that mode,
    missing or unwritable directory), so a caller can refuse bad output paths before doing any work.
    """
    path = Path(path)
    Image.init()
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write {path}: unknown image extension {ext or '(none)'!r} "
                         "(use .png, .jpg, .bmp, ...)")
    if fmt in _RESIZING_FORMATS:
        raise ValueError(f"cannot write {path}: PIL's {fmt} writer stores resized copies (at most 256 x 256), not "
                         "the image itself; use .png, .jpg, .bmp, ...")
    if mode is not None:
        # A trial save of one pixel: PIL registers savers it cannot run (HDF5, GRIB, BUFR, WMF without a
        # handler) and savers for a few modes only (XBM, MSP, Palm, BLP; QOI has no grayscale), and
        # finding out only when the real image is saved would waste the whole sampling run.
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot write {path}: PIL cannot save {mode} images as {fmt} ({e}); "
                             "use .png, .jpg, .bmp, ...") from None
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: directory {parent} is not writable")
    check_destination(path)
    return fmt


def image_mode(channels: int) -> str:
    """The PIL mode of an image with `channels` channels, as sample(output_type="pil") makes them
    (make_grid takes 1 or 3 channels only)."""
    if channels not in _IMAGE_MODES:
        raise ValueError(f"cannot make a PIL image with {channels} channels (need 1, 3 or 4)")
    return _IMAGE_MODES[channels]


def save_image_atomic(image: Image.Image, path) -> Path:
    """Write `image` to `path` (format from the extension) so that `path` is either untouched or
    complete: the bytes go to a temporary file in the same directory, are flushed to disk, and
    os.replace moves them into place. Returns the path.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"save_image_atomic expects a PIL image, got {type(image).__name__}")
    path = Path(path)
    fmt = image_format_for_path(path)
    try:
        write_atomic(path, lambda f: image.save(f, format=fmt))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot write {path}: {e}") from e
    return path



def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, C]; one rounding rule for every output path."""
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def pil_from_hwc(a: np.ndarray) -> Image.Image:
    gray = image_mode(a.shape[-1]) == "L"
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if gray else a))


def _images_to_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        # Checked first: sparse, nested and meta tensors would fail later in clamp or the copy to the
        # CPU with NotImplementedError, not with a message about the input.
        if images.layout != torch.strided or images.is_nested:
            kind = "nested" if images.is_nested else str(images.layout).replace("torch.", "")
            raise ValueError(f"make_grid expects a dense tensor, got a {kind} tensor")
        if images.device.type not in ("cpu", "cuda"):
            raise ValueError(f"make_grid expects a CPU or CUDA tensor, got one on {images.device}")
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"expected a float tensor [B, C, H, W] in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        _check_finite(images)
        arr = to_uint8_hwc(images.detach().to(torch.float32))
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype.kind != "f":
            raise ValueError(f"expected a float array [B, H, W, C] in [0, 1], got {images.dtype} {images.shape}")
        arr = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
        _check_finite(arr)
        arr = to_uint8_hwc(arr)
    elif isinstance(images, Sequence) and all(isinstance(im, Image.Image) for im in images):
        if not images:
            raise ValueError("make_grid needs at least one image")
        if len({im.size for im in images}) != 1:
            raise ValueError(f"images differ in size: {sorted({im.size for im in images})}")
        gray = all(im.mode == "L" for im in images)
        arr = np.stack([np.asarray(im.convert("L" if gray else "RGB")) for im in images])
        if gray:
            arr = arr[..., None]
    else:
        raise ValueError("make_grid expects a list of PIL images, a [B, C, H, W] tensor or a [B, H, W, C] array")
    if arr.shape[0] == 0:
        raise ValueError("make_grid needs at least one image")
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"make_grid supports 1 or 3 channels, got {arr.shape[-1]}")
    return arr


def _check_finite(images: torch.Tensor) -> None:
    # NaN and Inf would round to black and white pixels: a broken result that looks like an image.
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"make_grid: {bad} of {images.numel()} values are NaN or Inf")


def to_output(x0: torch.Tensor, data_range, output_type: str):
    """Sampled x_0 (float, [B, C, H, W] in `data_range`) as `output_type`: "pt" (float32 CPU tensor in
    [0, 1]), "np" (float32 [B, H, W, C] in [0, 1], diffusers' convention) or "pil" (a list of images)."""
    lo, hi = data_range
    # clone() outside inference mode gives the caller an ordinary tensor (usable with autograd later).
    images = ((x0.to(torch.float32).cpu().clone() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    if output_type == "pt":
        return images.contiguous()
    if output_type == "np":
        return images.permute(0, 2, 3, 1).contiguous().numpy()
    return [pil_from_hwc(a) for a in to_uint8_hwc(images)]
