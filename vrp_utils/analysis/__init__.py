"""Analyses from feature stores to numbers with intervals: statistics, metrics, probes, signals."""
