"""Benchmark scripts (speed, quality, operator calibration); a package so `benchmarks.x` imports resolve here."""
