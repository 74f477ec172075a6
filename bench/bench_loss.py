"""Thin entry point: `python bench/bench_loss.py ...` == `fastmedusa bench loss ...`."""

import sys

from fastmedusa.bench.loss import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
