"""Benchmarks and jobs of zeropur-rt: bench, eval, calibrate."""
