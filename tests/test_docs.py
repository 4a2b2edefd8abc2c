"""Figures a user can compare with: every speed or duration that the README and the docs state names the machine
it was measured on, a CPU by its instruction set and the PyTorch version, a GPU by its name, so that a reader on
another machine knows whether to expect the same.

A doc is read as blocks: paragraphs and list items, a table counted with the paragraph just before it. Fenced and
indented code and inline `code` are left out: commands and log excerpts are not claims about a machine."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        *sorted(ROOT.glob("Weight/*/README.md"))]

_NUMBER = r"(?<![\w.,-])\d[\d,]*(?:\.\d+)?(?:-\d[\d,]*(?:\.\d+)?)?"        # 101, 1,560, 0.35, 17-46
_UNIT = (r"(?:ms|s|seconds?|min|minutes?|h|hours?|it/s|img/s|images?/s|frames?/s|GFLOP/s"
         r"|(?:iterations?\s+|images?\s+|frames?\s+)?per\s+second)")
FIGURE = re.compile(rf"{_NUMBER}\s*{_UNIT}(?![\w/])"           # 101 s, 4 h 18 min, 0.245 iterations per second
                    rf"|{_NUMBER}x(?![\w.])"                    # 1.4x slower, [4.6x]; not 256x256
                    rf"|{_NUMBER}%\s+(?:faster|slower)"         # 20-30% slower
                    rf"|(?:faster|slower)\s+by\s+(?:\w+\s+){{0,2}}{_NUMBER}%")   # slower by more than 5%
# The unit of a table of times or speeds: a column's head ("s/call", "minutes"), or named in its block ("images/s",
# "seconds per call").
TIME_COLUMN = re.compile(r"^\s*(?:s/\w+|\w+/s|ms|s|seconds|minutes|hours)\s*$")
TIME_UNIT = re.compile(r"\b(?:s/(?:call|img|image|iteration)|(?:img|images|frames|it)/s|seconds per \w+)\b")

INSTRUCTION_SET = re.compile(r"\bAVX2\b|\bAVX-?512|\bAMX\b|instruction set not recorded")
TORCH_VERSION = re.compile(r"\b(?:PyTorch|torch)\s+\d+\.\d+|\b\d+\.\d+\.\d+\+cpu\b")
GPU = re.compile(r"\bRTX\s*\d{4}\b|\b[AH]100\b|\bH200\b|\bauthors' GPU\b")

NAME_THE_MACHINE = ("name the machine in the same paragraph: for a CPU, its instruction set (AVX2, AVX-512, AMX, "
                    "or 'instruction set not recorded') and the PyTorch version ('PyTorch 2.14', '2.13.0+cpu'); "
                    "for a GPU, the GPU ('the authors' RTX 4090', 'the authors' GPU')")


def blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph or list item, a table joined to the paragraph before it, with
    fenced and indented code left out; headings are blocks of their own."""
    found: list[tuple[int, list[str], bool]] = []      # first line, lines, whether a table may join it
    current = None
    fence, indented_code, after_blank = None, False, True
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence:
            fence = None if stripped.startswith(fence) else fence
            continue
        if stripped.startswith(("```", "~~~")):
            fence, current = stripped[:3], None
            continue
        if not stripped:
            current, after_blank = None, True
            continue
        indented_code = line.startswith("    ") and (indented_code or after_blank)
        after_blank = False
        if indented_code:
            continue
        table = stripped.startswith("|")
        item = re.match(r"(?:[-*+]|\d+\.)\s", stripped) is not None
        heading = stripped.startswith("#")
        if table and current is None and found and found[-1][2]:
            current = found[-1]                        # a table belongs with the paragraph just before it
        elif current is None or item or heading:
            current = (number, [], not heading)
            found.append(current)
        current[1].append(stripped)
        if heading:
            current = None
    return [(number, " ".join(lines)) for number, lines, _ in found]


def prose(block: str) -> str:
    """A block without its inline `code`."""
    return re.sub(r"`[^`]*`", "", block)


def figures(block: str) -> list[str]:
    """The speeds and durations a block states: numbers with a unit of time or speed, speed ratios, and tables of
    times or speeds (given as "table")."""
    text = prose(block)
    found = [match.group(0) for match in FIGURE.finditer(text)]
    if "|---" in text and (TIME_UNIT.search(text) or any(TIME_COLUMN.match(cell) for cell in text.split("|"))):
        found.append("table")
    return found


def machine_missing(block: str) -> str | None:
    """What a block lacks to name its machine, or None: a GPU, or a CPU's instruction set and PyTorch version."""
    text = prose(block)
    if GPU.search(text):
        return None
    missing = [what for what, pattern in (("an instruction set", INSTRUCTION_SET),
                                          ("a PyTorch version", TORCH_VERSION)) if not pattern.search(text)]
    return " and ".join(missing) or None


def test_figures_are_speeds_and_durations_only():
    for figure in ("took 101 s", "1 h 46 min", "7 min", "0.35 s each", "11.2 ms", "13.4 s per iteration",
                   "0.245 iterations per second", "0.619 it/s", "3.5 images/s", "about 1.4x slower", "[4.6x]",
                   "20-30% slower", "slower by more than 5%", "40 minutes", "17-46 minutes", "64 GFLOP/s",
                   "| work | s/call | peak GB | |---|---|---| | infer | 0.3 | 0.7 |",
                   "in images/s: | input | idle | |---|---| | demo | 5.6 |"):
        assert figures(figure), figure
    for other in ("K = 5", "400 epochs", "256x256", "64x64 with K = 2", "2026-11-29", "PyTorch 2.14",
                  "torch 2.13.0+cpu", "lr 1e-4 stays", "Fa x 1e-6", "86 x 256 x 256 pixels", "Misc_356 (54, a blob",
                  "opset 18", "RTX 30xx/40xx", "`--epochs 40` took `12 s`", "in %: | protocol | mIoU | |---|---| "
                  "| paper | 64.73 |"):
        assert not figures(other), other


def test_blocks_are_paragraphs_and_items_with_their_tables_and_without_code():
    text = ("Intro took\n12 s here.\n\n```\nrun took 5 s\n```\n\n- an item, 3 s\n  goes on\n- another\n\n"
            "    indented code, 8 s\n    more code\n\nOn AVX2:\n\n| a | s/call |\n|---|---|\n\n## Head\n\n| b |\n")
    assert blocks(text) == [(1, "Intro took 12 s here."), (8, "- an item, 3 s goes on"), (10, "- another"),
                            (15, "On AVX2: | a | s/call | |---|---|"), (20, "## Head"), (22, "| b |")]


def test_a_machine_is_a_cpu_with_instruction_set_and_pytorch_version_or_a_gpu():
    assert machine_missing("101 s on a 2-core AMD EPYC") == "an instruction set and a PyTorch version"
    assert machine_missing("101 s on an AVX-512 EPYC, `PyTorch 2.14`") == "a PyTorch version"
    assert machine_missing("142 s on an Intel Xeon (instruction set not recorded), PyTorch 2.14") is None
    assert machine_missing("7 min on an AVX2 EPYC, torch 2.13.0+cpu") is None
    assert machine_missing("4 h 18 min on the authors' RTX 4090") is None


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_speed_and_duration_names_its_machine(doc: Path):
    assert doc.is_file(), f"{doc} is missing"
    unnamed = [f"{doc.relative_to(ROOT)}, line {number}: {', '.join(found)} without {missing}: {block[:240]}"
               for number, block in blocks(doc.read_text(encoding="utf-8"))
               if (found := figures(block)) and (missing := machine_missing(block))]
    assert not unnamed, (f"{len(unnamed)} paragraph(s) state a speed or a duration without the machine it was "
                         f"measured on; {NAME_THE_MACHINE}:\n" + "\n".join(unnamed))
