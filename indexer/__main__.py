"""``python -m indexer build ...`` == ``cir index build ...``."""

from indexer.cli import main

main()
