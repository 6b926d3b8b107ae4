"""vrp_utils: the VLM Reliability Probe toolkit behind the vrp-book.

Flow: dataset -> extraction (one pass per example) -> feature store -> analyses -> figures -> book.
"""

__version__ = "0.1.0"
