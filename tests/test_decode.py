"""The bounded decoder: every format priced from its header, bombs refused before a pixel is decoded."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from agmm_deploy.decode import (MAX_JPEG_SCANS, MAX_SCAN_PASSES, ImageDecodeError, decode_image, read_image, read_image_header,
                                to_rgb_uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(size=(48, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int, bits: int = 8, colour: int = 2) -> bytes:
    """A PNG whose IHDR says width x height; its IDAT holds a few bytes, so only a decoder would find out."""
    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _scan_bomb(scans: int) -> bytes:
    """A small progressive JPEG whose last refinement scan is repeated until it has ``scans`` scans."""
    data = _encode(_photo((64, 64)), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    body, eoi = data[last:-2], data[-2:]
    have = data.count(b"\xff\xda")
    return data[:last] + body * (scans - have + 1) + eoi


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}),
                                        ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {}),
                                        ("WEBP", {"lossless": True}), ("BMP", {}), ("ICO", {"sizes": [(32, 32)]})])
def test_good_images_decode_as_pillow_decodes_them(fmt, kwargs):
    data = _encode(_photo((32, 32) if fmt == "ICO" else (48, 32)), fmt, **kwargs)
    header = read_image_header(data)
    assert (header.width, header.height) == ((32, 32) if fmt == "ICO" else (48, 32))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data), expected)


def test_16_bit_grey_decodes_as_before_without_a_float_copy():
    rng = np.random.default_rng(1)
    values = rng.integers(100, 60000, (20, 30), dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    header = read_image_header(data)
    assert (header.bits, header.channels, header.decoded_bytes) == (16, 1, 20 * 30 * 2)
    lo, hi = values.min(), values.max()
    expected = np.clip(np.rint((values.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data)[:, :, 0], expected)
    assert to_rgb_uint8(Image.new("I;16", (4, 4), 7)).max() == 0  # a constant image is black, as before


def test_progressive_jpeg_with_10000_scans_is_refused_from_its_header():
    bomb = _scan_bomb(10_000)
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=rf"bomb.jpg is a 64x64 8-bit RGB JPEG, 10000 scans: .* the limit is "
                                               rf"{MAX_JPEG_SCANS} scans"):
        decode_image(bomb, name="bomb.jpg")
    print(f"10,000-scan JPEG ({len(bomb)} bytes) refused in {1000 * (time.perf_counter() - start):.2f} ms")
    assert read_image_header(_scan_bomb(MAX_JPEG_SCANS)).scans == MAX_JPEG_SCANS
    decode_image(_scan_bomb(MAX_JPEG_SCANS))  # at the limit: decoded


def test_scans_times_pixels_is_bounded_at_the_pixel_limit():
    at_limit = 64 * 64 * 4  # the image is a quarter of max_pixels: 4 x MAX_SCAN_PASSES scans are within budget
    decode_image(_scan_bomb(4 * MAX_SCAN_PASSES), max_pixels=at_limit)
    with pytest.raises(ImageDecodeError, match=rf"{4 * MAX_SCAN_PASSES + 1} passes over 4096 pixels exceed the "
                                               rf"decoding budget of {MAX_SCAN_PASSES} passes over {at_limit}"):
        decode_image(_scan_bomb(4 * MAX_SCAN_PASSES + 1), max_pixels=at_limit)


def test_16_bit_png_is_priced_by_its_decoded_bytes():
    data = _png_header_only(4096, 2048, bits=16, colour=6)  # 16-bit RGBA: 8 bytes a pixel
    header = read_image_header(data)
    assert header.pixels == 4096 * 2048 and header.decoded_bytes == 4096 * 2048 * 8
    with pytest.raises(ImageDecodeError, match=r"x.png is a 4096x2048 16-bit RGBA PNG, 67108864 bytes once decoded; "
                                               r"the limit is 33554432 bytes"):
        decode_image(data, max_pixels=8 << 20, name="x.png")
    grey = _encode(Image.fromarray(np.zeros((2048, 4096), np.uint16)), "PNG")  # 16-bit grey: 2 bytes a pixel
    assert read_image_header(grey).decoded_bytes == 4096 * 2048 * 2
    with pytest.raises(ImageDecodeError, match="16777216 bytes once decoded; the limit is 16000000 bytes"):
        decode_image(grey, max_pixels=8 << 20, max_decoded_bytes=16_000_000)


def test_ico_whose_directory_hides_a_large_png_is_refused_without_decoding():
    png = _png_header_only(9000, 9000)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # 0 = 256 in an ICO directory
    ico = struct.pack("<HHH", 0, 1, 1) + entry + png
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"icon.ico is an ICO whose entry 1 says 256x256 but holds a "
                                               r"9000x9000 8-bit RGB ICO; refused without decoding it"):
        decode_image(ico, name="icon.ico")
    print(f"ICO holding a 9000x9000 PNG refused in {1000 * (time.perf_counter() - start):.2f} ms")


def test_headers_over_the_pixel_limit_are_refused_before_decoding():
    for data in (_png_header_only(20000, 20000), _png_header_only(1, 70_000_000)):
        with pytest.raises(ImageDecodeError, match=r"pixels(, a decompression bomb)?; the limit is 64000000"):
            decode_image(data)


def test_frames_and_pages_are_counted_and_bounded():
    frames = [_photo(seed=i) for i in range(5)]
    for fmt in ("GIF", "TIFF", "WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        assert read_image_header(data).frames == 5, fmt
        with pytest.raises(ImageDecodeError, match="with more than 4 frames"):
            decode_image(data, max_frames=4)
        assert decode_image(data).shape == (32, 48, 3)  # the first frame


def test_unknown_formats_are_refused_without_trying_every_plugin():
    ppm = b"P6\n4 4\n255\n" + b"\0" * 48  # Pillow would decode it; the decoder prices only its own formats
    with pytest.raises(ImageDecodeError, match=r"not a recognised image format\); expected a complete JPEG, PNG"):
        decode_image(ppm)
    with pytest.raises(ImageDecodeError, match="is cut short"):
        decode_image(b"\x89PNG\r\n\x1a\n\0\0")


def test_read_image_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="is not a regular file"):
        read_image("/dev/zero")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nothing.png")


def test_headers_made_of_millions_of_tiny_chunks_are_refused():
    from agmm_deploy.decode import MAX_HEADER_STEPS

    png = _png_header_only(8, 8)
    ihdr_end = 8 + 25
    many = png[:ihdr_end] + _chunk(b"tEXt", b"") * (MAX_HEADER_STEPS + 1) + png[ihdr_end:]
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=f"is a PNG of more than {MAX_HEADER_STEPS} chunks before its image"):
        read_image_header(many)
    # an 8x8 GIF: screen, no colour table, one image descriptor, its LZW code size, then 2-byte sub-blocks
    screen = b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0, 0, 0)
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, 8, 8, 0) + b"\x02"
    data = screen + descriptor + b"\x01\x00" * (MAX_HEADER_STEPS + 1) + b"\x00\x3b"
    with pytest.raises(ImageDecodeError, match=f"is a GIF of more than {MAX_HEADER_STEPS} blocks"):
        read_image_header(data)
    print(f"a PNG of {MAX_HEADER_STEPS + 1} chunks and a GIF of as many sub-blocks refused in "
          f"{time.perf_counter() - start:.2f} s")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_the_header_gives_the_size_as_decoded_after_the_exif_orientation(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: the service prices its tiles on the upright size
    data = _encode(_photo((48, 32)), fmt, exif=exif)
    header = read_image_header(data)
    assert header.orientation == 6 and header.upright_size == (32, 48)
    assert decode_image(data).shape == (48, 32, 3)
    assert read_image_header(_encode(_photo((48, 32)), fmt)).upright_size == (48, 32)


def test_a_request_is_priced_as_a_whole_before_any_image_is_decoded():
    from agmm_deploy.transforms import check_budget

    grey = _encode(Image.fromarray(np.zeros((2048, 4096), np.uint16)), "PNG")  # 19 KB, 16.8 MB decoded
    headers = [(f"image {i}", read_image_header(grey)) for i in range(16)]
    check_budget(headers[:4], max_pixels=64 << 20, max_decoded_bytes=80 << 20)
    with pytest.raises(ImageDecodeError, match=r"the request holds 16 image\(s\) of 134217728 pixels and 268435456 "
                                               r"decoded bytes together; the budget is 67108864 pixels"):
        check_budget(headers, max_pixels=64 << 20, max_decoded_bytes=80 << 20)
