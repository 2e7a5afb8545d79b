"""The wheel installs beside a team's own stack: pyproject.toml's ranges, not constraints.txt.

A fresh venv holds the team's own versions of the libraries nlpctr shares with most stacks,
older than the tested ones but inside the stated ranges (pandas, numpy, scikit-learn,
transformers, matplotlib, installed from the package index). The heavy rest (torch, Beam,
Feast, pyarrow, ...) is what this checkout's venv already has, made visible to the fresh venv
through a .pth file, as a base image would provide it; the fresh venv's own packages come first
on its path. The wheel, built from this checkout, is then installed with `--no-index` and no
constraints: every requirement must be met by what is there, so pip may change nothing. Then
`pip check`, `nlpctr --help`, and a prepare + metrics + tensorize run on the team's versions.

Tens of seconds (docs/USAGE.md has the measurement); marked `install`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.install, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# The team's stack: each older than constraints.txt's pin, inside pyproject.toml's range.
TEAM_STACK = {
    "pandas": "2.2.3",
    "numpy": "2.1.3",
    "scikit-learn": "1.6.1",
    "transformers": "5.18.0",
    "matplotlib": "3.10.9",
}
SMOKE = """
import json, sys
import matplotlib, numpy as np, pandas as pd, sklearn, transformers, nlpctr
from nlpctr.models import metrics
from nlpctr.models.data import FeatureColumns, tensorize
rng = np.random.default_rng(0)
clicks = (rng.random(400) < 0.3).astype(np.int64)
labels = metrics.Labels(np.ones(400, np.int64), clicks, np.repeat(np.arange(40), 10).astype(str))
auc = metrics.auc(labels, np.clip(0.3 + 0.2 * (clicks - 0.3) + rng.normal(0, 0.1, 400), 0.01, 0.99))
frame = pd.DataFrame({
    "impression_id": [str(i) for i in range(400)], "split": ["train"] * 300 + ["test"] * 100,
    "ad_id": [str(i % 7) for i in range(400)], "ad_text": ["a"] * 400, "impressions": 1,
    "clicks": clicks, "c__ctr": 0.3, "c__n": 5.0, "numeric__x": rng.normal(3, 2, 400),
})
columns = FeatureColumns(categorical=("ad_id",), ctr=("c__ctr",), counts=("c__n",), numeric=("numeric__x",))
tensors, _ = tensorize(frame, columns, "ad_id")
print(json.dumps({"auc": auc, "dense": list(tensors.dense.shape), "pandas": pd.__version__,
                  "numpy": np.__version__, "sklearn": sklearn.__version__,
                  "transformers": transformers.__version__, "matplotlib": matplotlib.__version__,
                  "nlpctr": nlpctr.__file__}))
"""


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Error" in line]
    assert done.returncode == 0, f"{' '.join(argv[:4])} ...: {errors[-3:] or done.stderr[-2000:]}"
    return done


def test_the_wheel_installs_beside_older_in_range_packages(tmp_path: Path) -> None:
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def step(name: str) -> None:
        steps[name] = round(time.perf_counter() - started - sum(steps.values()), 1)

    wheels = tmp_path / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ]
    )
    (wheel,) = wheels.glob("nlpctr-*.whl")
    step("wheel")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # Python 3.11's venv seeds an old setuptools, which would shadow the one torch requires.
    run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
    pins = [f"{name}=={version}" for name, version in TEAM_STACK.items()]
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", *pins])
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    # The tested heavy packages, as a base image would have them: after the venv's own.
    Path(purelib, "zz_base_image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    step("venv with the team's stack")

    report_file = tmp_path / "report.json"
    install = ["install", "-q", "--no-index", "--find-links", str(wheels), "--report", str(report_file)]
    run([str(python), "-m", "pip", *install, str(wheel)])
    report = json.loads(report_file.read_text())
    assert [item["metadata"]["name"] for item in report["install"]] == ["nlpctr"]  # nothing else changed
    run([str(python), "-m", "pip", "check"])
    step("install the wheel, pip check")

    assert "commands:" in run([str(venv / "bin" / "nlpctr"), "--help"]).stdout
    smoke = json.loads(run([str(python), "-c", SMOKE], cwd=tmp_path).stdout.strip().splitlines()[-1])
    for name, version in TEAM_STACK.items():
        assert smoke[name.replace("scikit-learn", "sklearn")] == version  # the team's, not ours
    assert Path(smoke["nlpctr"]).is_relative_to(venv)  # the wheel's, not this checkout
    assert smoke["dense"] == [400, 3] and 0.5 < smoke["auc"] <= 1
    prepared = run(
        [
            str(venv / "bin" / "nlpctr"),
            "data",
            "prepare",
            "--dataset",
            "trec2013",
            "--out",
            str(tmp_path / "trec"),
        ],
        cwd=tmp_path,
    )
    assert "prepared trec2013: 4449 rows in" in prepared.stdout
    step("nlpctr --help, smoke, data prepare")
    print(f"fresh-venv install test: {time.perf_counter() - started:.1f} s {steps}")
