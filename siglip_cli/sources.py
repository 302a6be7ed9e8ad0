"""Turn paths, folders and --files-from lists into a sorted stream of file records."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class FileRecord:
    """One input: its canonical path (see `canonical`), its size and mtime, or why it can't be read."""

    path: str
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None


def display_path(path: str) -> tuple[str, bytes | None]:
    """A path as a valid UTF-8 string (undecodable bytes shown as U+FFFD) and, only then, its exact bytes."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "replace"), raw


def stored_path(path: str, raw: bytes | None) -> str:
    """The path as the OS names it, from the two columns: the inverse of display_path."""
    return os.fsdecode(raw) if raw is not None else path


def _record(path: str) -> FileRecord:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return FileRecord(path, error="no such file")
    except OSError as e:
        return FileRecord(path, error=f"cannot stat: {e.strerror or e}")
    return FileRecord(path, st.st_size, st.st_mtime_ns)


# The system, thumbnail and recycle folders of NAS and desktop systems: never photos of the library.
SYSTEM_FOLDERS = frozenset(
    {
        "@eaDir",
        "#recycle",
        "#snapshot",
        "@tmp",
        "@sharebin",
        "@SynoResource",  # Synology
        "@Recycle",
        "@Recently-Snapshot",
        "@__thumb",
        ".@__thumb",
        ".streams",  # QNAP
        "$RECYCLE.BIN",
        "System Volume Information",  # Windows
        "lost+found",
        ".Trashes",
        ".Spotlight-V100",
        ".fseventsd",  # Linux, macOS
    }
)
IGNORE_FILE = ".siglipignore"


@dataclass(frozen=True)
class Skip:
    """What a folder's walk leaves out: hidden entries (a name starting with `.`) and SYSTEM_FOLDERS unless
    `include_hidden`; `exclude` globs, matched against a path relative to the folder given and against each
    name; and what a `.siglipignore` (gitignore syntax) in any folder walked says, relative to its folder."""

    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    raw_pairs: bool = False  # a RAW file whose camera JPEG (or HEIC) is beside it: both (else the JPEG alone)

    def hidden(self, name: str) -> bool:
        return not self.include_hidden and (name.startswith(".") or name in SYSTEM_FOLDERS)

    def excluded(self, relative: str, name: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatchcase(relative, g) or fnmatch.fnmatchcase(name, g) for g in self.exclude)


def _has_sibling(name: str, names: set[str]) -> bool:
    """Whether a RAW file's camera JPEG (or HEIC) of the same shot is in the same folder: indexed through it."""
    from .raw import SIBLINGS, is_raw

    stem = os.path.splitext(name)[0].lower()
    return is_raw(name) and any(stem + ext in names for ext in SIBLINGS)


def _ignore_file(folder: str):
    """The gitignore patterns of a folder's .siglipignore, or None where it has none (or it cannot be read)."""
    try:
        with open(os.path.join(folder, IGNORE_FILE), "rb") as f:
            lines = [line.decode("utf-8", "replace") for line in bounded_lines(f, IGNORE_FILE)]
    except (OSError, ValueError):
        return None
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _walk(
    folder: str,
    extensions: tuple[str, ...],
    seen: set[tuple[int, int]],
    skip: Skip = Skip(),
    root: str | None = None,
    ignores: tuple = (),
) -> Iterator[FileRecord]:
    """Depth-first, entries sorted by name, each real folder visited once; what `skip` says is left out.
    `root`: the folder given (exclusions are relative to it); `ignores`: (folder, patterns) of the .siglipignore
    files above."""
    root = folder if root is None else root
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a symlink loop, or a second link to a folder already walked
            return
        seen.add(key)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield FileRecord(folder, error=f"cannot read folder: {e.strerror or e}")
        return
    if (spec := _ignore_file(folder)) is not None:
        ignores = (*ignores, (folder, spec))
    names = {e.name.lower() for e in entries}
    for entry in entries:
        if skip.hidden(entry.name) or (not skip.raw_pairs and _has_sibling(entry.name, names)):
            continue
        path = os.path.join(folder, entry.name)
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if skip.excluded(os.path.relpath(path, root), entry.name) or any(
            spec.match_file(os.path.relpath(path, base) + ("/" if is_dir else "")) for base, spec in ignores
        ):
            continue
        if is_dir:  # a symlinked folder is walked under its real path: one key per file, whichever way it is reached
            yield from _walk(os.path.realpath(path), extensions, seen, skip, root, ignores)
        elif entry.name.lower().endswith(extensions):
            yield _record(path)


MAX_LINE = 1 << 16  # bytes: more than any path (PATH_MAX is 4096) or text the model reads (text.RAW_CHARS)


def bounded_lines(stream, what: str, limit: int = MAX_LINE) -> Iterator[bytes]:
    """The lines of a binary stream, each read with a bound: a longer one (a file without newlines, /dev/zero)
    is a UsageError before it fills memory."""
    n = 0
    while line := stream.readline(limit + 1):
        n += 1
        if len(line) > limit and not line.endswith(b"\n"):
            from .errors import UsageError

            raise UsageError(f"{what}, line {n}: longer than {limit:,} bytes; give one item a line")
        yield line


def text_lines(source: str, what: str) -> list[str]:
    """A UTF-8 list of texts, tags or labels, one a line ('-' is stdin), bounded as bounded_lines; without line
    ends and a byte-order mark (Windows editors write one; it is not part of the first line)."""
    from .errors import UsageError

    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {what} {source}: {e.strerror or e}") from None
    try:
        lines = [line.rstrip(b"\r\n").decode("utf-8") for line in bounded_lines(stream, f"{what} {source}")]
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {what} {source}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {source}: {e.strerror or e}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    return lines


def read_list(source: str) -> Iterator[str]:
    """Paths from a --files-from file, one a line ('-' is stdin); blank lines are skipped.

    Read as bytes and decoded as the OS does, so that names that are not valid UTF-8 survive intact.
    """
    stream = sys.stdin.buffer if source == "-" else open(source, "rb")
    try:
        for n, line in enumerate(bounded_lines(stream, f"--files-from {source}")):
            line = line.rstrip(b"\r\n")
            if n == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first name
            if b"\0" in line:  # no file name holds one
                from .errors import UsageError

                raise UsageError(
                    f"--files-from {source}, line {n + 1}: a NUL byte; give one path a line "
                    "(not a NUL-separated list, as find -print0 writes)"
                )
            if line:
                yield os.fsdecode(line)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def canonical(path: str) -> str:
    """The key of a path in an index: absolute, with the folders resolved (symlinks, `..`, the working
    directory) and the file's own name kept, so that one file has one key however it was named.

    The name is not resolved: a symlinked photo is its own entry, as when its folder is walked.
    """
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):  # a folder, not a file's name
        return os.path.realpath(path)
    # realpath before any `..` is applied: `link/../a.jpg` is a.jpg beside the link's target, as the OS sees it
    return os.path.join(os.path.realpath(folder or "."), name)


def is_dir(path: str) -> bool:
    """Whether path is (or links to) a folder; False for anything that cannot be stat-ed."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def missing(path: str) -> bool:
    """Whether path is certainly not there (a dangling link included); False for one that cannot be checked."""
    try:
        os.stat(path)
        return False
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


def iter_files(
    paths: Iterable[str], files_from: str | None, extensions: tuple[str, ...], skip: Skip = Skip()
) -> Iterator[FileRecord]:
    """Every input, in a deterministic order: each argument in turn (folders walked), then the listed files.

    Paths are canonical (absolute, folders resolved). A file named directly or listed in --files-from is
    attempted whatever its extension and whatever `skip` leaves out of a folder's walk. A listed path that does
    not exist still yields a record, with an error, so that it gets a row; an argument that does not exist
    yields nothing.
    """
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    seen: set[tuple[int, int]] = set()
    for path in paths:
        if is_dir(path):
            yield from _walk(os.path.realpath(path), exts, seen, skip)
        elif not missing(path):  # an argument that is not there is the caller's to tell (pipeline.run)
            yield _record(canonical(path))
    if files_from is not None:
        for path in read_list(files_from):
            yield _record(canonical(path))
