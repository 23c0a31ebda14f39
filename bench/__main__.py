"""``python -m bench SCENARIO [--runs N] [--quick] [--write PATH]`` (``make bench``: all of them).

The benchmark lives beside the product, not in it: run it from a checkout, with the
``bench`` extra installed (``pip install -e '.[test,bench]'``, as ``make bench`` does).
"""

import argparse
import sys

from bench.runner import main

parser = argparse.ArgumentParser(prog="python -m bench", description="measure poolq on this machine (BENCHMARKS.md)")
parser.add_argument(
    "scenario", help="submit, batch, place, poll, e2e, list, memory, fair_share, arrays, feed, curves, fleet, or all"
)
parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported with min and max")
parser.add_argument("--quick", action="store_true", help="short runs, to check the harness (figures not meaningful)")
parser.add_argument("--write", metavar="PATH", help="also write the report (markdown) to PATH")
sys.exit(main(parser.parse_args()))
