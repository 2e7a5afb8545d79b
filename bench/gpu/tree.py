"""Import `nlpctr.models` from this tree, installed or not: the device machine has no install of
nlpctr (and no Beam or Feast, which `models/` never imports). Import this module first."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for folder in (str(HERE), str(ROOT)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import nlpctr  # noqa: E402

if str(ROOT) not in nlpctr.__path__:  # nlpctr.models -> ROOT/models, as the install maps it
    nlpctr.__path__.append(str(ROOT))
