"""``python -m zq`` is the ``zq`` command."""

from zq.cli import main

main(prog_name="zq")
