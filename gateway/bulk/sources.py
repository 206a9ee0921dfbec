"""Which NDJSON files make up an export: a folder, explicit files, or a Bulk Data manifest naming local files.

A manifest (`{"output": [{"type": ..., "url": ...}]}`) may name files by relative path, absolute path or
`file://` URL; with `allowed_root` set (the HTTP `$import`), every file must resolve inside that folder and
anything else is refused: an upload must not be able to make the gateway read arbitrary files.
Bulk Data `log.ndjson` / OperationOutcome files are not resources to deliver and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import orjson

from gateway.bulk.index import SourceFile

_TYPE_FROM_NAME = re.compile(r"^([A-Z][A-Za-z]+)(?:[.-]\d+)?\.ndjson$")
NOT_RESOURCES = frozenset({"log.ndjson"})
# Each named file costs a few file-system calls before the job starts; a probe's 1 MiB manifest of 21,000
# entries took 2.3 s. A real export names one file per type, or per type and part.
MAX_MANIFEST_FILES = 10_000


class SourceError(ValueError):
    """The export cannot be used as given (message is fixed text plus at most a file's base name)."""


def resolve_sources(paths: list[Path], *, allowed_root: Path | None = None) -> list[SourceFile]:
    files: list[SourceFile] = []
    for path in paths:
        if path.is_dir():
            files.extend(_folder(path))
        elif path.suffix == ".json":
            files.extend(read_manifest(path, allowed_root=allowed_root))
        elif path.is_file():
            files.append(SourceFile(path, _type_hint(path.name)))
        else:
            raise SourceError(f"no such file or folder: {path.name}")
    if not files:
        raise SourceError("no NDJSON files in the export")
    return _each_once(files)


def _each_once(files: list[SourceFile]) -> list[SourceFile]:
    """A file named twice (a folder and a file in it, a manifest listing it twice, under `./` or a link) is
    read once: its lines twice would be each resource twice."""
    seen: set[tuple[int, int]] = set()
    once = []
    for source in files:
        stat = source.path.stat()
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            once.append(source)
    return once


def _folder(folder: Path) -> list[SourceFile]:
    manifests = [p for p in (folder / "manifest.json",) if p.is_file()]
    if manifests:
        return read_manifest(manifests[0], allowed_root=None)
    # Patients first: their groups are cut in export order, and nothing depends on the rest's order.
    found = sorted(
        (p for p in folder.glob("*.ndjson") if p.name not in NOT_RESOURCES),
        key=lambda p: (p.name.split(".")[0] != "Patient", p.name),
    )
    return [SourceFile(p, _type_hint(p.name)) for p in found]


def read_manifest(path: Path, *, allowed_root: Path | None) -> list[SourceFile]:
    try:
        data = path.read_bytes()
    except OSError:
        raise SourceError("the manifest is not readable JSON") from None
    return parse_manifest(data, base=path.parent, allowed_root=allowed_root)


def parse_manifest(data: bytes, *, base: Path, allowed_root: Path | None) -> list[SourceFile]:
    """The files a Bulk Data manifest names: relative urls under `allowed_root` (else `base`)."""
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise SourceError("the manifest is not readable JSON") from None
    outputs = manifest.get("output") if isinstance(manifest, dict) else None
    if not isinstance(outputs, list):
        raise SourceError("the manifest has no output list")
    if not outputs:
        raise SourceError("the manifest's output list names no file: nothing to deliver")
    if len(outputs) > MAX_MANIFEST_FILES:
        raise SourceError(f"the manifest names more than {MAX_MANIFEST_FILES:,} files: post it in parts")
    files = []
    urls: set[str] = set()
    for n, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise SourceError(f"manifest output[{n}] has no url")
        if item["url"] in urls:  # the same file again (`_each_once` also finds it under another name)
            continue
        urls.add(item["url"])
        target = _local(item["url"], base, allowed_root, n)
        rtype = item.get("type") if isinstance(item.get("type"), str) else _type_hint(target.name)
        files.append(SourceFile(target, rtype))
    return _each_once(files)


def _local(url: str, base: Path, allowed_root: Path | None, n: int) -> Path:
    """The local file of manifest output[n]. Errors name the entry, not the file: an export's file names are
    the hospital's choice and may carry anything (a patient number in a per-patient export)."""
    try:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
            raise SourceError(f"manifest output[{n}]: urls must name local files (no remote download)")
        raw = Path(unquote(parsed.path if parsed.scheme == "file" else url))
        target = (raw if raw.is_absolute() else (allowed_root or base) / raw).resolve()
    except SourceError:
        raise
    except (ValueError, OSError):  # "http://[::1", an embedded NUL, a name too long: not a url of a file
        raise SourceError(f"manifest output[{n}] has a url that names no file") from None
    if allowed_root is not None and not target.is_relative_to(allowed_root.resolve()):
        raise SourceError(f"manifest output[{n}] names a file outside the import folder")
    try:
        found = target.is_file()
    except OSError:  # a name over the file system's limit, a folder it may not look into
        found = False
    if not found:
        raise SourceError(f"manifest output[{n}] names a missing file")
    return target


def _type_hint(name: str) -> str | None:
    match = _TYPE_FROM_NAME.match(name)
    return match.group(1) if match else None
