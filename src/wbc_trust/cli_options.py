"""Command-line option types shared by ``wbc`` and ``wbc trust``: one spelling of ``--model/-m``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOption = Annotated[
    Optional[Path], typer.Option("--model", "-m", help="model file (.safetensors); default: the shipped model")
]
#: For commands that compare models side by side (``wbc trust robustness``).
ModelsOption = Annotated[
    Optional[list[Path]],
    typer.Option("--model", "-m", help="model file; repeat to compare several; default: the shipped model"),
]
