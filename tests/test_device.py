"""`--device` and `--precision` (models/device.py): resolution, the one-line refusal, the CPU
golden, provenance, checkpoints that cross devices, precision, and the Beam workers' fall-back.

Tests that need a GPU are skipped, with the reason, where torch sees none and run where it does.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from apache_beam.options.pipeline_options import PipelineOptions
from device_golden import GOLDEN, THREADS, digest, prepare, train_runs
from test_trainer import COLUMNS, baseline, synthetic_frame

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.models.config import load_config
from nlpctr.models.ctr_net import TextScorer
from nlpctr.models.data import tensorize
from nlpctr.models.device import CPU, Placement, placement_of, resolve_device, resolve_precision
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.prediction import predict
from nlpctr.models.runs import TrainedRun
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import LAST, LoopConfig, fit
from nlpctr.pipelines import cli
from nlpctr.pipelines.devices import launch_device, worker_placement
from nlpctr.pipelines.encode_texts import TextEncoderModelHandler, TokenizedText
from nlpctr.pipelines.experiment.config import load_protocol
from nlpctr.pipelines.experiment.protocol import experiment_placement

CUDA = torch.cuda.is_available()  # (at import: tests/conftest.py hides CUDA from unmarked tests)


def needs_cuda(test: Any) -> Any:
    """Sees the machine's GPUs (`gpu`), and is skipped, with the reason, where there is none."""
    skip = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False")
    return pytest.mark.gpu(skip(test))


ROOT = Path(__file__).resolve().parents[1]
CPU_FP32 = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module", autouse=True)
def _the_goldens_threads() -> Iterator[None]:
    """Every run here at the golden's thread count (an xdist worker runs one: tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------- resolution


def test_auto_resolves_to_the_cpu_at_fp32_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert Placement.resolve() == CPU == Placement(torch.device("cpu"), "fp32")
    assert placement_of(load_config("joint")) == CPU  # default.yaml: device and precision auto
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast, on request


@pytest.mark.gpu
def test_auto_picks_cuda_when_there_is_one() -> None:
    expected = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert Placement.resolve().precision == ("fp32" if not CUDA else resolve_precision("auto", expected))


def test_the_yaml_sets_them_and_a_flag_wins(no_cuda: None, tmp_path: Path) -> None:
    own = tmp_path / "own.yaml"
    own.write_text("device: cpu\nprecision: bf16\n")
    assert placement_of(load_config("joint", own)) == Placement(torch.device("cpu"), "bf16")
    assert placement_of(load_config("joint", own, {"precision": "fp32"})) == CPU  # the flag's layer
    flags = argparse.Namespace(device=None, precision=None)
    protocol = load_protocol(True, None)
    assert experiment_placement(flags, dataclasses.replace(protocol, device="cpu", precision="auto")) == CPU
    with pytest.raises(UserError, match="--device cuda: torch "):  # experiment.yaml's values
        experiment_placement(flags, dataclasses.replace(protocol, device="cuda", precision="auto"))
    cuda = dataclasses.replace(protocol, device="cuda", precision=None)
    assert experiment_placement(argparse.Namespace(device="cpu", precision=None), cuda) == CPU


@pytest.mark.parametrize(
    ("device", "precision", "message"),
    [
        ("gpu", "auto", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("cuda:x", "auto", "--device must be"),
        ("cpu", "fp8", "--precision must be auto, bf16, fp16, fp32, got 'fp8'"),
        ("cpu", "fp16", "--precision fp16 needs a CUDA device"),
    ],
)
def test_bad_specs_are_one_line(device: str, precision: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        Placement.resolve(device, precision)


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The golden's synthetic dataset, prepared (store applied and materialised), and its config."""
    return prepare(tmp_path_factory.mktemp("device"))


@pytest.mark.parametrize("command", ["train", "experiment", "embed", "score-batch"])
def test_cuda_without_cuda_is_one_line_naming_the_fix(
    command: str, golden_data: tuple[Path, Path], tmp_path: Path, no_cuda: None, capsys: Any
) -> None:
    data = str(golden_data[0])
    argv = {
        "train": ["train", "--mode", "baseline", "--data", data, "--run", "r", "--runs-dir", str(tmp_path)],
        "experiment": ["experiment", "--dataset", "upworthy", "--out", str(tmp_path / "x")],
        "embed": ["embed", "--data", data],
        "score-batch": ["score-batch", "--data", data, "--run", "r", "--runs-dir", str(tmp_path)],
    }[command]
    assert cli.main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlpctr: error: --device cuda: ")
    assert "download.pytorch.org/whl/cu124" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "x").exists()  # refused before any work


@pytest.mark.skipif(CUDA, reason="checks the real refusal on a machine without CUDA; this one has it")
def test_the_real_cli_refuses_cuda_in_one_line(golden_data: tuple[Path, Path], tmp_path: Path) -> None:
    argv = ["train", "--mode", "baseline", "--data", str(golden_data[0]), "--run", "r"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlpctr.pipelines.cli",
            *argv,
            "--runs-dir",
            str(tmp_path),
            "--device",
            "cuda:1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert done.stderr.startswith("nlpctr: error: --device cuda:1: torch ")


def test_every_torch_load_names_its_map_location() -> None:
    """So a checkpoint written on a GPU loads on a CPU and the other way round."""
    calls = []
    for folder in ("models", "pipelines", "features", "nlpctr", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                func = node.func if isinstance(node, ast.Call) else None
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr == "load"
                    and getattr(func.value, "id", "") == "torch"
                ):
                    calls.append((path.relative_to(ROOT), node.lineno, {k.arg for k in node.keywords}))
    assert calls  # checkpoints go through models/checkpoints.py's load_checkpoint, whose torch.load it is
    assert [c for c in calls if "map_location" not in c[2]] == []


# ------------------------------------------------------------------------------- the CPU golden


@pytest.fixture(scope="module")
def golden_runs(golden_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data, config = golden_data
    runs = tmp_path_factory.mktemp("golden_runs")
    results = train_runs(data, config, runs, CPU_FP32)
    return {"data": data, "runs": runs, "results": results, "digest": digest(data, runs)}


@pytest.mark.slow
def test_device_cpu_reproduces_the_golden_bitwise(golden_runs: dict[str, Any]) -> None:
    """Predictions, every checkpoint tensor (weights, optimizer and RNG states) and the written LM
    features of tiny E0, E2 and joint runs, bit for bit as before --device existed."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["torch"].split("+")[0] == torch.__version__.split("+")[0], "the golden's torch"
    got = golden_runs["digest"]
    assert set(got) == set(golden["runs"]) == {"e0", "e2", "e3"}
    for run, parts in golden["runs"].items():
        for part, expected in parts.items():
            differ = sorted(
                k for k in expected.keys() | got[run][part].keys() if got[run][part].get(k) != expected.get(k)
            )
            assert differ == [], f"{run} {part}: {len(differ)} of {len(expected)} differ, e.g. {differ[:3]}"
    # E2 writes a score and a vector per LM-stage checkpoint: steps 0, 2, 4, 6 and 8
    assert len(got["e3"]["checkpoints"]) > 500 and len(got["e2"]["lm_features"]) == 10


@pytest.mark.slow
def test_runs_record_the_device_and_precision_they_used(golden_runs: dict[str, Any]) -> None:
    for name, results in golden_runs["results"].items():
        run_dir = golden_runs["runs"] / name
        expected = {"device": "cpu", "device_name": "cpu", "precision": "fp32", "torch": torch.__version__}
        assert {k: results["placement"][k] for k in expected} == expected
        assert json.loads((run_dir / "run.json").read_text())["placement"] == results["placement"]
        assert json.loads((run_dir / "results.json").read_text())["placement"] == results["placement"]
        assert results["config"]["device"] == "cpu" and results["config"]["precision"] == "fp32"
        # where a run ran is not what it is: config.json (its identity) leaves both out
        identity = json.loads((run_dir / "config.json").read_text())["config"]
        assert "device" not in identity and "precision" not in identity


@pytest.mark.slow
def test_a_run_started_under_one_placement_continues_under_another(golden_runs: dict[str, Any]) -> None:
    """The same run name with another --device/--precision is the same run (config.json matches)."""
    data, runs = golden_runs["data"], golden_runs["runs"]
    config = data.parent / "golden.yaml"
    argv = ["--mode", "baseline", "--data", str(data), "--run", "e0", "--runs-dir", str(runs)]
    again = cli.main(["train", *argv, "--config", str(config), "--device", "auto", "--no-progress"])
    assert again == 0  # not "exists with another configuration"
    before = golden_runs["digest"]["e0"]["predictions"]
    after = pd.read_parquet(runs / "e0" / "predictions.parquet").set_index("impression_id").p
    np.testing.assert_allclose(after[list(before)], [float.fromhex(v) for v in before.values()], atol=1e-6)


# ------------------------------------------------------------------------------- checkpoints


@contextmanager
def saved_as_on_cuda() -> Iterator[None]:
    """`torch.save` records every storage as on cuda:0, which is what a run on a GPU writes."""

    def tagger(storage: Any) -> str:
        return "cuda:0"

    torch.serialization.register_package(0, tagger, lambda storage, location: None)
    try:
        yield
    finally:
        registry = torch.serialization._package_registry
        registry[:] = [entry for entry in registry if entry[1] is not tagger]


def as_gpu_checkpoints(folder: Path) -> list[Path]:
    """Rewrite every checkpoint under `folder` as a GPU run would have written it."""
    paths = sorted(folder.rglob("*.pt"))
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with saved_as_on_cuda():
            torch.save(state, path)
    return paths


@pytest.fixture(scope="module")
def data():
    tensors, _ = tensorize(synthetic_frame(1200), COLUMNS, group="ad_id")
    return tensors


def test_a_gpu_checkpoint_resumes_on_the_cpu_to_the_same_weights(data, tmp_path: Path) -> None:
    config = LoopConfig(epochs=3, batch_size=128, patience=5)
    full = baseline(data)
    fit(full, data, config, tmp_path / "full", progress=False)
    fit(
        baseline(data),
        data,
        LoopConfig(epochs=1, batch_size=128, patience=5),
        tmp_path / "part",
        progress=False,
    )
    paths = as_gpu_checkpoints(tmp_path / "part")
    assert tmp_path / "part" / LAST in paths
    if not CUDA:  # without map_location a GPU checkpoint does not load here at all
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "part" / LAST, weights_only=True)
    resumed = baseline(data)
    result = fit(resumed, data, config, tmp_path / "part", progress=False)
    assert len(result.history) == 3 and result.steps > 0
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.slow
def test_a_gpu_trained_joint_run_loads_on_the_cpu(golden_runs: dict[str, Any], tmp_path: Path) -> None:
    source = golden_runs["runs"] / "e3"
    copy = tmp_path / "e3"
    shutil.copytree(source, copy)
    as_gpu_checkpoints(copy / "checkpoints")
    moved, original = TrainedRun.load(copy, CPU), TrainedRun.load(source)
    assert moved.lm is not None and original.lm is not None
    for a, b in ((moved.model, original.model), (moved.lm, original.lm)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert x.device.type == "cpu" and torch.equal(x, y), name


# ------------------------------------------------------------------------------- precision


def test_bf16_runs_the_lm_layers_in_autocast_and_pools_float32() -> None:
    config = EncoderConfig(layers=1, max_length=16)
    fp32, bf16 = TextEncoder(config), TextEncoder(config, placement=Placement(torch.device("cpu"), "bf16"))
    seen: list[torch.dtype] = []
    dense = bf16.model.encoder.layer[0].intermediate.dense  # (its LayerNorm runs float32 in autocast)
    dense.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    batch = fp32.pad([fp32.token_ids(t) for t in ("free shoes", "a broken old phone for sale")])
    with torch.inference_mode():
        exact, low = fp32(**batch), bf16(**batch)
    assert seen == [torch.bfloat16] and low.dtype == torch.float32
    assert not torch.equal(exact, low)
    torch.testing.assert_close(low, exact, atol=0.05, rtol=0.05)


def test_fp16_scales_the_loss_and_resumes_with_its_scaler(data, tmp_path: Path) -> None:
    """The GradScaler path of `fit` (fp16 is a CUDA format for users; torch runs it on the CPU too)."""
    fp16 = Placement(torch.device("cpu"), "fp16")
    lm = TextEncoder(EncoderConfig(layers=1, max_length=8, trainable_layers=1, freeze_embeddings=True),
                     trainable=True, placement=fp16)  # fmt: skip
    texts = TextBatcher.for_data(lm, data)
    torch.manual_seed(0)
    scorer = TextScorer(lm.dim)
    config = LoopConfig(epochs=1, batch_size=32, lm_lr=1e-4, max_batches_per_epoch=2, early_stop="auc")
    fit(scorer, data, config, tmp_path, texts=texts, progress=False)
    state = torch.load(tmp_path / LAST, map_location="cpu", weights_only=True)
    assert state["scaler"]["scale"] > 0 and "cuda_rng" not in state
    longer = dataclasses.replace(config, epochs=2)
    result = fit(scorer, data, longer, tmp_path, texts=texts, progress=False)
    assert [h.epoch for h in result.history] == [0, 1] and np.isfinite(result.history[-1].train_loss)
    assert all(torch.isfinite(p).all() for p in scorer.parameters())


# ------------------------------------------------------------------------------- Beam workers


def test_a_worker_without_the_gpu_warns_once_and_runs_on_the_cpu(no_cuda: None, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING):
        assert worker_placement("cuda") == CPU
    assert [r.getMessage() for r in caplog.records] == [
        "--device cuda: no CUDA device on this worker; running on the CPU"
    ]


def test_the_launcher_checks_the_device_only_where_the_workers_run(no_cuda: None) -> None:
    with pytest.raises(UserError, match="sees no CUDA device"):
        launch_device("cuda", PipelineOptions([]))  # the DirectRunner: workers on this machine
    remote = PipelineOptions(["--runner", "DataflowRunner"])
    assert launch_device("cuda:1", remote) == "cuda:1"  # its workers decide
    assert launch_device(None, PipelineOptions([])) == "cpu"
    with pytest.raises(UserError, match="--device must be"):
        launch_device("tpu", remote)


def test_the_embed_handler_loads_its_model_on_the_device_and_pools_like_encode() -> None:
    handler = TextEncoderModelHandler(EncoderConfig(layers=1, max_length=16), device="cpu")
    model = handler.load_model()
    assert model.device == torch.device("cpu") and model.placement == CPU
    texts = ["free shoes", "a broken old phone for sale", "best"]
    batch = [TokenizedText(str(i), 0, tuple(model.token_ids(t))) for i, t in enumerate(texts)]
    vectors = np.stack([r.inference.vector for r in handler.run_inference(batch, model)])
    np.testing.assert_allclose(vectors, model.encode(texts), atol=1e-6)


# ------------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.slow
def test_training_on_cuda_records_it_and_loads_on_the_cpu(tmp_path: Path) -> None:
    data, config = prepare(tmp_path)
    runs = tmp_path / "runs"
    results = train_runs(data, config, runs, ["--device", "cuda"])
    for result in results.values():
        assert result["placement"]["device"].startswith("cuda:")
        assert result["placement"]["precision"] == resolve_precision("auto", resolve_device("cuda"))
        assert result["placement"]["cuda"] == torch.version.cuda
    # GPU checkpoints on the CPU: E0 gives its GPU predictions; the joint run's LM trained and
    # predicted at bf16 there, and runs at float32 here
    for name, service, tolerance in (("e0", "baseline", 1e-5), ("e3", "baseline", 2e-2)):
        run = TrainedRun.load(runs / name, CPU)
        assert next(run.model.parameters()).device.type == "cpu"
        frame = store.training_frame(data, service, ["test"])
        tensors, p = run.predict_frame(frame)
        saved = pd.read_parquet(runs / name / "predictions.parquet").set_index("impression_id").p
        np.testing.assert_allclose(p, saved[list(tensors.impression_id)].to_numpy(), atol=tolerance)


@needs_cuda
def test_fp16_on_cuda_keeps_a_scaler_and_a_cuda_rng_in_last(data, tmp_path: Path) -> None:
    fp16 = Placement.resolve("cuda", "fp16")
    lm = TextEncoder(EncoderConfig(layers=1, max_length=8), trainable=True, placement=fp16)
    texts = TextBatcher.for_data(lm, data)
    torch.manual_seed(0)
    scorer = TextScorer(lm.dim).to(fp16.device)
    config = LoopConfig(epochs=1, batch_size=64, max_batches_per_epoch=3, early_stop="auc")
    result = fit(scorer, data, config, tmp_path, texts=texts, progress=False)
    last = torch.load(tmp_path / LAST, map_location="cpu", weights_only=True)
    assert "scaler" in last and "cuda_rng" in last
    best = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    cpu_scorer, cpu_lm = TextScorer(lm.dim), TextEncoder(EncoderConfig(layers=1, max_length=8))
    cpu_scorer.load_state_dict(best["model"])
    cpu_lm.load_state_dict(best["lm"])
    test = data.rows("test")
    p_gpu = predict(scorer, data, test, texts)
    p_cpu = predict(cpu_scorer, data, test, TextBatcher.for_data(cpu_lm, data))
    np.testing.assert_allclose(p_gpu, p_cpu, atol=5e-3)


@needs_cuda
def test_embeddings_on_cuda_match_the_cpu() -> None:
    texts = ["free shoes", "a broken old phone for sale", "best"]
    cpu = TextEncoder(EncoderConfig(layers=2)).encode(texts)
    gpu_model = TextEncoderModelHandler(EncoderConfig(layers=2), device="cuda").load_model()
    assert gpu_model.device.type == "cuda"
    np.testing.assert_allclose(gpu_model.encode(texts), cpu, atol=1e-4)
