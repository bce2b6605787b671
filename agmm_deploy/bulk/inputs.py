"""What a bulk run reads: image files, folders (recursive) and manifests, each image with its output key.

The key is the image's path relative to the INPUT it came from, without its suffix, so that outputs mirror the
input tree: ``photos/2024/a.jpg`` given as the folder ``photos`` is ``2024/a`` and is written to
``OUT/2024/a.png``. Same stems in different folders are different keys; two inputs with the same key (``a.jpg``
beside ``a.png``) are refused before any work.

An input may also be a URI of a file system pyarrow reads (``s3://bucket/photos``, ``gs://...``, ``hdfs://...``,
``file:///data/photos``; credentials as pyarrow takes them, e.g. ``AWS_ACCESS_KEY_ID`` in the environment, and
options such as ``?endpoint_override=host:9000&scheme=http`` for an S3-compatible store): a folder URI is listed
recursively, and manifests may list URIs. Outputs are written under a local or mounted OUT.

    inputs = collect_inputs(["photos", "one.jpg", "list.txt"])
    image = read_input(inputs[0].path, max_pixels=64_000_000)
"""

from __future__ import annotations

import functools
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import numpy as np

from agmm_deploy.constants import IMAGE_SUFFIXES
from agmm_deploy.transforms import DEFAULT_MAX_PIXELS, decode_image

# A manifest lists image paths: one a line (.txt), or a column named "path" (.csv, .parquet). Relative entries
# are relative to the manifest's folder.
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_COLUMN = "path"
# Kernel file systems: their files say they are regular but read as process memory (/proc/self/mem), endless
# streams or devices. Refused by where the path really leads, symlinks followed.
SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
# Bytes read from one image file at most; a larger file is refused unread (the largest image the pixel limit
# admits is far smaller as a JPEG or PNG).
MAX_FILE_BYTES = 1 << 30


class InputError(ValueError):
    """The inputs cannot make a run: nothing found, a missing file or manifest, or two inputs with one key."""


class InputSkipped(OSError):
    """An input that could not be read at all (not a regular file, a kernel file, no permission)."""


@dataclass(frozen=True)
class Input:
    """One image to predict.

    Attributes:
        path: where to read it.
        key: its output path under OUT, relative and without suffix (posix separators), e.g. ``2024/a``.
    """

    path: str
    key: str


def collect_inputs(items: list[str | Path]) -> list[Input]:
    """The images of ``items`` (files, folders searched recursively, manifests), in order, each with its key.

    Raises:
        InputError: an item that does not exist, a manifest without paths, no images at all, or two inputs
            whose outputs would be the same file.
    """
    inputs: list[Input] = []
    for text in map(str, items):
        if is_uri(text):
            inputs += _uri_inputs(text)
            continue
        item = Path(text)
        if item.is_dir():
            inputs += [Input(str(path), _key(path.relative_to(item))) for path in sorted(item.rglob("*"))
                       if path.suffix.lower() in IMAGE_SUFFIXES and not _hidden(path.relative_to(item))]
        elif item.suffix.lower() in MANIFEST_SUFFIXES:
            inputs += _manifest_inputs(item)
        elif item.exists() or item.is_symlink():
            inputs.append(Input(str(item), _key(Path(item.name))))  # a file given by name: OUT/<stem>.png
        else:
            raise InputError(f"input {item} does not exist; expected an image file, a folder of images or a "
                             f"manifest ({', '.join(MANIFEST_SUFFIXES)})")
    if not inputs:
        raise InputError(f"no images in {', '.join(map(str, items))}; expected files ending in "
                         f"{', '.join(IMAGE_SUFFIXES)}, folders of them or a manifest listing them")
    by_key: dict[str, list[str]] = {}
    for entry in inputs:
        by_key.setdefault(entry.key, []).append(entry.path)
    clashes = [" and ".join(paths) for paths in by_key.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise InputError(f"{shown} would write the same output file; give them separate --out folders, rename "
                         "them, or give their parent folder so that the outputs mirror the tree")
    return inputs


def read_manifest_paths(path: Path) -> list[str]:
    """The paths a manifest lists, as written (blank lines and ``#`` comments of a .txt skipped)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    else:
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    if MANIFEST_COLUMN not in table.column_names:
        raise InputError(f"manifest {path} has the columns {', '.join(table.column_names)}; expected a column "
                         f"named {MANIFEST_COLUMN!r} holding image paths")
    return [str(value) for value in table.column(MANIFEST_COLUMN).to_pylist() if value]


def _manifest_inputs(manifest: Path) -> list[Input]:
    if not manifest.is_file():
        raise InputError(f"manifest {manifest} does not exist; expected a .txt with a path per line, or a .csv "
                         f"or .parquet with a {MANIFEST_COLUMN!r} column")
    folder = manifest.parent.absolute()
    entries = read_manifest_paths(manifest)
    if not entries:
        raise InputError(f"manifest {manifest} lists no paths")
    keys: dict[str, str] = {}
    paths = [Path(os.path.normpath(folder / entry)) for entry in entries if not is_uri(entry)]
    if paths:
        # Keys relative to the manifest's folder, or to the entries' common folder when some lie outside it: a
        # key never climbs out of OUT.
        root = folder if all(p.is_relative_to(folder) for p in paths) else Path(os.path.commonpath(paths))
        if root in paths:  # one entry, or an entry that is the common folder itself
            root = root.parent
        keys.update((str(p), _key(p.relative_to(root))) for p in paths)
    uris = [entry for entry in entries if is_uri(entry)]
    if uris:  # keys relative to the URIs' common folder (bucket and path), as for local paths outside the folder
        located = [PurePosixPath(_location(uri)) for uri in uris]
        root = PurePosixPath(posixpath.commonpath([str(p) for p in located]))
        if root in located:
            root = root.parent
        keys.update((uri, _key(p.relative_to(root))) for uri, p in zip(uris, located))
    ordered = [entry if is_uri(entry) else str(Path(os.path.normpath(folder / entry))) for entry in entries]
    return [Input(path, keys[path]) for path in ordered]


def is_uri(text: str) -> bool:
    return "://" in text


def _location(uri: str) -> str:
    """Bucket (or host) and path of a URI, without scheme, credentials or options: what keys derive from."""
    parts = urlsplit(uri)
    return parts.netloc.rsplit("@", 1)[-1] + parts.path


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str, query: str):
    """(pyarrow FileSystem, whether its paths start with the URI's host) for URIs of one scheme, host and options.

    One file system per bucket and options, not per image: building an S3 one may ask the network for its region.
    """
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    host = netloc.rsplit("@", 1)[-1]
    return fs, bool(host) and path.lstrip("/").startswith(host)


def open_uri(uri: str):
    """(pyarrow FileSystem, its path for ``uri``).

    Raises:
        ValueError, OSError: pyarrow cannot make a file system of the URI (unknown scheme, bad options).
    """
    parts = urlsplit(uri)
    fs, with_host = _filesystem(parts.scheme, parts.netloc, parts.query)
    return fs, (_location(uri) if with_host else parts.path)


def _uri_inputs(uri: str) -> list[Input]:
    """The images of a file or folder URI (folders listed recursively), keys relative to it."""
    import pyarrow.fs as pafs

    try:
        fs, root = open_uri(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        else:
            listed = []
    except (OSError, ValueError) as err:
        raise InputError(f"{uri} could not be read as a URI ({err}); expected one pyarrow's file systems read "
                         "(s3://bucket/folder, gs://bucket/folder, hdfs://host/path, file:///path), with its "
                         "credentials where pyarrow finds them (for S3, AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY)") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist; expected an image file or a folder of images there")
    if info.type != pafs.FileType.Directory:
        return [Input(uri, _key(PurePosixPath(PurePosixPath(root).name)))]
    parts = urlsplit(uri)
    base = uri.split("?", 1)[0].rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    inputs = []
    for entry in sorted(listed, key=lambda e: e.path):
        relative = PurePosixPath(entry.path).relative_to(PurePosixPath(root))
        if entry.type == pafs.FileType.File and relative.suffix.lower() in IMAGE_SUFFIXES and not _hidden(relative):
            inputs.append(Input(f"{base}/{relative.as_posix()}{query}", _key(relative)))
    return inputs


def _key(relative: Path | PurePosixPath) -> str:
    return relative.with_suffix("").as_posix()


def _hidden(relative: Path | PurePosixPath) -> bool:
    """Dot files and folders (e.g. the temporary files of a run writing into the same tree)."""
    return any(part.startswith(".") for part in relative.parts)


def read_input(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image at ``path`` as uint8 RGB (H, W, 3), through the project's bounded decoder.

    Raises:
        InputSkipped: not a regular file, a file of /proc, /sys or /dev (symlinks followed), or unreadable.
        ImageDecodeError: not a decodable image, or over ``max_pixels`` (see transforms.decode_image).
    """
    if is_uri(path):
        parts = urlsplit(path)
        if parts.scheme != "file":
            return decode_image(_read_uri(path), max_pixels=max_pixels, name=path)
        real = os.path.realpath(unquote(parts.path))  # file:// is this machine: the same checks as a path
    else:
        real = os.path.realpath(path)
    if any(real == root or real.startswith(root + os.sep) for root in SPECIAL_ROOTS):
        raise InputSkipped(f"{path} leads to {real}, a kernel file, not an image; it was not read")
    try:
        info = os.stat(real)  # before opening: opening a FIFO would block
        if not stat.S_ISREG(info.st_mode):
            raise InputSkipped(f"{path} is not a regular file (a folder, device or pipe); it was not read")
        if info.st_size > MAX_FILE_BYTES:
            raise InputSkipped(f"{path} is {info.st_size} bytes; image files over {MAX_FILE_BYTES} bytes are "
                               "not read")
        with open(real, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except InputSkipped:
        raise
    except OSError as err:  # permission denied, an I/O error, a file gone since it was listed
        raise InputSkipped(f"{path} could not be read ({err.strerror or err}); it was skipped") from None
    return decode_image(data, max_pixels=max_pixels, name=path)


def _read_uri(uri: str) -> bytes:
    """The bytes of the file at ``uri`` (at most MAX_FILE_BYTES), or InputSkipped saying why not.

    One request per image (opened and read; no separate stat first): on an object store each costs a round trip.
    """
    try:
        fs, path = open_uri(uri)
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputSkipped(f"{uri} does not exist (any more); it was skipped") from None
    except (OSError, ValueError) as err:  # a folder, no permission, a network error, a bucket gone
        raise InputSkipped(f"{uri} could not be read ({err}); it was skipped") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputSkipped(f"{uri} is over {MAX_FILE_BYTES} bytes; image files that large are not read")
    return data
