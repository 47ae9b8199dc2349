#!/usr/bin/env python3
"""`python client.py [OPTIONS]` is `zq client [OPTIONS]`; see `python client.py --help`."""

import sys

from zq.cli import main

if __name__ == "__main__":
    main(["client", *sys.argv[1:]], prog_name="client.py")
