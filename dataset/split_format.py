"""The text of split files and image sets: UTF-8 lines of whitespace-separated paths.

A split line is `image_rel_path mask_rel_path` (the community format of UniMatch's published splits), so a path
cannot hold whitespace: make_splits refuses such names instead of writing lines that read back as other fields.
"""

import codecs
from pathlib import Path

from dataset.errors import DatasetError

# Byte-order marks of encodings other than UTF-8, longest first (UTF-32 LE starts with UTF-16 LE's mark).
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
               (codecs.BOM_UTF16_BE, "UTF-16"))


def read_lines(path: Path, kind: str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (a UTF-8 byte-order mark is dropped); ``kind`` names the file in
    errors (e.g. 'split file'): missing, not a file, unreadable, another encoding or binary is one DatasetError."""
    if path.is_dir():
        raise DatasetError(f"{kind} {path} is a folder, not a file")
    if not path.is_file():
        raise DatasetError(f"{kind} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {kind} {path}: {error.strerror or error}") from error
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise DatasetError(f"{kind} {path} is {encoding} text; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the {kind} as "
                           "UTF-8") from error
    if "\x00" in text:
        raise DatasetError(f"{kind} {path} is not a text file (it holds NUL bytes)")
    return text.splitlines()


def unwritable(rel_path: str) -> str | None:
    """Why ``rel_path`` cannot go into a split line (whitespace, or a name UTF-8 cannot encode), or None."""
    if any(character.isspace() for character in rel_path):
        return "whitespace in its path"
    try:
        rel_path.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not UTF-8"
    return None


def split_line(image_rel: str, mask_rel: str | None = None) -> str:
    """`image_rel mask_rel` (or `image_rel` alone), refusing a path the format cannot hold."""
    for rel_path in (image_rel, mask_rel):
        problem = None if rel_path is None else unwritable(rel_path)
        if problem:
            raise DatasetError(f"{rel_path!r} has {problem}, which a split line 'image_path mask_path' cannot "
                               "hold; rename it")
    return image_rel if mask_rel is None else f"{image_rel} {mask_rel}"
