"""Measure what tracing costs: `python scripts/bench_overhead.py --help` (docs/benchmarks.md).

The benchmark itself is the `bench` package next to this file.
"""

import sys

from bench.main import main

if __name__ == "__main__":
    sys.exit(main())
