"""Command-line options shared by the commands that call participants."""

from __future__ import annotations

from typing import Annotated

import typer

CaFileOption = Annotated[
    str | None,
    typer.Option(
        help="PEM certificates to trust for participants' HTTPS, besides the public"
        " roots (a private CA)."
    ),
]
ClientCertOption = Annotated[
    str | None,
    typer.Option(
        help="PEM private key and certificate chain shown to participants that ask"
        " for a client certificate (mutual TLS)."
    ),
]
