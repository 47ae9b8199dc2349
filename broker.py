#!/usr/bin/env python3
"""`python broker.py [OPTIONS]` is `zq broker [OPTIONS]`; see `python broker.py --help`."""

import sys

from zq.cli import main

if __name__ == "__main__":
    main(["broker", *sys.argv[1:]], prog_name="broker.py")
