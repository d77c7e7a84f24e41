"""An index of a growing token list's n-grams, for drafters that copy what followed an earlier occurrence of the
current n-gram (prompt lookup, TriForce's bottom level)."""

from __future__ import annotations


class NgramIndex:
    """Every n-gram of `min_n` .. `max_n` tokens of a token list -> its start positions, ascending, kept up to date
    as the list grows. Only n-grams that end before the list's last token are indexed, so each has at least one
    token after it to copy."""

    def __init__(self, min_n: int, max_n: int):
        self.grams: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(max_n, min_n - 1, -1)}
        self.indexed = 0  # tokens[:indexed] have been seen

    def update(self, tokens: list[int]) -> None:
        for end in range(max(self.indexed, 1), len(tokens)):
            for n, grams in self.grams.items():
                if end >= n:
                    grams.setdefault(tuple(tokens[end - n:end]), []).append(end - n)
        self.indexed = len(tokens)

    def match(self, tail: list[int], prefer: str = "first") -> tuple[int, int] | None:
        """The longest n whose last n tokens of `tail` occur in the index, and where the chosen occurrence starts
        (its first, or with prefer="recent" its latest); None when no n matches. The tokens after the
        occurrence are the copy."""
        for n in self.grams:  # longest first
            if n > len(tail):
                continue
            starts = self.grams[n].get(tuple(tail[-n:]))
            if starts:
                return n, starts[0] if prefer == "first" else starts[-1]
        return None
