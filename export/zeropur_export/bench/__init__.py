"""Measuring: ``zeropur-export bench`` (latency, cost model, steps sweep) and ``demo``."""
