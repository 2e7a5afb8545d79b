"""infra/: the Beam option files parse through the jobs' own option handling, and the
manifests are well-formed and agree with each other and with the pins (no cluster is run)."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    SparkRunnerOptions,
    StandardOptions,
    WorkerOptions,
)

from nlpctr.pipelines import ctr_stats, embed_text, ingest

INFRA = Path(__file__).resolve().parents[1] / "infra"
OPTION_FILES = sorted((INFRA / "beam").glob("*.options"))

# each Beam job's required flags; the option file's flags follow them, as on the command line.
# (score-batch parses the same way; importing it costs `import feast`, ~10 s, so it is left out.)
JOBS = {
    "data prepare": (ingest.parse_args, ["--dataset", "spec.yaml", "--out", "/data/out"]),
    "ctr-stats": (ctr_stats.parse_args, ["--data", "/data/out"]),
    "embed": (embed_text.parse_args, ["--data", "/data/out"]),
}


def option_lines(path: Path) -> list[str]:
    """What `$(cat FILE)` gives the shell: whitespace-separated words, no quoting, no comments."""
    return path.read_text().split()


def options_of(name: str) -> PipelineOptions:
    return PipelineOptions(option_lines(INFRA / "beam" / name))


def test_the_three_runners_have_option_files() -> None:
    assert {p.name for p in OPTION_FILES} >= {"flink.options", "spark.options", "dataflow.options"}


@pytest.mark.parametrize("path", OPTION_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_option_file_reaches_beam_untouched_through_every_job(path: Path, job: str) -> None:
    parse_args, required = JOBS[job]
    words = option_lines(path)
    assert all(w.startswith("--") and "=" in w for w in words), "one --flag=value per line"
    _, beam_args = parse_args([*required, *words])
    assert beam_args == words  # the job's own parser swallowed none of them
    # Beam knows every flag: an unknown one would be dropped with only a warning
    options = PipelineOptions(beam_args)
    known = options.get_all_options(retain_unknown_options=False)
    unknown = options.get_all_options(retain_unknown_options=True).keys() - known.keys()
    assert not unknown, f"{path.name}: Beam does not know {sorted(unknown)}"


def test_flink_options_target_the_compose_job_server_and_worker_pool() -> None:
    options = options_of("flink.options")
    portable = options.view_as(PortableOptions)
    assert options.view_as(StandardOptions).runner == "PortableRunner"
    assert portable.environment_type == "EXTERNAL"
    compose = yaml.safe_load((INFRA / "compose.flink.yaml").read_text())
    published = {port.split(":")[-2] for port in compose["services"]["flink-job-server"]["ports"]}
    assert portable.job_endpoint.rsplit(":", 1)[1] in published
    assert portable.artifact_endpoint.rsplit(":", 1)[1] in published
    # the worker pool shares the task manager's network, where localhost:50000 must reach it
    pool = compose["services"]["beam-worker-pool"]
    assert pool["network_mode"] == "service:taskmanager" and pool["command"] == ["--worker_pool"]
    assert portable.environment_config == "localhost:50000"
    assert options.view_as(FlinkRunnerOptions).parallelism >= 1


def test_flink_k8s_options_name_the_k8s_services() -> None:
    portable = options_of("flink-k8s.options").view_as(PortableOptions)
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "flink-jobserver.yaml").read_text()) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for endpoint in (portable.job_endpoint, portable.artifact_endpoint):
        host, port = endpoint.rsplit(":", 1)
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    taskmanager = next(d for d in docs if d["metadata"]["name"] == "flink-taskmanager")
    sidecars = {c["name"]: c for c in taskmanager["spec"]["template"]["spec"]["containers"]}
    assert sidecars["beam-worker-pool"]["ports"][0]["containerPort"] == 50000


def test_spark_options() -> None:
    options = options_of("spark.options")
    assert options.view_as(StandardOptions).runner == "SparkRunner"
    assert options.view_as(SparkRunnerOptions).spark_master_url.startswith("spark://")
    assert options.view_as(PortableOptions).environment_type == "EXTERNAL"


def test_dataflow_options_leave_site_values_to_the_command_line() -> None:
    site = ["--project=p", "--region=r", "--temp_location=gs://b/tmp", "--sdk_container_image=img:1"]
    options = PipelineOptions([*option_lines(INFRA / "beam" / "dataflow.options"), *site])
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(SetupOptions).sdk_location == "container"  # the image carries Beam
    assert options.view_as(WorkerOptions).sdk_container_image == "img:1"
    assert options.view_as(GoogleCloudOptions).project == "p"
    assert "project" not in options_of("dataflow.options").get_all_options(drop_default=True)


def test_sdk_image_matches_the_beam_pin() -> None:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    tag = re.search(r"^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)$", dockerfile, re.M)
    assert tag, "the image must build on Beam's own Python SDK container"
    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    # The tested set: constraints.txt pins what pyproject.toml states as ranges.
    lines = (INFRA.parent / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    assert tag.group(2) == pins["apache-beam"]
    assert tag.group(1) == project["requires-python"].split(",")[0].lstrip(">=")
    job_servers = [
        (INFRA / "compose.flink.yaml").read_text(),
        (INFRA / "k8s" / "flink-jobserver.yaml").read_text(),
    ]
    for text in job_servers:
        assert re.findall(r"beam_flink[\d.]+_job_server:(\S+)", text) == [pins["apache-beam"]]


@pytest.mark.parametrize("path", sorted(INFRA.glob("compose.*.yaml")), ids=lambda p: p.name)
def test_compose_files_parse(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    assert compose["services"]
    for name, service in compose["services"].items():
        assert service.get("image"), f"{path.name}: service {name} has no image"


def test_redis_is_where_the_feature_store_looks_by_default() -> None:
    compose = yaml.safe_load((INFRA / "compose.redis.yaml").read_text())
    template = INFRA.parent / "features" / "feature_store.redis.yaml"
    port = yaml.safe_load(template.read_text())["online_store"]["connection_string"].rsplit(":", 1)[1]
    assert any(p.endswith(f":{port}:{port}") for p in compose["services"]["redis"]["ports"])


@pytest.mark.parametrize("path", sorted((INFRA / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifests_parse_and_services_select_pods(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys() and doc["metadata"]["name"]
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pods), f"{service['metadata']['name']}"


def load_bench_scaling() -> ModuleType:  # bench/ holds scripts, not a package
    path = INFRA.parent / "bench" / "bench_scaling.py"
    spec = importlib.util.spec_from_file_location("bench_scaling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scaling_benchmark_fits_exponents_and_flags_worse_than_linear() -> None:
    bench = load_bench_scaling()

    def size(rows: int, prepare_s: float, embed_status: str = "ok") -> dict:
        stage = {"status": "ok", "wall_s": prepare_s, "cpu_s": prepare_s, "peak_rss_mib": 100.0}
        stage["reason"] = None
        failed = {**stage, "status": embed_status, "reason": None if embed_status == "ok" else "exit 1: boom"}
        return {"rows": rows, "unique_texts": 10, "stages": {"prepare": stage, "embed": failed}}

    # prepare: linear then quadratic; embed fails at the largest size and is left out of its fit
    sizes = [size(1_000, 1.0), size(10_000, 10.0), size(100_000, 1000.0, embed_status="failed")]
    growth = bench.growth(sizes)
    assert [round(step["wall"], 6) for step in growth["prepare"]] == [1.0, 2.0]
    assert [step["worse_than_linear"] for step in growth["prepare"]] == [False, True]
    assert [step["rss"] for step in growth["prepare"]] == [0.0, 0.0]
    assert len(growth["embed"]) == 1
    config = {"joint_batches": 5, "e0_epochs": 1}
    report = {"machine": bench.machine(), "config": config, "sizes": sizes, "growth": growth}
    text = bench.markdown(report)
    assert "**worse than linear**" in text and "**failed** after" in text and "exit 1: boom" in text
