"""Weight transforms (quantize, prune, encode, compensate). Importing this package registers them.

None are registered yet: the weight-compression issue adds them, one per file.
"""
