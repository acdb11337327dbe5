"""bench/gpu_validate.sh is what the rare GPU session runs, in few calls; these checks keep it from
wasting one. The script parses, and every term of the compute-sanitizer test selections (-k) still
selects tests: a test renamed since would otherwise drop out of the one sanitizer run unnoticed
(pytest only fails when a whole selection is empty)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_validate.sh"


def _sanitizer_runs() -> list[tuple[str, list[str], str]]:
    """(tool, test files, -k expression) of each compute-sanitizer line of the script."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    runs = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("compute-sanitizer"):
            continue
        words = shlex.split(line.split(">")[0])
        tool = words[words.index("--tool") + 1]
        files = [w for w in words if w.startswith("tests/")]
        runs.append((tool, files, words[words.index("-k") + 1]))
    return runs


def _terms(expr: str) -> list[str]:
    """The top-level 'or' terms of a pytest -k expression."""
    terms, depth, start = [], 0, 0
    for m in re.finditer(r"\(|\)|\bor\b", expr):
        if m.group() == "(":
            depth += 1
        elif m.group() == ")":
            depth -= 1
        elif depth == 0:
            terms.append(expr[start:m.start()].strip())
            start = m.end()
    terms.append(expr[start:].strip())
    return terms


def _node_ids(files: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "::" in line]


def _selects(term: str, node_id: str) -> bool:
    """Whether -k term selects the test: pytest's own expression grammar, each name matched as a
    case-insensitive substring of the test's id (as pytest matches it against the test's names)."""
    from _pytest.mark.expression import Expression

    return Expression.compile(term).evaluate(lambda name: name.lower() in node_id.lower())


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_terms_splits_at_top_level_only():
    assert _terms("a or (b and c or d) or e") == ["a", "(b and c or d)", "e"]
    assert _terms("not kernels or x") == ["not kernels", "x"]


def test_selects_matches_like_pytest():
    node = "tests/test_cuda_kernels.py::test_dx_mma_matches[float32-bfloat16-4]"
    assert _selects("(dx_mma_matches and float32-bfloat16-4)", node)
    assert not _selects("(dx_mma_matches and 576)", node)
    assert _selects("not lowrank", node) and not _selects("not kernels", node)


def test_sanitizer_lines_found():
    assert {tool for tool, _, _ in _sanitizer_runs()} == {"memcheck", "racecheck"}


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_every_sanitizer_selection_term_selects_tests(tool):
    (files, expr), = [(f, e) for t, f, e in _sanitizer_runs() if t == tool]
    ids = _node_ids(files)
    assert len(ids) > 100, f"collecting {files} found {len(ids)} tests"
    empty = [term for term in _terms(expr) if not any(_selects(term, i) for i in ids)]
    assert not empty, f"{tool}: -k terms selecting no test in {files}: {empty}"
