"""One room per concern: `models/` (torch training, distillation, metrics, analysis) imports
neither Beam nor Feast nor the pipelines that drive it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import nlpctr.models


def test_models_import_no_beam_feast_or_pipelines() -> None:
    names = [f"nlpctr.models.{m.name}" for m in pkgutil.iter_modules(nlpctr.models.__path__)]
    assert "nlpctr.models.training" in names
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted({m.split('.')[0] if not m.startswith('nlpctr.') else '.'.join(m.split('.')[:2])\n"
        "              for m in sys.modules\n"
        "              if m.split('.')[0] in ('apache_beam', 'feast')\n"
        "              or m.startswith(('nlpctr.pipelines', 'nlpctr.features'))})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    assert out.stdout.strip() == ""
