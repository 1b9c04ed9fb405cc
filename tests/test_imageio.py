"""lgam.imageio.load_image: every kind of bad or unusual input of the issue's item 5."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from lgam.imageio import ImageLoadError, load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width x height`` (a decompression bomb:
    the IDAT is a tiny zlib stream that would inflate to width*height bytes)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _check_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB" and img.size == size
    return np.asarray(img)


@pytest.fixture()
def jpeg_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)), "JPEG")


# -- errors --------------------------------------------------------------------------------------


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not the pixels you are looking for\n" * 10)
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(p)
    with pytest.raises(ValueError, match="not an image"):  # ImageLoadError is a ValueError
        load_image(b"%PDF-1.4 hello")


def test_zero_bytes(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(p)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt):
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_corrupt_body(jpeg_bytes):
    data = bytearray(jpeg_bytes)
    data[200:] = b"\xff" * (len(data) - 200)  # garbage entropy-coded data after the headers
    with pytest.raises(ImageLoadError, match="truncated or corrupt|not an image"):
        load_image(bytes(data))


def _dds_with_unknown_fourcc() -> bytes:
    """A 4x4 DDS file whose pixel format is a FourCC no decoder knows ("LGAM"): Pillow's
    DdsImagePlugin raises ``NotImplementedError`` for it while opening."""
    header = (struct.pack("<3I", 0x1007, 4, 4)  # flags (caps, height, width, pixel format), h, w
              + struct.pack("<3I", 0, 0, 0)  # pitch, depth, mipmaps
              + bytes(44)  # 11 reserved words
              + struct.pack("<4I", 32, 0x4, int.from_bytes(b"LGAM", "little"), 0)  # DDPF_FOURCC
              + bytes(36))  # masks, caps
    assert len(header) == 120
    return b"DDS " + struct.pack("<I", 124) + header + bytes(64)


def test_unsupported_dds_gets_the_cannot_be_decoded_message(tmp_path):
    data = _dds_with_unknown_fourcc()
    with pytest.raises(NotImplementedError):  # what Pillow itself raises
        Image.open(io.BytesIO(data))
    p = tmp_path / "texture.dds"
    p.write_bytes(data)
    with pytest.raises(ImageLoadError, match=r"^texture\.dds cannot be decoded: .*Unimplemented"):
        load_image(p)


@pytest.mark.parametrize("error", [
    NotImplementedError("Unimplemented pixel format"), OSError("broken data stream"),
    ValueError("bad value"), SyntaxError("bad header"), struct.error("unpack requires 4 bytes"),
    EOFError(), IndexError("tile out of range"), KeyError("mode"), RuntimeError("decoder bug"),
    Image.DecompressionBombError("too big"),
], ids=lambda e: type(e).__name__)
def test_any_decoder_exception_gets_one_clear_message(monkeypatch, jpeg_bytes, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)  # a decoder failing on the pixels
    with pytest.raises(ImageLoadError) as info:
        load_image(jpeg_bytes)
    msg = str(info.value)
    if isinstance(error, Image.DecompressionBombError):
        assert "decompression bomb" in msg
    else:
        assert msg.startswith("the upload cannot be decoded: it is truncated or corrupt")
        assert msg.endswith(f"({str(error).strip() or type(error).__name__})")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_decoder_exception_while_opening(monkeypatch, jpeg_bytes):
    def fail(*args, **kwargs):
        raise NotImplementedError("Unimplemented DXGI format 99")

    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(ImageLoadError, match="cannot be decoded.*DXGI format 99"):
        load_image(jpeg_bytes)


def test_conversion_failure_of_a_given_image(monkeypatch):
    img = Image.new("CMYK", (4, 4))

    def fail(*args, **kwargs):
        raise NotImplementedError("no conversion")

    monkeypatch.setattr(Image.Image, "convert", fail)
    with pytest.raises(ImageLoadError, match="the image"):
        load_image(img)


def test_over_size_limit(tmp_path, jpeg_bytes):
    p = tmp_path / "big.jpg"
    p.write_bytes(jpeg_bytes)
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(p, max_bytes=len(jpeg_bytes) - 1)
    with pytest.raises(ImageLoadError, match="limit"):
        load_image(io.BytesIO(jpeg_bytes), max_bytes=100)
    assert load_image(p, max_bytes=len(jpeg_bytes)).size == (48, 64)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb(side):
    data = _png_with_size(side, side)
    assert len(data) < 2000
    with pytest.raises(ImageLoadError, match="pixels|decompression bomb"):
        load_image(data)


def test_pixel_limit_is_configurable():
    img = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageLoadError, match="100x100"):
        load_image(img, max_pixels=9_999)
    assert load_image(img, max_pixels=10_000).size == (100, 100)


def test_pixel_limit_above_pillows_warning_threshold(monkeypatch):
    """max_pixels is the limit, not Pillow's own MAX_IMAGE_PIXELS (89.5 MP): between the two, an
    image loads; above Pillow's hard cap (twice that) the message names the cap that refused it."""
    img = _encode(Image.new("RGB", (100, 100), (9, 8, 7)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # 10,000 px: over it, under twice it
    assert load_image(img, max_pixels=20_000).getpixel((5, 5)) == (9, 8, 7)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # 10,000 px: over twice it
    with pytest.raises(ImageLoadError, match="the limit is 8,000 pixels"):
        load_image(img, max_pixels=20_000)


# -- unusual but valid ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_first_frame(fmt):
    frames = [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    arr = _check_rgb(load_image(data), (16, 12))
    assert arr[..., 0].mean() > 200 and arr[..., 2].mean() < 50  # red, not blue


def test_cmyk():
    cmyk = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # red in CMYK
    arr = _check_rgb(load_image(_encode(cmyk, "JPEG")), (20, 10))
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    data = _encode(p, "PNG", transparency=0)
    arr = _check_rgb(load_image(data), (8, 8))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent -> white background
    assert tuple(arr[4, 4]) == (255, 0, 0)


def test_palette_opaque():
    p = Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4)
    assert p.mode == "P"
    arr = _check_rgb(load_image(_encode(p, "GIF")), (8, 8))
    assert abs(int(arr[0, 0, 1]) - 200) < 10


def test_16bit_grayscale():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    data = _encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    arr = _check_rgb(load_image(data), (3, 1))
    assert arr[0, :, 0].tolist() == [0, 128, 255]
    assert (arr[..., 0] == arr[..., 1]).all()


def test_float_grayscale():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    arr = _check_rgb(load_image(img), (3, 1))
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_a_tall_float_image_is_scaled_by_its_whole_range():
    """Grayscale is converted a band of rows at a time (several float64 copies of a 50-MP image
    took ~1.5 GB): the scale is still the whole image's, here set by a value in the last band."""
    a = np.full((700, 2), 0.5, np.float32)
    a[-1] = (200.0, np.nan)  # > 1: the whole image is [0, 255]; NaN is black
    arr = _check_rgb(load_image(Image.fromarray(a, "F")), (2, 700))
    assert (arr[:-1] == 0).all() or (arr[:-1] == 1).all()  # 0.5 on [0, 255], not 128 on [0, 1]
    assert arr[-1, :, 0].tolist() == [200, 0]
    i16 = np.tile(np.arange(0, 65536, 257, dtype=np.uint16)[:, None], (3, 5))  # 768 rows
    arr = _check_rgb(load_image(_encode(Image.fromarray(i16), "PNG")), (5, 768))
    assert arr[:256, 0, 0].tolist() == list(range(256))


@pytest.mark.parametrize("values, want", [
    ([0.0, 2048.0, 4095.0], [0, 128, 255]),  # a 12-bit float TIFF was all white past 255
    ([-1.0, 0.0, 1.0], [0, 128, 255]),  # a signed one lost its negative half to black
    ([0.0, 0.5, 1.0], [0, 128, 255]),
    ([0.0, 100.0, 255.0], [0, 100, 255]),
])
def test_float_grayscale_of_another_range_keeps_its_contrast(values, want):
    arr = _check_rgb(load_image(Image.fromarray(np.array([values], np.float32), "F")), (3, 1))
    assert arr[0, :, 0].tolist() == want


def test_32bit_grayscale_beyond_16_bits_keeps_its_contrast():
    img = Image.fromarray(np.array([[0, 600_000, 1_000_000]], np.int32), "I")
    assert _check_rgb(load_image(img), (3, 1))[0, :, 0].tolist() == [0, 153, 255]


@pytest.mark.parametrize("mode", ["F", "I;16"])
def test_grayscale_is_converted_without_whole_image_float_copies(mode):
    """Several float64 copies of the whole image (a 10-MP 16-bit PNG took +295 MiB): now a band of
    rows at a time, so numpy's peak stays near the 1-byte-a-pixel result, not 8+ bytes a pixel."""
    import tracemalloc

    h, w = 4000, 1000  # bands of 256 rows: a small share of the image
    a = np.linspace(0, 1 if mode == "F" else 65535, h * w).reshape(h, w)
    img = Image.fromarray(a.astype(np.float32 if mode == "F" else np.uint16))
    tracemalloc.start()
    try:
        load_image(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * h * w, f"{peak / (h * w):.1f} bytes a pixel"


def test_semi_transparent_pixels_are_blended_as_an_alpha_composite():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    want = np.asarray(Image.alpha_composite(white, img).convert("RGB"))
    assert np.array_equal(_check_rgb(load_image(_encode(img, "PNG")), (40, 30)), want)


def _ico_around(png: bytes) -> bytes:
    """An ICO whose one entry says 16x16 and holds ``png``: Pillow's ICO plugin decodes it while
    opening, before its size can be checked."""
    return (struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
            + png)


def test_a_format_that_decodes_while_opening_is_not_opened(monkeypatch):
    """An ICO around a large PNG was decoded whole inside Image.open (~700 MB for a 200-KB
    upload) before the pixel limit was looked at."""
    data = _ico_around(_encode(Image.new("RGBA", (300, 300)), "PNG"))
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real(self))
    with pytest.raises(ImageLoadError, match="not an image \\(or not a format lgam reads"):
        load_image(data, max_pixels=10_000)
    assert not decoded


def test_a_pillow_without_a_listed_format_still_opens_the_others(monkeypatch):
    """Pillow reads AVIF from 11.2 (requirements allow 10): naming a format it lacks made
    Image.open raise KeyError for every BMP, TIFF, ... and non-image."""
    Image.init()
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != "AVIF"})
    bmp = _encode(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP")
    assert _check_rgb(load_image(bmp), (3, 2))[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"plain text, no pixels")


def test_a_heic_photo_is_named_as_such(tmp_path):
    """An iPhone's photo got "not an image"; Pillow cannot read HEIC, but the person can export it."""
    photo = tmp_path / "IMG_0042.HEIC"
    photo.write_bytes(struct.pack(">I", 24) + b"ftypheic" + struct.pack(">I", 0) + b"mif1heic" + bytes(64))
    with pytest.raises(ImageLoadError, match=r"^IMG_0042.HEIC is a HEIC/HEIF photo.*share it as JPEG"):
        load_image(photo)


def test_grayscale():
    data = _encode(Image.new("L", (5, 4), 77), "PNG")
    arr = _check_rgb(load_image(data), (5, 4))
    assert (arr == 77).all()


@pytest.mark.parametrize("mode,clear,solid", [("RGB", (0, 0, 0), (20, 30, 40)), ("L", 0, 90)])
def test_single_colour_transparency_is_composited_on_white(mode, clear, solid):
    """A PNG's tRNS chunk on an RGB or grayscale image (what optimisers write for all-or-nothing
    alpha) is transparency too: the same picture as RGBA gets the same white background."""
    img = Image.new(mode, (4, 4), clear)
    img.putpixel((1, 1), solid)
    data = _encode(img, "PNG", transparency=clear)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == clear
    arr = _check_rgb(load_image(data), (4, 4))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (solid if mode == "RGB" else (solid,) * 3)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(mode):
    img = Image.new(mode, (4, 4), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    img.putpixel((1, 1), (0, 0, 0, 255) if mode == "RGBA" else (0, 255))
    arr = _check_rgb(load_image(_encode(img, "PNG")), (4, 4))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[1, 1]) == (0, 0, 0)


def test_exif_rotation():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    arr = _check_rgb(load_image(data), (20, 40))
    assert arr[2, 10, 0] > 200 and arr[-3, 10, 2] > 200  # red on top, blue at the bottom


def test_a_callers_image_is_left_as_it_was():
    """A decoded file is rotated in place (no second 143-MB copy of a 50-MP photo); a PIL image
    the caller passes is not: the result is a new image, the caller's keeps its size and EXIF."""
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.open(io.BytesIO(_encode(Image.new("RGB", (40, 20), (0, 0, 255)), "JPEG",
                                        exif=exif.tobytes())))
    img.load()
    out = load_image(img)
    assert out is not img and out.size == (20, 40)
    assert img.size == (40, 20) and img.getexif().get(0x0112) == 6
    rgb = Image.new("RGB", (3, 2))
    assert load_image(rgb) is not rgb


def test_one_pixel(tmp_path):
    p = tmp_path / "px.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    arr = _check_rgb(load_image(p), (1, 1))
    assert arr[0, 0].tolist() == [1, 2, 3]


def test_source_types(tmp_path, jpeg_bytes):
    p = tmp_path / "a.jpg"
    p.write_bytes(jpeg_bytes)
    ref = np.asarray(load_image(p))
    for src in (str(p), jpeg_bytes, bytearray(jpeg_bytes), io.BytesIO(jpeg_bytes)):
        assert np.array_equal(np.asarray(load_image(src)), ref)
    assert load_image(Image.open(p)).mode == "RGB"
    with pytest.raises(ImageLoadError):
        load_image(12345)  # type: ignore[arg-type]
