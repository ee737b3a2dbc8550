"""The `cir` console command.

It sits above every package (docs/architecture.md): each package owns its subcommands and
exposes ``register(app)``, and only this module assembles them. Heavy imports (torch,
grpc, streamlit) happen inside the commands so ``cir --help`` stays fast.
"""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(
    name="cir",
    help="Composed image retrieval: SPRC encoder, Qdrant gallery index, gRPC server, UI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    log_level: str = typer.Option(
        os.environ.get("CIR_LOG_LEVEL", "INFO"), "--log-level", help="DEBUG, INFO, WARNING, ERROR"
    ),
) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _register_all() -> None:
    from cir import demo
    from frontend import cli as frontend_cli
    from indexer import cli as indexer_cli
    from retrieval import commands as retrieval_commands
    from server import cli as server_cli

    for mod in (retrieval_commands, indexer_cli, server_cli, frontend_cli, demo):
        mod.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
