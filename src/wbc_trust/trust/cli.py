"""`wbc trust ...` sub-commands: each parses its options and calls one ``run_*`` function of the trust modules."""

from __future__ import annotations

import typer

trust_app = typer.Typer(no_args_is_help=True, help="Audit how far to trust a model: robustness, Grad-CAM, Fisher "
                                                   "sensitivity, influence, calibration, one report.")
