#!/usr/bin/env python3
"""`python worker.py [OPTIONS]` is `zq worker [OPTIONS]`; see `python worker.py --help`."""

import sys

from zq.cli import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]], prog_name="worker.py")
