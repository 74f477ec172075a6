"""Thin entry point: `python bench/bench_decode.py ...` == `fastmedusa bench decode ...`."""

import sys

from fastmedusa.bench.decode import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
