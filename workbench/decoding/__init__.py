"""Decoding techniques: drafters (what to propose) and acceptors (what the target keeps).

Importing this package registers every technique in it.
"""

from workbench.decoding import match, plain, prompt_lookup  # noqa: F401  (registration)
