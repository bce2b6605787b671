"""The bounded image decoder: each format's header is read and priced with the bytes in hand, before any pixel.

=========  ======================================================  =========================================
format     what the header gives                                   refused before decoding when over
=========  ======================================================  =========================================
PNG        IHDR size, bit depth, colour type; APNG frames; eXIf    pixels, decoded bytes (16 bits count 2 B)
JPEG       SOF size, components, precision; SOS scans; EXIF        pixels, bytes, scans, scans x pixels
GIF        screen size, every frame's extent, frame count          pixels, bytes, frames
TIFF       first IFD's size, samples, bits, compression; pages     pixels, bytes, pages; unknown compression
WebP       VP8 / VP8L / VP8X canvas size, ANMF frames, EXIF        pixels, bytes, frames
BMP        DIB size and bits per pixel                             pixels, bytes
ICO / CUR  every directory entry and its embedded PNG/BMP header   any entry's limits; an embedded image
                                                                   other than its directory entry says
=========  ======================================================  =========================================

Anything else is refused without being shown to Pillow, and Pillow then opens only the format the header named
(``Image.open(formats=[...])``), so no other plugin parses the bytes. Decoding time is bounded by the pricing, not
by a timer: an accepted image costs at most MAX_SCAN_PASSES passes over max_pixels pixels
(benchmarks/decode_bombs.py measures the bombs and the slowest accepted image).

    header = read_image_header(data)          # ImageHeader(format, width, height, mode, bits, frames, ...)
    check_budget([(name, header), ...], max_pixels=..., max_decoded_bytes=...)   # a whole request at once
    image = decode_image(data, max_pixels=8 << 20, name="photo.jpg")   # uint8 RGB (H, W, 3)
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow's own bomb guard (about 89 Mpx) stays on; callers may pass a tighter max_pixels.
DEFAULT_MAX_PIXELS = 64_000_000
# A progressive JPEG is refined scan by scan, and each scan costs a pass over every pixel: libjpeg's own
# progressive script writes 10 scans (6 for grey), and no encoder we know writes more than a few dozen.
MAX_JPEG_SCANS = 100
# And scans x pixels is the decoding work: at most this many passes over an image of max_pixels pixels (a
# progressive JPEG at the pixel limit may have 16 scans, one of a quarter of it 64). The time of the slowest
# accepted 8 Mpx JPEG (16 scans), with its machine: docs/benchmarks.md, "Decoder bombs".
MAX_SCAN_PASSES = 16
# Only the first frame (page) is decoded, but a file of thousands is no photo and its walk costs time.
DEFAULT_MAX_FRAMES = 1000
# Bytes of decoded samples allowed per pixel of max_pixels when no max_decoded_bytes is given: an 8-bit RGBA
# image at the pixel limit; a 16-bit one is refused at half the pixels.
DEFAULT_BYTES_PER_PIXEL = 4

# The header walks are Python loops over chunks, segments or blocks (about 1 us each): a file made of millions
# of tiny ones (a PNG of a million tEXt chunks, a GIF of 2-byte sub-blocks) is refused at this many, where a
# real image has tens (a 10 MB animated GIF ~40,000 sub-blocks).
MAX_HEADER_STEPS = 200_000

_FORMAT_NAMES = "JPEG, PNG, WebP, TIFF, BMP, GIF or ICO"


class ImageDecodeError(ValueError):
    """The bytes or file are not a decodable image, or the image is larger than allowed."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel.

    Attributes:
        format: Pillow's name of the format (PNG, JPEG, GIF, TIFF, WEBP, BMP, ICO, CUR).
        width, height: the largest frame (entry, page) the decoder may produce, as stored (before EXIF rotation).
        mode: what the samples are, e.g. "RGB", "L", "RGBA", "P", "CMYK".
        bits: bits per sample (16 for a 16-bit PNG).
        channels: samples per pixel.
        frames: frames, pages or icon entries in the file (only the first one is decoded).
        scans: JPEG scans (1 for a baseline JPEG, about 10 for a progressive one); 1 for other formats.
        orientation: the EXIF orientation (1 = none; 5-8 turn the image by 90 degrees when it is decoded).
    """

    format: str
    width: int
    height: int
    mode: str
    bits: int
    channels: int
    frames: int = 1
    scans: int = 1
    orientation: int = 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) as decode_image returns it: after the EXIF orientation (what tiles are priced on)."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """The bytes of the decoded samples of one frame at the file's depth: width x height x channels x bytes
        per sample (a 16-bit 4096x2048 grey PNG: 16.8 MB, whatever its file size)."""
        return self.pixels * self.channels * max(1, (self.bits + 7) // 8)

    def describe(self) -> str:
        frames = f", {self.frames} frames" if self.frames > 1 else ""
        scans = f", {self.scans} scans" if self.scans > 1 else ""
        return f"a {self.width}x{self.height} {self.bits}-bit {self.mode} {self.format}{frames}{scans}"


# ------------------------------------------------------------------------------------------ header readers


def _steps(name: str, fmt: str, what: str) -> ImageDecodeError:
    return ImageDecodeError(f"{name} is a {fmt} of more than {MAX_HEADER_STEPS} {what}, where an image has tens; "
                            "refused before decoding. Re-save it with an ordinary encoder")


def _short(data: bytes, name: str, what: str) -> ImageDecodeError:
    return ImageDecodeError(f"{name} could not be decoded as an image (its {what} is cut short); expected a "
                            f"complete {_FORMAT_NAMES} file")


def _exif_orientation(exif: bytes) -> int:
    """The orientation tag (0x0112) of an EXIF block (a TIFF header and IFD0); 1 where absent or unreadable."""
    exif = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    try:
        offset = struct.unpack(order + "I", exif[4:8])[0]
        count = struct.unpack(order + "H", exif[offset:offset + 2])[0]
        for i in range(min(count, 1000)):
            entry = offset + 2 + 12 * i
            tag, kind = struct.unpack(order + "HH", exif[entry:entry + 4])
            if tag == 0x0112 and kind == 3:
                value = struct.unpack(order + "H", exif[entry + 8:entry + 10])[0]
                return value if 1 <= value <= 8 else 1
    except (struct.error, TypeError):  # TypeError: no byte-order mark (order is None)
        pass
    return 1


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# colour type -> (mode, channels)
_PNG_COLOURS = {0: ("L", 1), 2: ("RGB", 3), 3: ("P", 1), 4: ("LA", 2), 6: ("RGBA", 4)}


def _png_header(data: bytes, name: str, offset: int = 0, fmt: str = "PNG") -> ImageHeader:
    start = offset + 8
    if len(data) < start + 25 or data[start + 4:start + 8] != b"IHDR":
        raise _short(data, name, "PNG IHDR chunk")
    width, height, bits, colour = struct.unpack(">IIBB", data[start + 8:start + 18])
    if colour not in _PNG_COLOURS or bits not in (1, 2, 4, 8, 16):
        raise ImageDecodeError(f"{name} has a PNG header with colour type {colour} and bit depth {bits}, which "
                               "no valid PNG has; expected a complete PNG file")
    mode, channels = _PNG_COLOURS[colour]
    frames, pos, steps, orientation = 1, start, 0, 1
    # APNG: the frame count is in an acTL chunk before the first IDAT; the EXIF orientation in eXIf.
    while pos + 8 <= len(data):
        steps += 1
        if steps > MAX_HEADER_STEPS:
            raise _steps(name, fmt, "chunks before its image data")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            break
        if kind == b"acTL" and pos + 12 <= len(data):
            frames = max(1, struct.unpack(">I", data[pos + 8:pos + 12])[0])
        if kind == b"eXIf":
            orientation = _exif_orientation(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return ImageHeader(fmt, width, height, mode, bits, channels, frames, orientation=orientation)


# JPEG start-of-frame markers (C0-CF but DHT C4, JPG C8, DAC CC), and markers without a length.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


def _jpeg_header(data: bytes, name: str) -> ImageHeader:
    pos, sof, steps, orientation = 2, None, 0, 1
    while True:
        steps += 1
        if steps > MAX_HEADER_STEPS:
            raise _steps(name, "JPEG", "segments before its first scan")
        while pos < len(data) and data[pos] != 0xFF:
            pos += 1  # garbage between segments, which libjpeg skips too
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= len(data):
            raise _short(data, name, "JPEG header")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD9 or pos + 2 > len(data):
            raise _short(data, name, "JPEG header")
        length = struct.unpack(">H", data[pos:pos + 2])[0]
        if marker == 0xE1 and data[pos + 2:pos + 8] == b"Exif\0\0" and orientation == 1:
            orientation = _exif_orientation(data[pos + 2:pos + length])
        if marker in _SOF:
            if pos + 8 > len(data):
                raise _short(data, name, "JPEG frame header")
            bits, height, width, components = struct.unpack(">BHHB", data[pos + 2:pos + 8])
            sof = (bits, height, width, components)
        if marker == 0xDA:  # the first scan: everything the decoder needs to size its buffers is known
            break
        pos += length
    if sof is None:
        raise ImageDecodeError(f"{name} is a JPEG without a frame header before its first scan; expected a "
                               "complete JPEG file")
    bits, height, width, components = sof
    if height == 0:
        raise ImageDecodeError(f"{name} is a JPEG whose height is given after its data (a DNL marker), which this "
                               "decoder does not price; re-save it with an ordinary encoder")
    # Every scan starts with FFDA, and entropy-coded data never holds FF followed by anything but 00 or a restart
    # marker, so counting FFDA is exact (plus one per embedded thumbnail) and costs no decoding.
    scans = 1 + data.count(b"\xff\xda", pos)
    mode = {1: "L", 3: "RGB", 4: "CMYK"}.get(components, f"{components}-component")
    return ImageHeader("JPEG", width, height, mode, bits, components, 1, scans, orientation)


def _gif_header(data: bytes, name: str) -> ImageHeader:
    if len(data) < 13:
        raise _short(data, name, "GIF header")
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames, steps = 0, 0
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor: the frame may reach past the screen, Pillow grows the image then
            if pos + 10 > len(data):
                break
            left, top, w, h, local = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            width, height = max(width, left + w), max(height, top + h)
            frames += 1
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW minimum code size
        else:
            break  # garbage after the frames: Pillow stops there too
        while pos < len(data) and data[pos]:  # sub-blocks until the empty one
            pos += 1 + data[pos]
            steps += 1
            if steps > MAX_HEADER_STEPS:
                raise _steps(name, "GIF", "blocks")
        pos += 1
        if frames > DEFAULT_MAX_FRAMES:
            frames += 1  # enough to refuse; the rest is not walked
            break
    return ImageHeader("GIF", width, height, "P", 8, 1, max(frames, 1))


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}
# Compressions Pillow (libtiff) decodes in time proportional to the pixels: none, LZW, JPEG, deflate, PackBits.
_TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "deflate", 32773: "PackBits", 32946: "deflate"}


def _tiff_header(data: bytes, name: str) -> ImageHeader:
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise _short(data, name, "TIFF header")
    if struct.unpack(order + "H", data[2:4])[0] == 43:
        raise ImageDecodeError(f"{name} is a BigTIFF, which this decoder does not read; save it as an ordinary "
                               "TIFF, PNG or JPEG")
    offset = struct.unpack(order + "I", data[4:8])[0]
    tags, pages, seen = {}, 0, set()
    while offset and offset not in seen and pages <= DEFAULT_MAX_FRAMES:
        seen.add(offset)
        if offset + 2 > len(data):
            raise _short(data, name, "TIFF directory")
        count = struct.unpack(order + "H", data[offset:offset + 2])[0]
        end = offset + 2 + 12 * count
        if end + 4 > len(data):
            raise _short(data, name, "TIFF directory")
        if pages == 0:
            for i in range(count):
                tag, kind, n = struct.unpack(order + "HHI", data[offset + 2 + 12 * i:offset + 10 + 12 * i])
                if kind in _TIFF_TYPES:
                    code, size = _TIFF_TYPES[kind]
                    field = offset + 10 + 12 * i
                    if n * size > 4:  # the values live elsewhere; the first one is enough here
                        field = struct.unpack(order + "I", data[field:field + 4])[0]
                    if field + size <= len(data):
                        tags[tag] = struct.unpack(order + code, data[field:field + size])[0]
        pages += 1
        offset = struct.unpack(order + "I", data[end:end + 4])[0]
    width, height = tags.get(256, 0), tags.get(257, 0)
    channels, bits = tags.get(277, 1), tags.get(258, 1)
    compression = tags.get(259, 1)
    if compression not in _TIFF_COMPRESSIONS:
        raise ImageDecodeError(f"{name} is a TIFF with compression {compression}; this decoder reads "
                               f"{', '.join(sorted(set(_TIFF_COMPRESSIONS.values())))} TIFFs. Save it as one of "
                               "those, a PNG or a JPEG")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}-sample")
    scans = 1
    if compression == 7:  # JPEG strips or tiles: a progressive one may hide many scans (an upper bound)
        scans = max(1, data.count(b"\xff\xda"))
    orientation = tags.get(274, 1) if 1 <= tags.get(274, 1) <= 8 else 1
    return ImageHeader("TIFF", width, height, mode, bits, channels, max(pages, 1), scans, orientation)


def _webp_header(data: bytes, name: str) -> ImageHeader:
    pos, width, height, frames, alpha, steps, orientation = 12, 0, 0, 0, False, 0, 1
    while pos + 8 <= len(data):
        steps += 1
        if steps > MAX_HEADER_STEPS:
            raise _steps(name, "WebP", "chunks")
        kind, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"VP8X" and len(body) >= 10:
            alpha = bool(body[0] & 0x10)
            width = 1 + int.from_bytes(body[4:7], "little")
            height = 1 + int.from_bytes(body[7:10], "little")
        elif kind == b"EXIF":
            orientation = _exif_orientation(body)
        elif kind == b"ANMF":
            frames += 1
            if frames > DEFAULT_MAX_FRAMES:
                frames += 1
                break
        elif kind == b"VP8 " and len(body) >= 10 and not width:
            width, height = (v & 0x3FFF for v in struct.unpack("<HH", body[6:10]))
        elif kind == b"VP8L" and len(body) >= 5 and not width:
            bits = int.from_bytes(body[1:5], "little")
            width, height, alpha = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), bool(bits >> 28 & 1)
        pos += 8 + length + (length & 1)
    if not width:
        raise _short(data, name, "WebP header")
    channels = 4 if alpha else 3
    return ImageHeader("WEBP", width, height, "RGBA" if alpha else "RGB", 8, channels, max(frames, 1),
                       orientation=orientation)


def _dib_header(data: bytes, offset: int, name: str, fmt: str, icon: bool = False) -> ImageHeader:
    if offset + 16 > len(data):
        raise _short(data, name, f"{fmt} bitmap header")
    size = struct.unpack("<I", data[offset:offset + 4])[0]
    if size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bpp = struct.unpack("<HHHH", data[offset + 4:offset + 12])
    else:
        width, height, _, bpp = struct.unpack("<iiHH", data[offset + 4:offset + 16])
    height = abs(height) // (2 if icon else 1)  # an icon's bitmap holds its AND mask below the colours
    channels = 4 if bpp == 32 else 3 if bpp > 8 else 1
    mode = {4: "RGBA", 3: "RGB"}.get(channels, "P")
    return ImageHeader(fmt, abs(width), height, mode, 8, channels)


def _bmp_header(data: bytes, name: str) -> ImageHeader:
    return _dib_header(data, 14, name, "BMP")


def _ico_header(data: bytes, name: str) -> ImageHeader:
    fmt = "ICO" if data[2] == 1 else "CUR"
    count = struct.unpack("<H", data[4:6])[0]
    if count == 0 or 6 + 16 * count > len(data):
        raise _short(data, name, f"{fmt} directory")
    entries = []
    for i in range(count):
        entry = data[6 + 16 * i:22 + 16 * i]
        width, height = entry[0] or 256, entry[1] or 256
        offset = struct.unpack("<I", entry[12:16])[0]
        # Pillow decodes the embedded image inside Image.open, so its own header is priced too.
        if data[offset:offset + 8] == _PNG_MAGIC:
            inner = _png_header(data, name, offset, fmt)
        else:
            inner = _dib_header(data, offset, name, fmt, icon=True)
        if (inner.width, inner.height) != (width, height):
            raise ImageDecodeError(f"{name} is an {fmt} whose entry {i + 1} says {width}x{height} but holds "
                                   f"{inner.describe()}; refused without decoding it (a well-formed icon's "
                                   "entries agree with their images)")
        entries.append(inner)
    largest = max(entries, key=lambda h: (h.pixels, h.decoded_bytes))
    return ImageHeader(fmt, largest.width, largest.height, largest.mode, largest.bits, largest.channels, count)


# (magic test, reader, Pillow format names the reader vouches for): the decoder's table of formats.
_READERS = (
    (lambda d: d[:8] == _PNG_MAGIC, _png_header, ("PNG",)),
    (lambda d: d[:3] == b"\xff\xd8\xff", _jpeg_header, ("JPEG",)),  # Pillow turns a multi-picture one into MPO
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif_header, ("GIF",)),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff_header, ("TIFF",)),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp_header, ("WEBP",)),
    (lambda d: d[:2] == b"BM", _bmp_header, ("BMP",)),
    (lambda d: d[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"), _ico_header, ("ICO", "CUR")),
)


def read_image_header(data: bytes, name: str = "image") -> ImageHeader:
    """Reads the header of JPEG/PNG/WebP/TIFF/BMP/GIF/ICO bytes without decoding any pixel (microseconds to a
    few ms: the cost to price a request before it is decoded).

    Raises:
        ImageDecodeError: empty bytes, an unknown format, or a header cut short or inconsistent.
    """
    if not data:
        raise ImageDecodeError(f"{name} is empty; expected the bytes of a {_FORMAT_NAMES} image")
    for accepts, reader, _ in _READERS:
        if accepts(data):
            try:
                return reader(data, name)
            except struct.error:
                raise _short(data, name, "header") from None
    raise ImageDecodeError(f"{name} could not be decoded as an image (not a recognised image format); expected a "
                           f"complete {_FORMAT_NAMES} file")


def check_image_header(header: ImageHeader, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_decoded_bytes: int | None = None, max_frames: int = DEFAULT_MAX_FRAMES) -> None:
    """Refuses an image whose header is over a limit, with a sentence naming the image, what it is and the limit.

    Args:
        max_decoded_bytes: bytes of decoded samples allowed (default: DEFAULT_BYTES_PER_PIXEL * max_pixels).
    """
    what = f"{name} is {header.describe()}"
    if header.width < 1 or header.height < 1:
        raise ImageDecodeError(f"{what}: an image without pixels; expected a complete {_FORMAT_NAMES} file")
    if header.pixels > max_pixels:
        # Beyond twice Pillow's own guard, as Pillow would call it: a decompression bomb.
        bomb = ", a decompression bomb" if header.pixels > 2 * (Image.MAX_IMAGE_PIXELS or header.pixels) else ""
        raise ImageDecodeError(f"{name} is {header.width}x{header.height} = {header.pixels} pixels{bomb}; the limit "
                               f"is {max_pixels}. Downscale it before sending.")
    limit = DEFAULT_BYTES_PER_PIXEL * max_pixels if max_decoded_bytes is None else max_decoded_bytes
    if header.decoded_bytes > limit:
        raise ImageDecodeError(f"{what}, {header.decoded_bytes} bytes once decoded; the limit is {limit} bytes. "
                               "Save it with 8 bits per sample or downscale it.")
    if header.frames > max_frames:
        raise ImageDecodeError(f"{what} with more than {max_frames} frames (or pages), the limit; only the first "
                               "is segmented: send it as a single image")
    if header.scans > MAX_JPEG_SCANS:
        raise ImageDecodeError(f"{what}: each scan costs a pass over every pixel, and the limit is "
                               f"{MAX_JPEG_SCANS} scans (an encoder writes about 10). Re-save it as a baseline or "
                               "ordinary progressive JPEG")
    if header.scans * header.pixels > MAX_SCAN_PASSES * max_pixels:
        raise ImageDecodeError(f"{what}: {header.scans} passes over {header.pixels} pixels exceed the decoding "
                               f"budget of {MAX_SCAN_PASSES} passes over {max_pixels} pixels (the pixel limit). "
                               "Re-save it as a baseline JPEG or downscale it")


def check_budget(headers: list[tuple[str, ImageHeader]], max_pixels: int, max_decoded_bytes: int,
                 what: str = "the request") -> None:
    """Refuses a group of images (a request, a batch) whose pixels or decoded bytes together exceed a budget.

    Args:
        headers: (name, header) of each image, from read_image_header, before any is decoded.
        max_pixels, max_decoded_bytes: the budget of the whole group.
    """
    pixels = sum(h.pixels for _, h in headers)
    decoded = sum(h.decoded_bytes for _, h in headers)
    if pixels > max_pixels or decoded > max_decoded_bytes:
        largest = max(headers, key=lambda item: item[1].decoded_bytes)
        raise ImageDecodeError(f"{what} holds {len(headers)} image(s) of {pixels} pixels and {decoded} decoded bytes "
                               f"together; the budget is {max_pixels} pixels and {max_decoded_bytes} bytes (the "
                               f"largest, {largest[0]}, is {largest[1].describe()}). Send fewer or smaller images")


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image (RGB, RGBA, L, LA, P, I;16, I, F, CMYK) as uint8 RGB (H, W, 3), EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L"):
        # 16-bit: the full value range to 0..255 (what a viewer shows), through a 65536-entry table so that no
        # float copy of the image is made (one was 8 bytes a pixel: 4.5 GiB for 16 16-bit 4096x2048 images).
        array = np.asarray(image)
        lo, hi = int(array.min()), int(array.max())
        values = np.arange(65536, dtype=np.float64)
        table = np.zeros(65536, np.uint8) if hi <= lo else np.clip(np.rint((values - lo) * (255.0 / (hi - lo))),
                                                                   0, 255).astype(np.uint8)
        gray = table[array]
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        # 32-bit single channel: the same scaling, in float64 (rare: scientific TIFFs).
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        array = np.zeros_like(array) if hi <= lo else (array - lo) * (255.0 / (hi - lo))
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over black, as the network never saw alpha.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image", *,
                 max_decoded_bytes: int | None = None, max_frames: int = DEFAULT_MAX_FRAMES) -> np.ndarray:
    """Decodes JPEG/PNG/WebP/TIFF/BMP/GIF/ICO bytes (the first frame) to uint8 RGB (H, W, 3), after pricing them.

    Raises:
        ImageDecodeError: empty or non-image bytes, truncated data, or an image over a limit (pixels, decoded
            bytes, frames, JPEG scans), checked from the header before any pixel is decoded.
    """
    header = read_image_header(data, name)
    check_image_header(header, name, max_pixels, max_decoded_bytes, max_frames)
    _, _, formats = next(row for row in _READERS if row[0](data))
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            width, height = image.size
            if width * height > header.pixels:  # the decoder sees more than the header said: do not decode it
                raise ImageDecodeError(f"{name} is {header.describe()} by its header, but its decoder reads "
                                       f"{width}x{height}; refused as inconsistent")
            image.load()
            return to_rgb_uint8(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name} was refused as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        raise ImageDecodeError(f"{name} could not be decoded as an image ({err}); expected a complete "
                               f"{_FORMAT_NAMES} file") from err


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, **limits: int | None) -> np.ndarray:
    """Reads an image file as uint8 RGB (H, W, 3) through decode_image (``limits``: max_decoded_bytes, max_frames).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ImageDecodeError: not a regular file (a device, a FIFO: reading one may never end), unreadable, or refused
            by decode_image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    if not path.is_file() or path.stat().st_size == 0 and path.resolve().is_relative_to("/proc"):
        raise ImageDecodeError(f"{path} is not a regular file; expected an image file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"{path} cannot be read ({err.strerror or err})") from None
    return decode_image(data, max_pixels=max_pixels, name=str(path), **limits)
