"""The top of the house: the `cir` command tree and the demo orchestration.

It is the only package that may import every other one (retrieval, indexer, server, frontend);
nothing imports it. See docs/architecture.md.
"""
