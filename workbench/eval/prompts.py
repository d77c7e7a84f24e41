"""Prompts written for this project.

`BASELINE_PROMPTS` is the small, varied set the baseline speed benchmark uses: a question, an
explanation, a rewrite of given text and a piece of code, so prompt lengths and outputs differ.
"""

BASELINE_PROMPTS: list[str] = [
    "Explain in a few paragraphs why the sky looks blue during the day and red at sunset.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarise the following notes as a bulleted list:\n"
    "The team met on Monday to plan the release. Testing found two bugs in the export code, one of "
    "which corrupts files larger than 2 GB. The release moves to Thursday. Maria will fix the export "
    "bug, Tom will update the documentation, and everyone reviews the changelog by Wednesday noon.",
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring "
    "and two example calls.",
    "What are the main differences between a list and a tuple in Python? Give examples.",
    "Describe three ways to reduce the energy use of a small office building.",
]
