"""Long-context evaluation and speed / memory benchmarks (``ahn.benchmarks``)."""
