"""`wbc trust ...` sub-commands: one per entry of ``trust/methods.py``'s ``TRUST_METHODS``, generated from it (name,
help, options, the files it writes), plus ``report``, which runs them all."""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from wbc_trust.cli_options import ModelOption, ModelsOption
from wbc_trust.trust.methods import INPUTS, TRUST_METHODS, TrustMethod

trust_app = typer.Typer(
    no_args_is_help=True,
    help="Audit how far to trust a model: robustness, Grad-CAM, Fisher "
    "sensitivity, influence, calibration, one report.",
)


def input_option(name: str, required: bool | None = None, help: str | None = None) -> Any:
    """The Typer option type of ``INPUTS[name]`` (``--train-data`` for ``train_data``); ``required``/``help`` override
    the input's own (the report takes training data optionally)."""
    spec = INPUTS[name]
    kind = spec.type if (spec.required if required is None else required) else Optional[spec.type]
    return Annotated[kind, typer.Option("--" + name.replace("_", "-"), help=help or spec.help)]


DataOption = input_option("data")
MaxImagesOption = input_option("max_images")


def _parameter(name: str, annotation: Any, required: bool) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=inspect.Parameter.empty if required else None,
    )


def _show(method: TrustMethod, summary: dict) -> None:
    """The summary as the user reads it: a table of its rows, or its JSON (less the long lists)."""
    if method.table:
        from rich.table import Table

        from wbc_trust.console import print_table

        rows = summary[method.table]
        table = Table(title=method.table_title)
        for column in rows[0]:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(f"{v:.1%}" if isinstance(v, float) else str(v) for v in row.values()))
        print_table(table)  # a terminal gets rich's table, a pipe tab-separated rows
    else:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k not in method.hide}, indent=2))


def _register(method: TrustMethod) -> None:
    """Add ``wbc trust <method.name>``: options --<input> for each of its inputs, --out, --model."""
    folders = [n for n in method.inputs if INPUTS[n].data]
    others = [n for n in method.inputs if not INPUTS[n].data]
    out_option = Annotated[Path, typer.Option(help=f"folder for {', '.join(method.files)}")]
    parameters = [
        *(_parameter(n, input_option(n), INPUTS[n].required) for n in folders),
        _parameter("out", out_option, required=True),
        _parameter("model", ModelsOption if method.many_models else ModelOption, required=False),
        *(_parameter(n, input_option(n), INPUTS[n].required) for n in others),
    ]

    def command(**values: Any) -> None:
        out, model = values.pop("out"), values.pop("model")
        started = time.time()
        summary = method(list(model or [None]) if method.many_models else model, out, values)
        _show(method, summary)
        written = [f for f in method.files if (out / f).is_file() and (out / f).stat().st_mtime >= started - 1]
        typer.echo(f"written to {out}/: {', '.join(written)}")

    command.__name__ = method.name
    command.__doc__ = method.help
    command.__signature__ = inspect.Signature(parameters)  # what Typer reads to build the options
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    trust_app.command(method.name)(command)


for _method in TRUST_METHODS:
    if _method.command:
        _register(_method)


ReportTrainDataOption = input_option(
    "train_data", required=False, help="the model's training folder: adds the data audit and influence"
)


@trust_app.command("report")
def report(
    data: DataOption,
    out: Annotated[Path, typer.Option(help="folder for report.html and every method's figures and files")],
    model: ModelOption = None,
    train_data: ReportTrainDataOption = None,
    max_images: MaxImagesOption = None,
) -> None:
    """Run every trust method and write one self-contained OUT/report.html (figures, tables, model metadata)."""
    from wbc_trust.trust.report import run_report

    typer.echo(f"report: {run_report(model, data, train_data, out, max_images=max_images)}")
