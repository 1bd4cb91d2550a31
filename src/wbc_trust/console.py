"""How every ``wbc`` command writes to the screen: rich tables on a terminal, plain tab-separated rows elsewhere.

rich lays a table out to the terminal's width; writing into a pipe or a file it assumes 80 columns and folds cells
mid-word ("lymphocy" / "te"), which breaks ``wbc predict IMAGE | grep lymphocyte`` and any script that reads the
output. So output that is not a terminal gets one line per table row, cells separated by tabs (``cut``, ``awk`` and
spreadsheets read it as is), and prose lines are never broken (soft wrap).
"""

from __future__ import annotations

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text


def make_console(stderr: bool = False) -> Console:
    """A console for the command line (stdout, or stderr): on a terminal rich's usual output; anywhere else lines
    are written whole, however long (``soft_wrap``), so that no word is split."""
    console = Console(stderr=stderr)
    console.soft_wrap = not console.is_terminal
    return console


def print_table(table: Table, console: Console | None = None) -> None:
    """Show ``table``: drawn by rich on a terminal; otherwise its title (if any), its header and its rows as
    tab-separated lines of plain text (no markup, no colour), every cell whole."""
    console = console or make_console()
    if console.is_terminal:
        console.print(table)
        return
    lines = [] if table.title is None else [_plain(table.title)]
    lines.append("\t".join(_plain(column.header) for column in table.columns))
    cells = [list(column.cells) for column in table.columns]
    lines += ["\t".join(_plain(column[row]) for column in cells) for row in range(table.row_count)]
    console.file.write("".join(line + "\n" for line in lines))  # not console.out: rich expands tabs


def _plain(cell: RenderableType) -> str:
    """A cell as one line of plain text: rich ``Text`` loses its styles, tabs and line breaks become spaces (they
    would split the cell or the row)."""
    text = cell.plain if isinstance(cell, Text) else str(cell)
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text
