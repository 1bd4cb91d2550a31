"""One report: run every trust method of ``trust/methods.py`` on a model and write ``report.html``, a single
self-contained file (figures embedded as PNG data, no scripts, no links to fetch) that opens offline, with the
model's metadata and every table of numbers. The figures and JSON files of each method are written beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from wbc_trust import config
from wbc_trust.data import find_dataset
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write_text
from wbc_trust.modelfile import read_metadata
from wbc_trust.trust.methods import TRUST_METHODS, TrustMethod

#: Lists longer than this are summarised ("N entries") in the report; the JSON files beside it hold them in full.
_MAX_ROWS = 20
#: Tables of records with more fields than this are shown transposed (one column per record).
_MAX_COLUMNS = 8


@dataclass
class Section:
    """One trust method's part of the report."""

    title: str
    what: str  # one sentence: what the method measures and how to read it
    summary: dict | None = None
    figures: list[Path] = field(default_factory=list)
    problem: str | None = None  # why the section is missing, when it is


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > _MAX_ROWS:
        return f"({len(value)} entries, not listed here)"
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value)
    return "—" if value is None else str(value)


def tables_html(summary: dict) -> str:
    """A summary dict as HTML tables: nested keys flattened (pandas.json_normalize) into one key/value table, and
    every list of records as a table of its own (records flattened the same way)."""
    flat = pd.json_normalize(summary, sep=" › ").iloc[0].to_dict() if summary else {}
    scalars = {k: v for k, v in flat.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
    parts = (
        [
            pd.DataFrame({"value": [_format(v) for v in scalars.values()]}, index=list(scalars)).to_html(
                header=False, border=0, classes="kv"
            )
        ]
        if scalars
        else []
    )
    for key, rows in flat.items():
        if key in scalars:
            continue
        shown = pd.json_normalize(rows[:_MAX_ROWS], sep=" › ").map(_format)
        more = f" (first {_MAX_ROWS} of {len(rows)})" if len(rows) > _MAX_ROWS else ""
        wide = shown.shape[1] > _MAX_COLUMNS  # many fields, few records: one column per record reads better
        table = shown.T.to_html(header=False, border=0) if wide else shown.to_html(index=False, border=0)
        parts.append(f"<h4>{html.escape(key)}{more}</h4>" + table)
    return "\n".join(parts)


def _png_data(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


_TEMPLATE = jinja2.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wbc-trust report: {{ model }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
table.kv th { font-weight: normal; color: #555; max-width: 420px; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.problem { background: #fff3cd; padding: .6em 1em; border-left: 4px solid #e0a800; }
.what { color: #444; }
nav a { margin-right: 1em; }
</style></head><body>
<h1>wbc-trust report</h1>
<p>Model <b>{{ model }}</b> on <b>{{ data }}</b>{% if train_data %} (training data {{ train_data }}){% endif %}.
Written {{ created }}{% if max_images %}; slow methods used a stratified subset of at most {{ max_images }}
images{% endif %}.
Each method's files (JSON, CSV, PNG) are beside this report.</p>
<nav>{% for s in sections %}<a href="#s{{ loop.index }}">{{ s.title }}</a>{% endfor %}
<a href="#meta">Model metadata</a></nav>
{% for s in sections %}
<h2 id="s{{ loop.index }}">{{ s.title }}</h2>
<p class="what">{{ s.what }}</p>
{% if s.problem %}<p class="problem">Not in this report: {{ s.problem }}</p>{% endif %}
{% for f in s.figures %}<figure><img alt="{{ f.name }}" src="data:image/png;base64,{{ png(f) }}">
<figcaption>{{ f.name }}</figcaption></figure>{% endfor %}
{% if s.summary %}{{ tables(s.summary) }}{% endif %}
{% endfor %}
<h2 id="meta">Model metadata</h2>
{{ tables(metadata) }}
<p>{{ credit }}</p>
</body></html>
""",
    autoescape=True,
)


def _run_section(method: TrustMethod, out: Path, model_path: Path | None, values: dict) -> Section:
    """Run one method; its new PNG files become the section's figures. A method without the data it needs, one that
    is not installed, or one that refuses the data with a WbcError, leaves a visible note instead of stopping the
    whole report."""
    section = Section(method.title, method.what)
    if missing := method.missing(values):
        section.problem = f"needs {', '.join(missing)}"
        return section
    print(f"== {section.title}")
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    try:
        section.summary = method(model_path, out, values)
    except (ImportError, WbcError) as exc:
        section.problem = f"{exc.__class__.__name__}: {exc}"
        print(f"   skipped: {section.problem}")
    section.figures = sorted(p for p in out.glob("*.png") if before.get(p) != p.stat().st_mtime_ns)
    return section


def run_report(
    model_path: Path | None, data: Path, train_data: Path | None, out: Path, max_images: int | None = None
) -> Path:
    """Run every method of ``TRUST_METHODS`` into ``out`` and write ``out/report.html``; returns its path.
    ``max_images`` caps the images of the slow methods (robustness, Grad-CAM, Fisher, and influence's training and
    test images); ``train_data`` None leaves out the methods that need it (audit, influence)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = read_metadata(model_path or config.DEFAULT_MODEL_PATH)
    find_dataset(data, require_all_classes=False)  # a wrong --data fails here, before minutes of work
    values = {
        "data": data,
        "train_data": train_data,
        "max_images": max_images,
        "max_train": max_images,
        "max_test": max_images,
    }
    sections = [_run_section(method, out, model_path, values) for method in TRUST_METHODS]
    page = _TEMPLATE.render(
        model=str(model_path) if model_path else "default (shipped)",
        data=str(data),
        train_data=train_data,
        max_images=max_images,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sections=sections,
        metadata=metadata,
        credit=config.PBC_CREDIT,
        png=_png_data,
        tables=lambda summary: Markup(tables_html(summary)),
    )
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
