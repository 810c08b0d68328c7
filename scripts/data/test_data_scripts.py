"""Offline unit tests of the extraction helpers (no downloads, no data folder needed).

    python3 scripts/data/test_data_scripts.py
"""

from __future__ import annotations

import gzip
import struct
import sys
import tempfile
import unittest
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True

import common  # noqa: E402
import rlazyload  # noqa: E402
import sources  # noqa: E402


def _xdr_header() -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def _charsxp(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">ii", 9 | (1 << 15), len(b)) + b  # CHARSXP, UTF-8 flag in levels


def _strsxp(values: list[str], attrs: bytes = b"") -> bytes:
    flags = 16 | ((1 << 9) if attrs else 0)
    return struct.pack(">ii", flags, len(values)) + b"".join(_charsxp(v) for v in values) + attrs


def _names_attr(names: list[str]) -> bytes:
    # pairlist node with tag: flags LISTSXP | has_tag; tag = SYMSXP "names"; value; then NULL
    return (
        struct.pack(">i", 2 | (1 << 10))
        + struct.pack(">i", 1)
        + _charsxp("names")
        + _strsxp(names)
        + struct.pack(">i", 254)
    )


class MiniReaderTest(unittest.TestCase):
    def test_character_vector(self):
        data = _xdr_header() + _strsxp(["EMMA", "", "By Jane Austen"])
        self.assertEqual(rlazyload.MiniReader(data).read(), ["EMMA", "", "By Jane Austen"])

    def test_lazyload_db_roundtrip(self):
        obj = _xdr_header() + _strsxp(["line one", "line two"])
        entry = struct.pack(">I", len(obj)) + zlib.compress(obj)
        # index: list(variables = list(novel = c(0L, len)), ...) with names attributes
        ints = struct.pack(">ii", 13, 2) + struct.pack(">ii", 0, len(entry))
        variables = struct.pack(">ii", 19 | (1 << 9), 1) + ints + _names_attr(["novel"])
        index = _xdr_header() + struct.pack(">ii", 19 | (1 << 9), 1) + variables + _names_attr(["variables"])
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "Rdata"
            base.with_suffix(".rdb").write_bytes(entry)
            base.with_suffix(".rdx").write_bytes(gzip.compress(index))
            db = rlazyload.LazyLoadDB(base, reader="mini")
            self.assertEqual(db.names(), ["novel"])
            self.assertEqual(db.character_vector("novel"), ["line one", "line two"])


class BrownTest(unittest.TestCase):
    def test_detokenise(self):
        toks = ["``", "Only", "a", "handful", "''", ",", "the", "jury", "said", "(", "1", ")", "--", "no", "."]
        self.assertEqual(sources.detokenise(toks), '"Only a handful", the jury said (1)--no.')

    def test_abbreviation_full_stop(self):
        self.assertEqual(sources.detokenise(["Ivan", "Allen", "Jr.", "."]), "Ivan Allen Jr.")

    def test_token_with_slash(self):
        self.assertEqual(sources.brown_token("1/2/cd"), ("1/2", "cd"))
        self.assertEqual(sources.brown_token("and/or/cc"), ("and/or", "cc"))

    def test_paragraphs_and_headlines(self):
        tagged = (
            "\n\n\tThe/at jury/nn said/vbd ./.\n\tIt/pps agreed/vbd ./.\n\n\n"
            "\tMerger/nn-hl proposed/vbn-hl\n\tHowever/rb ,/, no/at ./.\n"
        )
        paras, n = sources.brown_paragraphs(tagged)
        self.assertEqual(paras, ["The jury said. It agreed.", "Merger proposed", "However, no."])
        self.assertEqual(n, 4)


class ChatTest(unittest.TestCase):
    def test_merge_and_roles(self):
        a, b = "A", "B"
        data = {
            "c1": {"messages": [[{"text": "hi", "sender": a}, {"text": "there", "sender": a}],
                                [{"text": "hello", "sender": b}], [{"text": "bye", "sender": a}]]},
            "c2": {"messages": [[{"text": "anyone?", "sender": a}]]},
            "c3": {"messages": [[{"text": "x", "sender": b}], [{"text": "  ", "sender": a}]]},
        }
        out = sources.chitchat_to_chat(data)
        self.assertEqual(out, [{"messages": [
            {"role": "user", "content": "hi\nthere"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ]}])


class MiscTest(unittest.TestCase):
    def test_gsm_answer(self):
        self.assertEqual(sources.gsm_answer("so 5 + 5 = 10\n\n#### 10\n"), 10)
        self.assertEqual(sources.gsm_answer("#### 1,200"), 1200)
        self.assertEqual(sources.gsm_answer("#### 3.5"), 3.5)

    def test_strip_gutenberg(self):
        text = "header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nfooter"
        self.assertEqual(sources.strip_gutenberg(text), ("body", True))
        self.assertEqual(sources.strip_gutenberg("plain"), ("plain", False))

    def test_paragraph_helpers(self):
        self.assertEqual(common.normalise_paragraphs("a  \n\n\n\nb\n\n"), "a\n\nb\n")
        self.assertEqual(common.count_blocks("a\nb\n\nc\n"), 2)

    def test_marker_roundtrip(self):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            common.atomic_write_text(folder / "x.txt", "hello\n")
            common.write_marker(folder, "x", {"outputs": []}, ["x.txt"])
            self.assertEqual(common.check_marker(folder, "x"), (True, ""))
            (folder / "x.txt").write_text("changed!\n")
            ok, why = common.check_marker(folder, "x")
            self.assertFalse(ok)
            self.assertIn("x.txt", why)
            (folder / "x.txt").unlink()
            self.assertEqual(common.check_marker(folder, "x"), (False, "x.txt is missing"))


if __name__ == "__main__":
    unittest.main()
