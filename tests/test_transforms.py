import io

import numpy as np
import pytest
from PIL import Image

from agmm_deploy.constants import IMAGENET_MEAN, IMAGENET_STD
from agmm_deploy.transforms import (
    ImageDecodeError,
    colorize,
    decode_image,
    letterbox,
    normalize,
    overlay,
    pad_value,
    palette_png,
    sliding_window_count,
    sliding_window_tiles,
)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("I;16", "PNG"),
                                      ("RGB", "WEBP"), ("RGB", "TIFF"), ("P", "PNG")])
def test_decode_any_mode_to_rgb(mode, fmt):
    image = Image.new(mode, (31, 17))
    rgb = decode_image(_encode(image, fmt))
    assert rgb.shape == (17, 31, 3) and rgb.dtype == np.uint8


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rgb = decode_image(_encode(image, "JPEG", exif=exif))
    assert rgb.shape == (40, 20, 3)


def test_bad_bytes_are_refused_with_reasons():
    with pytest.raises(ImageDecodeError, match="is empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match=r"could not be decoded as an image \(not a recognised image format\)"):
        decode_image(b"definitely not an image")
    png = _encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(ImageDecodeError, match="the limit is 1000"):
        decode_image(png, max_pixels=1000)


def test_letterbox_pads_with_the_colour_that_normalises_to_zero():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 120, 3), dtype=np.uint8)
    canvas, box = letterbox(image, (64, 64), fill=pad_value(IMAGENET_MEAN))
    assert canvas.shape == (64, 64, 3)
    assert box.resized == (27, 64)
    x = normalize(canvas, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32
    assert np.abs(x[0, :, 40:, :]).max() < 0.02  # padding normalises to ~0


def test_sliding_window_tiles_cover_non_square_inputs_once_each():
    tiles = sliding_window_tiles(100, 150, (48, 64))
    # Official stride ceil(tile / 3): 16 rows apart, 22 columns apart; the last row/column flush with the border.
    assert sorted({t[0] for t in tiles}) == [0, 16, 32, 48, 52]
    assert sorted({t[2] for t in tiles}) == [0, 22, 44, 66, 86]
    assert len(tiles) == len(set(tiles)) == 25
    assert all(y2 - y1 == 48 and x2 - x1 == 64 for y1, y2, x1, x2 in tiles)
    assert sliding_window_tiles(30, 150, (48, 64))[0] == (0, 30, 0, 64)  # short axis: one window, padded later
    assert sliding_window_tiles(100, 150, (48, 64), overlap=0.0)[:2] == [(0, 48, 0, 64), (0, 48, 64, 128)]
    with pytest.raises(ValueError, match=r"overlap=1 is invalid; expected 0 <= overlap < 1"):
        sliding_window_tiles(100, 150, 48, overlap=1)


@pytest.mark.parametrize("size,tile,overlap", [((100, 150), (48, 64), 2 / 3), ((30, 150), (48, 64), 2 / 3),
                                               ((1, 5000), (128, 128), 2 / 3), ((721, 1500), 721, 0.5),
                                               ((40, 50), 60, 0.0), ((97, 97), (16, 16), 0.9)])
def test_sliding_window_count_is_the_number_of_windows(size, tile, overlap):
    tiles = sliding_window_tiles(*size, tile, overlap)
    assert sliding_window_count(*size, tile, overlap) == len(tiles) == len(set(tiles))


def test_colorize_overlay_and_palette_png():
    palette = ((0, 0, 0), (255, 0, 0), (0, 255, 0))
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    colors = colorize(labels, palette)
    assert colors[0, 1].tolist() == [255, 0, 0] and colors[1, 1].tolist() == [0, 0, 0]
    blended = overlay(np.full((2, 2, 3), 100, np.uint8), labels, palette, alpha=0.5)
    assert blended[0, 1].tolist() == [178, 50, 50]
    decoded = Image.open(io.BytesIO(palette_png(labels, palette)))
    assert decoded.mode == "P"
    assert np.array_equal(np.asarray(decoded), labels)
