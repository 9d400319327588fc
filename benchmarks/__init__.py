"""Benchmarks for edge-ser: one entry point per question (``python -m benchmarks.accuracy`` ...).
Each prints machine info and a table and writes JSON; see benchmarks/RESULTS.md for the latest numbers."""
