"""Reading a rich table back: which columns it shows and, per column, its text top to bottom.

A plain module (not a conftest) so the table tests import it by name.
"""

from __future__ import annotations

from rich.cells import cell_len


def tables(out: str) -> list[str]:
    """Each table in `out`, from its top rule to its bottom one."""
    found: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("┏"):
            found.append([])
        if found and (len(found[-1]) == 0 or not found[-1][-1].startswith("└")):
            found[-1].append(line)
    return ["\n".join(lines) for lines in found]


def headers(out: str) -> list[str]:
    """The column names of the (only or first) table in `out` (a header folded onto two lines
    is joined with a space)."""
    return _headers(tables(out)[0])


def _headers(table: str) -> list[str]:
    lines = [line for line in table.splitlines() if line.startswith("┃")]
    assert lines, table
    columns: list[list[str]] = []
    for line in lines:
        for i, cell in enumerate(line.strip("┃").split("┃")):
            if i == len(columns):
                columns.append([])
            if cell.strip():
                columns[i].append(cell.strip())
    return [" ".join(parts) for parts in columns]


def column_text(out: str, header: str) -> str:
    """The body of the column named `header` (in whichever table has one), top to bottom,
    without whitespace: folded or wrapped values join back into the whole value, a cut one
    ("…") does not."""
    table = next(t for t in tables(out) if header in _headers(t))
    index = _headers(table).index(header)
    body = [line for line in table.splitlines() if line.startswith("│")]
    return "".join("".join(line.strip("│").split("│")[index].split()) for line in body)


def squeezed(values: list[str]) -> str:
    return "".join("".join(v.split()) for v in values)


def assert_fits(out: str, width: int) -> None:
    too_long = [line for line in out.splitlines() if cell_len(line) > width]
    assert not too_long, f"lines wider than {width}:\n" + "\n".join(too_long)
    assert "…" not in out, out
