"""Pieces of an experiment notebook, for the tests and benchmarks that run parts of it."""


def section(cells, heading: str) -> str:
    """The code of the section whose markdown cell starts with `heading` (e.g. "## Model"): every
    code cell up to the next `## ` heading, joined into one cell's source."""
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.lstrip().startswith(heading)), None)
    if start is None:
        raise ValueError(f"the notebook has no '{heading}' section")
    code = []
    for c in cells[start + 1:]:
        if c.cell_type == "markdown" and c.source.lstrip().startswith("## "):
            break
        if c.cell_type == "code":
            code.append(c.source)
    if not code:
        raise ValueError(f"the notebook's '{heading}' section has no code cell")
    return "\n\n".join(code)
