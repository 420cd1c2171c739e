"""Every malformed manifest in tests/manifests/bad/ is refused with one line naming the field.

Each file starts with `# expect: FIELD`, the field (or word) its error message must name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evaclip.cli import main

BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first.removeprefix("# expect: ").strip()


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 40


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_refuses_with_the_field(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert _expected(path) in lines[0], lines[0]
    assert "Traceback" not in err
