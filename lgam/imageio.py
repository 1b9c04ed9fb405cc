"""Robust image loading for the app and the CLI: anything a person might drop in -> RGB ``PIL.Image``.

:func:`load_image` accepts a path, raw bytes, a binary file object or a ``PIL.Image`` and either
returns an RGB image or raises :class:`ImageLoadError` (a ``ValueError``) with a message meant for
the person who sent the file. It handles:

- not an image / zero bytes / truncated or corrupt data / a format variant the decoder does not
  support -> a clear error (whatever exception the decoder raises: one "cannot be decoded"
  message);
- files over ``max_bytes`` and images over ``max_pixels`` (decompression bombs) -> an error, checked
  from the header *before* any pixel is decoded;
- animations (GIF, APNG, WebP) -> the first frame;
- EXIF orientation -> applied (the image is shown the way the camera held it);
- CMYK, palette (with or without transparency), 16-bit / 32-bit / float grayscale, grayscale,
  alpha or a PNG's one transparent colour (tRNS; composited on white) -> RGB; 1x1 images are
  fine.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import LgamError

__all__ = ["ImageLoadError", "load_image", "to_rgb", "MAX_BYTES", "MAX_PIXELS"]

#: default upload limit (bytes)
MAX_BYTES = 25 * 1024 * 1024
#: default pixel limit (width x height); 50 MP covers any phone camera
MAX_PIXELS = 50_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]


class ImageLoadError(LgamError, ValueError):
    """The input cannot be used as an image; ``str(err)`` is a message for the user."""


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _read_bytes(source: ImageSource, max_bytes: int) -> tuple[bytes, str]:
    """Raw bytes of ``source`` (at most ``max_bytes``) and a name for messages."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "the upload"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = path.name
        if not path.is_file():
            raise ImageLoadError(f"{name}: no such file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageLoadError(
                f"{name} is {_fmt_bytes(size)}; the limit is {_fmt_bytes(max_bytes)}"
            )
        data = path.read_bytes()
    elif hasattr(source, "read"):
        name = str(getattr(source, "name", "the upload"))
        data = source.read(max_bytes + 1)
    else:
        raise ImageLoadError(f"cannot read an image from a {type(source).__name__}")
    if len(data) == 0:
        raise ImageLoadError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageLoadError(f"{name} is over the {_fmt_bytes(max_bytes)} limit")
    return data, name


def _flatten_alpha(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit ``RGB``. Alpha is composited on ``background``; 16-bit and 32-bit
    integer grayscale is scaled from its full range (``I;16*``: /257; ``I``: /257 when any value is
    over 255); float grayscale is taken as [0, 1] when its maximum is <= 1, else as [0, 255]."""
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "1", "RGB"):
        return _flatten_alpha(img, background)  # palette or tRNS single-colour transparency
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        elif mode.startswith("I;16") or np.nanmax(arr, initial=0.0) > 255:
            scale = 1.0 / 257.0
        else:
            scale = 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "A" in img.getbands():
        return _flatten_alpha(img, background)
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, HSV...
    except (ValueError, OSError) as e:
        raise ImageLoadError(f"unsupported colour mode {mode!r}: {e}") from None


def load_image(
    source: ImageSource,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Load ``source`` as an upright 8-bit RGB ``PIL.Image`` (first frame of an animation).

    Raises :class:`ImageLoadError` with a user-facing message for anything unusable.
    """
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageLoadError(_too_many_pixels("the image", source.size, max_pixels))
        return _upright_rgb(source, "the image", background)

    data, name = _read_bytes(source, max_bytes)
    try:
        with warnings.catch_warnings():
            # max_pixels is the limit, checked below; Pillow's warning (over MAX_IMAGE_PIXELS)
            # is not, its error (over twice that) is raised before the header can be read
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            # the header gives the size: refuse bombs before decoding any pixel
            if img.width * img.height > max_pixels:
                raise ImageLoadError(_too_many_pixels(name, img.size, max_pixels))
            if img.width < 1 or img.height < 1:
                raise ImageLoadError(f"{name} has no pixels ({img.width}x{img.height})")
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{name} is not an image (or not a format lgam reads: JPEG, PNG, GIF, WebP, BMP, "
            "TIFF...)"
        ) from None
    except Image.DecompressionBombError:
        raise ImageLoadError(
            f"{name} is too large to decode safely (possible decompression bomb); "
            f"the limit is {_pixel_cap(max_pixels):,} pixels"
        ) from None
    except MemoryError:
        raise ImageLoadError(f"{name} needs too much memory to decode") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises, the user gets one message
        raise ImageLoadError(_undecodable(name, e)) from None

    return _upright_rgb(img, name, background, owned=True)


def _pixel_cap(max_pixels: int) -> int:
    """The pixel limit in force: ``max_pixels``, or Pillow's hard cap (twice its
    ``MAX_IMAGE_PIXELS``, a process-wide setting) where that is lower."""
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow is None else min(max_pixels, 2 * int(pillow))


def _upright_rgb(img: Image.Image, name: str, background: tuple[int, int, int],
                 owned: bool = False) -> Image.Image:
    """EXIF rotation applied (ignored when the EXIF is broken), then :func:`to_rgb`. A caller's
    image is left as it was (the result is a new image); one this module decoded (``owned``) is
    rotated in place and returned when already RGB: a 50-MP photo is 143 MB, each copy as much
    again at the peak. A conversion the decoder cannot do gets the "cannot be decoded" message."""
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose the picture
        pass
    try:
        rgb = to_rgb(img, background)
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageLoadError(_undecodable(name, e)) from None
    return rgb.copy() if rgb is img and not owned else rgb


def _undecodable(name: str, error: BaseException) -> str:
    """The one message for a file a decoder fails on, whatever it raised (``OSError``,
    ``SyntaxError``, ``ValueError``, ``EOFError``, ``struct.error``, ``NotImplementedError`` for an
    unsupported variant of a format such as a DDS pixel format, ...)."""
    detail = str(error).strip() or type(error).__name__
    return (f"{name} cannot be decoded: it is truncated or corrupt, or a variant of its format "
            f"that is not supported ({detail})")


def _too_many_pixels(name: str, size: tuple[int, int], max_pixels: int) -> str:
    w, h = size
    return (
        f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels "
        "(please downscale it)"
    )

