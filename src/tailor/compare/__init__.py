"""`tailor compare` and `tailor sweep`: the same data, seed, token budget and evaluation for every method,
each method in its own process (clean peak memory), one report."""

from tailor.compare.entries import CompareEntry, parse_entries
from tailor.compare.runner import run_compare

__all__ = ["CompareEntry", "parse_entries", "run_compare"]
