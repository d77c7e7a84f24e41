"""One colour per configuration column, shared by the token boxes, the plots and the Runs tab's bars."""

COLUMN_COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f")


def column_color(index: int) -> str:
    """The colour of column (or compared run) `index`, counted from 0."""
    return COLUMN_COLORS[index % len(COLUMN_COLORS)]
