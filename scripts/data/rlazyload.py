"""Read character vectors out of an R package's lazy-load database (``data/Rdata.rdb/.rdx``).

R packages with ``LazyData: true`` store their data sets in two files:

* ``Rdata.rdx``: a gzip-compressed serialised R list ``list(variables=, references=,
  compressed=)``; ``variables`` maps each object's name to ``c(offset, length)`` in the
  ``.rdb`` file.
* ``Rdata.rdb``: the objects themselves, one after another. Each entry is a 4-byte
  big-endian length of the uncompressed data, then a zlib stream of the serialised object.

Two readers are offered, which give the same result:

* ``RdataReader`` uses the PyPI ``rdata`` package (installed by fetch-data.sh into the
  cached ``$FERRITE_CACHE/data-venv``), which understands the whole serialisation format.
* ``MiniReader`` is a small stand-alone reader of R's XDR serialisation (format versions 2
  and 3) covering only what these files use: lists, names, integers, logicals, doubles,
  symbols and strings. ``fetch-data.sh --quick`` uses it so that no virtual environment
  is needed; it fails loudly on anything it does not understand.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path

# SEXP type codes (R Internals, "Serialization Formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INTEGER = -(2**31)


class MiniReader:
    """Decode one serialised R object (XDR binary, ``X\\n`` header) into Python values.

    Vectors become lists (``None`` for NA); a list or vector with a ``names`` attribute
    becomes a dict. Other attributes are ignored.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        if len(b) != n:
            raise ValueError("truncated R serialisation")
        self.pos += n
        return b

    def read(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR-format R serialisation")
        version = self._int()
        self._int()  # R version that wrote it
        self._int()  # minimal R version to read it
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported serialisation version {version}")
        return self._item()

    def _item(self):
        flags = self._int()
        sxp = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        levels = flags >> 12
        if sxp == NILVALUE_SXP:
            return None
        if sxp == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if sxp == SYMSXP:
            name = self._item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sxp == CHARSXP:
            n = self._int()
            if n == -1:
                return None
            raw = self._bytes(n)
            latin1 = bool(levels & (1 << 2))
            return raw.decode("latin-1" if latin1 else "utf-8")
        if sxp == LISTSXP:  # pairlist (e.g. attributes) as {tag: value}
            if has_attr:
                self._item()  # a pairlist's own attributes: not needed
            tag = self._item() if has_tag else None
            out = {tag: self._item()}
            rest = self._item()  # the CDR: the rest of the pairlist, or NULL
            if isinstance(rest, dict):
                out.update(rest)
            return out
        if sxp in (LGLSXP, INTSXP):
            n = self._int()
            vals = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            if sxp == LGLSXP:
                value = [None if v == NA_INTEGER else bool(v) for v in vals]
            else:
                value = [None if v == NA_INTEGER else v for v in vals]
        elif sxp == REALSXP:
            n = self._int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sxp == STRSXP:
            n = self._int()
            value = [self._item() for _ in range(n)]
        elif sxp == VECSXP:
            n = self._int()
            value = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"R object type {sxp} is not supported by MiniReader")
        if has_attr:
            attrs = self._item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None:
                return dict(zip(names, value))
        return value


class LazyLoadDB:
    """The objects of one lazy-load database (``<base>.rdx`` + ``<base>.rdb``)."""

    def __init__(self, base: Path, reader: str = "mini"):
        base = Path(base)
        self.rdb = base.with_suffix(".rdb").read_bytes()
        index_raw = base.with_suffix(".rdx").read_bytes()
        self.reader = reader
        if reader == "rdata":
            import rdata  # only present in the data-venv

            self._rdata = rdata
            index = self._rdata_convert(index_raw)
            self.index = {str(k): [int(x) for x in v] for k, v in index["variables"].items()}
        elif reader == "mini":
            index = MiniReader(gzip.decompress(index_raw)).read()
            self.index = {k: [int(x) for x in v] for k, v in index["variables"].items()}
        else:
            raise ValueError(f"unknown reader {reader!r}")

    def _rdata_convert(self, data: bytes):
        with warnings.catch_warnings():
            # rdata cannot tell a bare serialisation from an .rds file and says so.
            warnings.filterwarnings("ignore", message="Unknown file type")
            return self._rdata.conversion.convert(self._rdata.parser.parse_data(data))

    def names(self) -> list[str]:
        return sorted(self.index)

    def raw(self, name: str) -> bytes:
        """The serialised bytes of object ``name``: 4-byte length, then zlib data."""
        offset, length = self.index[name]
        blob = self.rdb[offset : offset + length]
        (expected,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != expected:
            raise ValueError(f"{name}: inflated to {len(data)} bytes, header says {expected}")
        return data

    def character_vector(self, name: str) -> list[str | None]:
        data = self.raw(name)
        if self.reader == "rdata":
            obj = self._rdata_convert(data)
            return [None if v is None else str(v) for v in list(obj)]
        obj = MiniReader(data).read()
        if not isinstance(obj, list) or not all(v is None or isinstance(v, str) for v in obj):
            raise ValueError(f"{name} is not a character vector")
        return obj
