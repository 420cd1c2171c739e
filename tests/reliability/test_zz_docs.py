"""docs/reliability.md states the figures the tests of this session measured.

Named to run last in tests/reliability, after tests/finetune, tests/manifests and
tests/operator (pytest collects directories in order), so a `make test` session has
recorded every row by then. A row none of whose tests ran in the session (a narrower
`pytest` selection) cannot be compared and is listed in the tally file as not run; every
row that was recorded must match the doc exactly.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import tally

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "manifests"))


def _section(name: str) -> str:
    text = tally.DOC.read_text()
    match = re.search(rf"<!-- {name}: begin -->(.*?)<!-- {name}: end -->", text, re.S)
    assert match, f"docs/reliability.md lacks its {name} markers"
    return match.group(1)


def test_the_doc_has_one_row_per_check_and_consistent_totals() -> None:
    section = _section("figures")
    rows = tally.doc_rows(section)
    assert list(rows) == list(tally.CHECKS), "the rows must be CHECKS, in order"
    total = re.search(r"^\| \*\*Total\*\* \|.*?\|.*?\|(.*)\|\s*$", section, re.M)
    assert total, "the figures table lacks its Total row"
    stated = [int(c) for c in total.group(1).split("|")]
    assert stated == [sum(r[f] for r in rows.values()) for f in tally.FIGURES]
    assert all(r["lost"] == 0 and r["leaks"] == 0 and r["survived"] == r["runs"]
               for r in rows.values()), "the doc claims a fault was not survived"


def test_the_doc_states_the_measured_figures(request: pytest.FixtureRequest) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        tally.count_external(reporter.stats)
    measured = tally.results()
    rows = tally.doc_rows(_section("figures"))
    wrong = [f"{check}: doc {rows[check]}, tests {({f: row[f] for f in tally.FIGURES})}"
             for check, row in measured.items()
             if {f: row[f] for f in tally.FIGURES} != rows[check]]
    assert not wrong, "docs/reliability.md disagrees with the tests:\n" + "\n".join(wrong)


def test_the_doc_lists_the_bad_input_classes_of_the_corpus() -> None:
    from test_bad_corpus import BAD, _expected, bad_input_class

    counted = Counter(bad_input_class(_expected(p)) for p in BAD)
    stated = {m.group(1).strip(): int(m.group(2)) for m in re.finditer(
        r"^\| ([^|*-][^|]*?) \| (\d+) \|\s*$", _section("classes"), re.M)}
    assert stated == dict(counted)
    assert sum(counted.values()) == len(BAD)
