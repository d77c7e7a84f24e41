"""Decoding techniques: drafters (what to propose) and acceptors (what the target keeps).

Importing this package registers every technique in it.
"""

from workbench.decoding import draft_model, match, plain, prompt_lookup, speculative  # noqa: F401  (registration)
