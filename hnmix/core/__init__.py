"""The bottom layer: what every other layer may use and nothing here imports from above.

dist (process group, gathers), device (device choice, autocast precision), io (atomic writes, loading
files that never executes code), log (console, progress bars, metrics files).
"""
