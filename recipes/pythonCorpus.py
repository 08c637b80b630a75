"""Gather Python's standard library source into one text file: a corpus of another domain (code) than Tiny
Shakespeare that every machine with Python has, for the transfer study (README, "Transfer across corpora").

    python recipes/pythonCorpus.py python-stdlib.txt [--chars 1115394]

Takes the top-level modules (LIBDIR/*.py, not the packages or tests) in name order, whole files separated by a
blank line, until --chars characters (default: as many as tinyshakespeare.txt, so that a run reads both corpora
the same number of times); prints the Python version, whose library it is.
"""
import argparse
import glob
import os
import platform
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lmafs.cliErrors import OneLineErrorParser  # noqa: E402


def main(argv=None):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the text file to write")
    parser.add_argument("--chars", type=int, default=1_115_394, help="characters to gather (whole files)")
    args = parser.parse_args(argv)
    if args.chars < 1:
        parser.error(f"--chars must be >= 1, got {args.chars}")
    library = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(library, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip("\n") + "\n\n"
        parts.append(text)
        total += len(text)
        if total >= args.chars:
            break
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    print(f"wrote {args.out}: {total:,} characters, {len(parts)} modules of Python {platform.python_version()}'s "
          f"standard library ({library})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
