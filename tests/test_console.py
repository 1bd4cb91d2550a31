"""Output that is not a terminal (a pipe, a file) keeps words whole: `test_model.py --image X | grep lymphocyte` works,
and every table comes out as tab-separated rows."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wbc_trust import config
from wbc_trust.console import print_table

ROOT = Path(__file__).resolve().parents[1]


def test_piped_prediction_keeps_the_class_name_whole() -> None:
    """The seed's command on a real PBC lymphocyte (from the shipped sample the model never trained on), its output
    read through a pipe as `| grep lymphocyte` would."""
    image = sorted((config.SAMPLE_DATA_DIR / "lymphocyte").iterdir())[0]
    result = subprocess.run(
        [sys.executable, "test_model.py", "--image", str(image)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    header = next(row for row in rows if row[:2] == ["file", "class"])
    answer = next(row for row in rows if row[0] == image.name)
    assert len(answer) == len(header), result.stdout
    assert answer[1] == "lymphocyte", result.stdout
    assert [line for line in result.stdout.splitlines() if "lymphocyte" in line], result.stdout


def test_tables_not_on_a_terminal_are_tab_separated_rows() -> None:
    table = Table(title="a title wider than eighty columns " * 3)
    for name in ("file", "class", "flag"):
        table.add_column(name, overflow="fold")
    table.add_row("a_long_file_name_" * 5 + ".jpg", "lymphocyte", "[bold]unreadable: line\nbreak")
    out = io.StringIO()
    print_table(table, Console(file=out, width=40))
    assert out.getvalue().splitlines() == [
        "a title wider than eighty columns " * 3,
        "file\tclass\tflag",
        "a_long_file_name_" * 5 + ".jpg\tlymphocyte\t[bold]unreadable: line break",
    ]
    drawn = io.StringIO()  # on a terminal rich draws the table as usual
    print_table(table, Console(file=drawn, width=60, force_terminal=True))
    assert "┃" in drawn.getvalue() or "│" in drawn.getvalue()
