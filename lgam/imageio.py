"""Robust image loading for the app and the CLI: anything a person might drop in -> RGB ``PIL.Image``.

:func:`load_image` accepts a path, raw bytes, a binary file object or a ``PIL.Image`` and either
returns an RGB image or raises :class:`ImageLoadError` (a ``ValueError``) with a message meant for
the person who sent the file. It handles:

- not an image / zero bytes / truncated or corrupt data / a format variant the decoder does not
  support -> a clear error (whatever exception the decoder raises: one "cannot be decoded"
  message);
- files over ``max_bytes`` and images over ``max_pixels`` (decompression bombs) -> an error, checked
  from the header *before* any pixel is decoded (only :data:`READ_FORMATS` are opened: formats
  whose header says the size; a HEIC photo gets its own message);
- animations (GIF, APNG, WebP) -> the first frame;
- EXIF orientation -> applied (the image is shown the way the camera held it);
- CMYK, palette (with or without transparency), 16-bit / 32-bit / float grayscale, grayscale,
  alpha or a PNG's one transparent colour (tRNS; composited on white) -> RGB; 1x1 images are
  fine.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO, Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._format import format_bytes
from .errors import LgamError

__all__ = ["ImageLoadError", "load_image", "to_rgb", "MAX_BYTES", "MAX_PIXELS", "READ_FORMATS"]

#: default upload limit (bytes)
MAX_BYTES = 25 * 1024 * 1024
#: default pixel limit (width x height); 50 MP covers any phone camera
MAX_PIXELS = 50_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, Image.Image]


class ImageLoadError(LgamError, ValueError):
    """The input cannot be used as an image; ``str(err)`` is a message for the user."""


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
                f"{name} is {format_bytes(size)}; the limit is {format_bytes(max_bytes)}"
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
        raise ImageLoadError(f"{name} is over the {format_bytes(max_bytes)} limit")
    return data, name


def _flatten_alpha(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``img`` pasted on ``background`` through its alpha into one new RGB image (an RGBA
    composite took three full-size RGBA copies)."""
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba)  # Pillow pastes RGBA onto RGB as it is, through its alpha band
    return out


#: rows of a grayscale image converted at a time (:func:`_gray_to_rgb`): memory stays near the
#: image's own, not several float64 copies of it
_ROWS = 256


def _gray_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale -> RGB (:func:`to_rgb` says how it is scaled),
    a band of rows at a time."""
    w, h = img.size
    bands = [(y, min(y + _ROWS, h)) for y in range(0, h, _ROWS)]

    def rows(y0: int, y1: int) -> np.ndarray:
        return np.array(img.crop((0, y0, w, y1)), dtype=np.float32)  # a writable copy

    sixteen = img.mode.startswith("I;16")  # always /257: no pass over the image for its range
    lo, hi = (0.0, 65535.0) if sixteen else _finite_range(rows(*b) for b in bands)
    offset = 0.0
    if sixteen or (img.mode == "I" and 255 < hi <= 65535 and lo >= 0):
        scale = 1.0 / 257.0
    elif img.mode == "F" and 0 <= lo and hi <= 1:
        scale = 255.0
    elif 0 <= lo and hi <= 255:
        scale = 1.0
    else:  # another range (a 12-bit float TIFF, a signed one): its own, stretched to 0..255
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    out = np.empty((h, w), np.uint8)
    for y0, y1 in bands:
        arr = rows(y0, y1)
        arr -= offset
        arr *= scale
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        out[y0:y1] = np.clip(np.rint(arr, out=arr), 0, 255, out=arr)
    return Image.fromarray(out, "L").convert("RGB")


def _finite_range(parts: Iterable[np.ndarray]) -> tuple[float, float]:
    """The smallest and largest finite value over ``parts`` (0, 0 when there is none)."""
    lo, hi = np.inf, -np.inf
    for arr in parts:
        finite = arr[np.isfinite(arr)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (0.0, 0.0) if lo > hi else (lo, hi)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit ``RGB``. Alpha is composited on ``background``. 16-bit grayscale
    (``I;16*``) is divided by 257; 32-bit integer (``I``) and float (``F``) grayscale are taken
    as they are when within [0, 255], an ``I`` within [0, 65535] as 16-bit, an ``F`` within
    [0, 1] times 255, and any other range (a 12-bit or signed image) is stretched from its own
    smallest to largest finite value; NaN is black."""
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "1", "RGB"):
        return _flatten_alpha(img, background)  # palette or tRNS single-colour transparency
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_rgb(img)
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
        img = _open(data)
        # the header gives the size: refuse bombs before decoding any pixel
        _check_size(img, name, max_pixels)
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
        _check_size(img, name, max_pixels)  # a format whose frame's size the header did not say
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(_not_an_image(name, data)) from None
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


#: the formats :func:`load_image` opens (Pillow's names): photos' and common images' formats whose
#: header gives the size before any pixel is decoded (Pillow's ICO/CUR plugins decode the largest
#: frame while opening; FITS, PSD, EPS and the rest are left out)
READ_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "DIB", "TIFF", "PPM", "TGA",
                "JPEG2000", "QOI", "DDS")  # JPEG includes MPO (a camera's multi-picture JPEG)
#: ``Image.open`` under a warnings filter: ``catch_warnings`` swaps the process's filter list, so
#: two threads opening at once could leave another's filter in place for good
_OPEN_LOCK = threading.Lock()


def _open(data: bytes) -> Image.Image:
    """``Image.open`` of ``data`` among :data:`READ_FORMATS`, the header only. ``max_pixels`` is the
    limit, checked after; Pillow's warning (over MAX_IMAGE_PIXELS) is not, and its error (over
    twice that) is raised before the header can be read."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=_readable_formats())


def _readable_formats() -> tuple[str, ...]:
    """:data:`READ_FORMATS` this Pillow reads (AVIF from 11.2: naming a format Pillow lacks made
    ``Image.open`` raise KeyError for every file the formats before it did not take)."""
    Image.init()
    return tuple(f for f in READ_FORMATS if f in Image.OPEN)


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    if img.width * img.height > max_pixels:
        raise ImageLoadError(_too_many_pixels(name, img.size, max_pixels))
    if img.width < 1 or img.height < 1:
        raise ImageLoadError(f"{name} has no pixels ({img.width}x{img.height})")


#: ISO base-media brands of HEIF/HEIC photos (an iPhone's default), which Pillow cannot read
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


def _not_an_image(name: str, data: bytes) -> str:
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return (f"{name} is a HEIC/HEIF photo, which lgam cannot read: export or share it as JPEG "
                "(on an iPhone: Settings > Camera > Formats > Most Compatible)")
    return (f"{name} is not an image (or not a format lgam reads: JPEG, PNG, GIF, WebP, AVIF, BMP, "
            "TIFF...)")


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
    except MemoryError:
        raise ImageLoadError(f"{name} needs too much memory to convert to RGB") from None
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

