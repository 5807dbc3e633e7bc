"""Markdown the tests compare: tables without the padding that aligns their columns."""


def tight_tables(markdown: str) -> str:
    """Table rows without their alignment padding: `| a | b |`, an empty cell `|  |`."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("|") and line.endswith("|"):
            cells = [cell.strip() for cell in line[1:-1].split(" | ")]
            line = "| " + " | ".join(cells) + " |"
        lines.append(line)
    return "\n".join(lines)
