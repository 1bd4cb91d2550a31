"""The list of trust methods drives the `wbc trust` commands and the report: every entry is a command with its
inputs as options, and every run function takes what its entry says it takes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import typer.main

from wbc_trust.trust.cli import trust_app
from wbc_trust.trust.methods import TRUST_METHODS, TrustMethod


def test_commands_are_the_table() -> None:
    group = typer.main.get_group(trust_app)
    assert set(group.commands) == {m.name for m in TRUST_METHODS if m.command} | {"report"}
    for method in TRUST_METHODS:
        if method.command:
            options = {opt for param in group.commands[method.name].params for opt in param.opts}
            inputs = {"--" + name.replace("_", "-") for name in method.inputs}
            assert options == {"--out", "--model", "-m"} | inputs, method.name


@pytest.mark.parametrize("method", TRUST_METHODS, ids=lambda m: m.name)
def test_run_function_takes_the_declared_inputs(method: TrustMethod) -> None:
    """A run function whose signature drifted from its entry fails here, not after minutes of work in the report."""
    signature = inspect.signature(method.function())
    signature.bind(None, out=Path("out"), **{name: None for name in method.inputs})
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= {next(iter(signature.parameters)), "out", *method.inputs}


def test_missing_required_input_is_named() -> None:
    influence = next(m for m in TRUST_METHODS if m.name == "influence")
    assert influence.missing({"data": Path("x")}) == ["--train-data"]
    assert set(influence.needs) == {"training", "test"}
    with pytest.raises(ValueError, match="unknown inputs"):
        TrustMethod("x", "X", "", "", "m:f", ("data", "no_such_input"), ())
