"""The core (everything outside ``wbc_trust/trust``) stands on its own: ``wbc predict`` loads neither the trust
package nor the report libraries (matplotlib, torchmetrics), and no core module (the front ends cli.py and app.py aside) imports ``wbc_trust.trust``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import pbc_files

CORE = Path(__file__).resolve().parents[1] / "src" / "wbc_trust"
NOT_FOR_PREDICT = ("matplotlib", "torchmetrics", "wbc_trust.trust")
#: The front ends sit above both the core and the trust package (``wbc trust ...``, the app's explanations).
FRONT_ENDS = {"cli.py", "app.py"}


def test_predicting_one_real_image_loads_no_report_libraries() -> None:
    image = pbc_files("neutrophil", 1)[0]
    script = (
        "import json, sys\n"
        "from wbc_trust.predict import Predictor\n"
        f"prediction = Predictor().predict_files([{str(image)!r}], progress=False)[0]\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_FOR_PREDICT!r} or m.startswith('wbc_trust.trust'))\n"
        "print(json.dumps({'prediction': prediction.prediction, 'flag': prediction.flag,\n"
        "                  'set': prediction.prediction_set, 'loaded': loaded}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["prediction"] == "neutrophil", result  # it really predicted (calibrated: the set is filled in)
    assert result["set"] is not None, result
    assert result["loaded"] == [], f"wbc predict imported {result['loaded']}"


def test_no_core_module_imports_the_trust_package() -> None:
    offenders = []
    for path in sorted(p for p in CORE.glob("*.py") if p.name not in FRONT_ENDS):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n == "wbc_trust.trust" or n.startswith("wbc_trust.trust.")
            ]
    assert offenders == [], offenders
