"""`teachsweep bench ...`: each bench prints a table of what it measured in one run, with the command's parameters.

A module per bench (overhead, lot, relevance, scaffold, mfu, rl, distributed, pack) and the measurement toolkit they
share (measure.py: timing, matmul peak and FLOP counts, peak memory, a sweep run for its numbers). This package
sits outside the core: it may import any of teachsweep, and nothing in teachsweep imports it but the command
line's bench commands."""
