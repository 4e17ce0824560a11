"""Run nanoopt's benchmarks and record their output.

    python benchmarks/run.py                 # every benchmark, printed
    python benchmarks/run.py train_speed     # just these
    python benchmarks/run.py --write         # ... and record the output in benchmarks/RESULTS.md and README.md
    python benchmarks/run.py --sync-readme   # copy the recorded sections of RESULTS.md into README.md's (and
                                             # docs/distillation.md's) markers

Each benchmark is a module ``benchmarks/NAME.py`` run as ``python -m benchmarks.NAME`` in its own process (so
that each pins its own threads and environment, see ``benchmarks/common.py``). With ``--write`` the printed
Markdown replaces the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in RESULTS.md, README.md
and docs/distillation.md (where such markers exist): every figure in those files comes from a run of this
script, never from an edit by hand.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"__init__", "common", "run", "torch_gpt"}
RECORDS = (ROOT / "benchmarks" / "RESULTS.md", ROOT / "README.md", ROOT / "docs" / "distillation.md")


def available() -> list[str]:
    return sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in SKIP)


def run(name: str) -> tuple[int, str]:
    print(f"$ python -m benchmarks.{name}", flush=True)
    process = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(process.stdout)
    sys.stderr.write(process.stderr[-4000:] if process.returncode else "")
    return process.returncode, process.stdout


def record(name: str, output: str) -> list[str]:
    """Replace the marked section of every record file that has one; returns the files changed."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{output.strip()}\n\n_Recorded by `python benchmarks/run.py {name} --write`._\n{end}"
    changed = []
    for path in RECORDS:
        if not path.exists():
            continue
        text = path.read_text()
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: block, text))
            changed.append(path.name)
        elif path.name == "RESULTS.md":
            path.write_text(text.rstrip() + "\n\n" + block + "\n")
            changed.append(path.name)
    return changed


def sync_readme() -> list[str]:
    """Copy every recorded section of RESULTS.md into the sections with the same markers in the other records
    (README.md, docs/distillation.md); returns ``"file: name"`` for each section copied."""
    results = RECORDS[0].read_text()
    copied = []
    for path in RECORDS[1:]:
        if not path.exists():
            continue
        text = path.read_text()
        for match in re.finditer(r"<!-- begin (\S+) -->.*?<!-- end \1 -->", results, re.DOTALL):
            name = match.group(1)
            pattern = re.compile(re.escape(f"<!-- begin {name} -->") + r".*?" + re.escape(f"<!-- end {name} -->"),
                                 re.DOTALL)
            block = match.group(0)
            if pattern.search(text):
                text = pattern.sub(lambda _, block=block: block, text)
                copied.append(f"{path.name}: {name}")
        path.write_text(text)
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--write", action="store_true", help="record outputs in RESULTS.md / README.md")
    parser.add_argument("--sync-readme", action="store_true",
                        help="only copy recorded sections from RESULTS.md into README.md, running nothing")
    args = parser.parse_args()
    if args.sync_readme:
        print(f"copied: {sync_readme() or 'nothing'}")
        return 0
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {available()}")
    failures = 0
    for name in names:
        code, output = run(name)
        if code:
            failures += 1
            print(f"benchmark {name} failed with exit code {code}; nothing recorded for it", file=sys.stderr)
        elif args.write:
            print(f"recorded {name} in {', '.join(record(name, output)) or 'nothing'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
