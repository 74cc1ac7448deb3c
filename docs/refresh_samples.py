"""Refresh the README's sample outputs from real runs: python docs/refresh_samples.py.

Each README block marked ``<!-- output: make demo -->`` (or ``make demo-dp``) is
replaced by what that demo printed just now: the round table's header, its first
and last rows, and the lines after the table. Other silos' lines are folded into
``...`` so the sample stays short. tests/unit/project/test_docs_blocks.py checks
that the samples have the columns the coordinator prints.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMOS = {
    "make demo": [sys.executable, "examples/digits/demo.py"],
    "make demo-dp": [sys.executable, "examples/digits/demo.py", "--dp"],
}
# Lines about the run itself, not its results: where its files were, how it ended.
_NOT_SAMPLE = re.compile(
    r"^(digits federation: |kept |removed |all processes exited|round \d+/\d+[: ])"
)


def sample(stdout: str) -> str:
    """The part of a demo's output the README shows."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("round "))
    header, rest = lines[start], lines[start + 1 :]
    rows = [line for line in rest if line.strip()[:1].isdigit()]
    after = [line for line in rest if line not in rows and not _NOT_SAMPLE.match(line)]
    shown = [header, rows[0], "  ...", rows[-1]] if len(rows) > 2 else [header, *rows]
    silos = [line for line in after if re.match(r"silo-\d+ epsilon:", line)]
    for line in silos[1:]:  # the first silo stands for the others
        after[after.index(line)] = "..."
    folded: list[str] = []
    for line in after:
        if not (line == "..." and folded and folded[-1] == "..."):
            folded.append(line)
    return "\n".join(shown + folded)


def replace_block(text: str, marker: str, body: str) -> str:
    """`text` with the fenced block after ``<!-- output: marker -->`` holding `body`."""
    pattern = re.compile(rf"(<!-- output: {re.escape(marker)} -->\n```\w*\n)(.*?)(```)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no block marked <!-- output: {marker} -->")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)


def main() -> int:
    """Run the demos and rewrite their samples in README.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(DEMOS), help="refresh one sample")
    args = parser.parse_args()
    text = README.read_text()
    for marker, command in DEMOS.items():
        if args.only and marker != args.only:
            continue
        print(f"running {marker} ...", flush=True)
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            return 1
        text = replace_block(text, marker, sample(run.stdout))
    README.write_text(text)
    print(f"refreshed {README}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
