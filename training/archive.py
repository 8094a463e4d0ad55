"""Safe reading of untrusted zip and tar archives of image folder trees.

An uploaded archive is checked entry by entry BEFORE anything is read or extracted: no absolute
names, no `..` components, no links or device files, no encrypted entries, declared sizes and
entry counts within `ArchiveLimits`, and (zip) no entry whose compression ratio betrays a bomb.
Extraction then writes only regular files under names this module chooses, never the names found
in the archive, and counts the bytes it actually reads against the declared sizes.

Layout: one folder per class, `<class>/<image>`, optionally below one common top-level folder
(`<root>/<class>/<image>`, what zipping a folder gives). Hidden entries and macOS metadata
(`__MACOSX/`, `.DS_Store`) are skipped.
"""

from __future__ import annotations

import logging
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image

from training.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SKIPPED_NAMES = ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")
_ZIP_ENCRYPTED_FLAG = 0x1


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds an archive must respect before anything in it is read."""

    max_entries: int = 200_000
    max_entry_bytes: int = 64 * 1024**2
    max_total_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 250.0
    max_image_pixels: int = 64_000_000


@dataclass(frozen=True)
class ArchiveImage:
    """One image of the tree: its entry name in the archive, its class and its declared size."""

    entry: str
    label: str
    size: int


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or _is_tar(path)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    compressed: int | None
    kind: str  # "file", "dir", "link", "special", "encrypted"


def _zip_entries(archive: zipfile.ZipFile) -> Iterator[_Entry]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.flag_bits & _ZIP_ENCRYPTED_FLAG:
            kind = "encrypted"
        elif stat.S_ISLNK(mode):
            kind = "link"
        elif info.is_dir():
            kind = "dir"
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file
            kind = "special"
        else:
            kind = "file"
        yield _Entry(info.filename, info.file_size, info.compress_size, kind)


def _tar_entries(archive: tarfile.TarFile) -> Iterator[_Entry]:
    for member in archive:
        if member.issym() or member.islnk():
            kind = "link"
        elif member.isdir():
            kind = "dir"
        elif member.isfile():
            kind = "file"
        else:
            kind = "special"
        yield _Entry(member.name, member.size, None, kind)


def _unsafe_name(name: str) -> str | None:
    """Why an entry name is refused, or None when it is a plain relative name."""
    if not name or "\x00" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "a '..' component that points outside the archive"
    return None


def _skipped(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part in _SKIPPED_NAMES for part in parts)


def _check_entry(entry: _Entry, where: str, limits: ArchiveLimits) -> None:
    reason = _unsafe_name(entry.name)
    if reason:
        raise DataError(
            f"{where}: entry {entry.name!r} has {reason}; archives must hold only "
            "relative paths inside the archive"
        )
    if entry.kind == "link":
        raise DataError(
            f"{where}: entry {entry.name!r} is a link; links are refused in uploaded "
            "archives, store the image itself"
        )
    if entry.kind == "special":
        raise DataError(f"{where}: entry {entry.name!r} is not a regular file or folder")
    if entry.kind == "encrypted":
        raise DataError(
            f"{where}: entry {entry.name!r} is encrypted; upload an unencrypted archive"
        )
    if entry.size > limits.max_entry_bytes:
        raise DataError(
            f"{where}: entry {entry.name!r} declares {entry.size} bytes, more than the limit of "
            f"{limits.max_entry_bytes} bytes per image"
        )
    if entry.compressed is not None and entry.size > 1024**2:
        ratio = entry.size / max(entry.compressed, 1)
        if ratio > limits.max_compression_ratio:
            raise DataError(
                f"{where}: entry {entry.name!r} expands {ratio:.0f}-fold when decompressed, more "
                f"than the {limits.max_compression_ratio:.0f}-fold allowed (a zip bomb?)"
            )


def _tree_images(entries: list[_Entry], where: str) -> list[ArchiveImage]:
    """Map image entries to their class folder, refusing anything outside the layout."""
    files = []
    for entry in entries:
        parts = tuple(p for p in PurePosixPath(entry.name.replace("\\", "/")).parts if p != ".")
        if entry.kind == "dir" or not parts or _skipped(parts):
            continue
        files.append((entry, parts))
    if not files:
        raise DataError(f"{where}: the archive holds no images; expected <class>/<image> entries")
    tops = {parts[0] for _, parts in files}
    strip = 1 if len(tops) == 1 and all(len(parts) >= 3 for _, parts in files) else 0
    images = []
    for entry, parts in files:
        parts = parts[strip:]
        if len(parts) != 2:
            raise DataError(
                f"{where}: entry {entry.name!r} is not at <class>/<image>; put each image in "
                "a folder named after its class (one level, optionally inside one top folder)"
            )
        if not parts[1].lower().endswith(IMAGE_SUFFIXES):
            raise DataError(
                f"{where}: entry {entry.name!r} is not an image (expected one of "
                f"{', '.join(IMAGE_SUFFIXES)})"
            )
        images.append(ArchiveImage(entry=entry.name, label=parts[0], size=entry.size))
    return images


class ImageArchive:
    """An opened, checked archive: `images` lists the tree, `read(image)` returns its bytes."""

    def __init__(self, path: Path, limits: ArchiveLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or ArchiveLimits()
        self.where = self.path.name
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            entries = self._open()
            self._check(entries)
            self.images = _tree_images(entries, self.where)
        except BaseException:
            self.close()
            raise
        self._members: dict[str, tarfile.TarInfo] = (
            {m.name: m for m in self._tar.getmembers()} if self._tar else {}
        )

    def _open(self) -> list[_Entry]:
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                return list(_zip_entries(self._zip))
            if _is_tar(self.path):
                self._tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115 (closed by close())
                return self._tar_entries_bounded()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"{self.where}: the archive is damaged ({error})") from None
        raise DataError(f"{self.where}: not a zip or tar archive")

    def _tar_entries_bounded(self) -> list[_Entry]:
        assert self._tar is not None
        entries = []
        for entry in _tar_entries(self._tar):
            entries.append(entry)
            if len(entries) > self.limits.max_entries:
                break
        return entries

    def _check(self, entries: list[_Entry]) -> None:
        if len(entries) > self.limits.max_entries:
            raise DataError(
                f"{self.where}: more than {self.limits.max_entries} entries; split the data set "
                "into smaller archives"
            )
        total = 0
        for entry in entries:
            _check_entry(entry, self.where, self.limits)
            total += entry.size
        if total > self.limits.max_total_bytes:
            raise DataError(
                f"{self.where}: the entries declare {total} bytes in all, more than the limit of "
                f"{self.limits.max_total_bytes} bytes"
            )

    def read(self, image: ArchiveImage) -> bytes:
        """The entry's bytes, never more than it declared."""
        stream: IO[bytes] | None
        if self._zip is not None:
            stream = self._zip.open(image.entry)
        else:
            assert self._tar is not None
            stream = self._tar.extractfile(self._members[image.entry])
        if stream is None:
            raise DataError(f"{self.where}: entry {image.entry!r} cannot be read")
        with stream:
            data = stream.read(image.size + 1)
        if len(data) != image.size:
            raise DataError(
                f"{self.where}: entry {image.entry!r} holds {len(data)} bytes but declares "
                f"{image.size}; the archive is damaged or forged"
            )
        return data

    def verify(self, image: ArchiveImage, data: bytes) -> None:
        """Refuse bytes that do not decode as an image of a sane size."""
        check_image_bytes(data, f"{self.where}: entry {image.entry!r}", self.limits)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> ImageArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_image_bytes(data: bytes, where: str, limits: ArchiveLimits) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise DataError(
                        f"{where} is {width}x{height} pixels, more than the "
                        f"{limits.max_image_pixels} allowed"
                    )
                image.verify()
    except DataError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as error:
        raise DataError(f"{where} is not a readable image ({error})") from None


def extract_images(
    path: Path, directory: Path, limits: ArchiveLimits | None = None
) -> list[tuple[Path, str, str]]:
    """Check and extract the tree's images as `directory/<n><suffix>`.

    Returns (file, class, entry name) per image, in archive order. Every image is decoded once
    here so that an unreadable one is refused before training starts.
    """
    directory.mkdir(parents=True, exist_ok=True)
    extracted = []
    with ImageArchive(path, limits) as archive:
        for index, image in enumerate(archive.images):
            data = archive.read(image)
            archive.verify(image, data)
            suffix = PurePosixPath(image.entry).suffix.lower()
            target = directory / f"{index:07d}{suffix}"
            target.write_bytes(data)
            extracted.append((target, image.label, image.entry))
    return extracted
