"""Frozen-prefix states kept on disk (models/state_store.py), side by side in one run.

    .venv/bin/python bench/bench_state_store.py --data DIR [--trainable-layers 2] [--student-layers 2]
        [--out bench/results/state_store]

DIR is a prepared, materialised dataset (as for bench_joint.py). Four prefills on one state
root, each as a new process (`measure` describes them): a joint run that builds the states, a
second that reads them back, another encoder version, and an E4 student. Writes `OUT.json` and
`OUT.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_joint import load_data  # (bench/ is this script's folder: on sys.path)

from nlpctr.models.data import Tensors
from nlpctr.models.distill import student_encoder
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.state_cache import clear_state_caches
from nlpctr.models.state_store import persisted_states
from nlpctr.models.text_batches import TextBatcher


def prefill(lm: TextEncoder, data: Tensors, root: Path) -> dict[str, Any]:
    """One run's prefill under `root`: texts, how many computed, wall and CPU seconds."""
    texts = TextBatcher.for_data(lm, data)
    with persisted_states(root):
        wall, cpu = time.perf_counter(), time.process_time()
        computed = texts.prefill()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    unique = len(dict.fromkeys(tuple(u) for u in texts.units))
    return {
        "texts": unique,
        "computed": computed,
        "read_back": unique - computed if lm.state_cache is not None else 0,  # (no frozen prefix: none kept)
        "wall_s": wall,
        "cpu_s": cpu,
    }


def folders(root: Path) -> dict[str, int]:
    """Each prefix folder under `root` and the bytes it holds."""
    if not root.exists():
        return {}
    return {f.name: sum(p.stat().st_size for p in f.iterdir()) for f in sorted(root.iterdir())}


def fresh(config: EncoderConfig) -> TextEncoder:
    clear_state_caches()  # a new process: nothing in memory
    return TextEncoder(config, trainable=True)


def measure(data: Tensors, root: Path, trainable: int, student_layers: int) -> dict[str, dict[str, Any]]:
    """The four runs, in order, on one root:
    - `joint_builds`: a joint run's prefill (`TextBatcher.prefill`, as `fit_recipe` starts) on an
      empty root: every text's states computed and written;
    - `joint_reuses`: a second joint run with the same encoder prefix: read back, none computed,
      bit for bit the first run's states;
    - `encoder_changed`: the same prefix with another encoder version (`max_length` + 8): its
      own folder, every state computed again (the first folder stays);
    - `student`: an E4 student of the first run's LM (`distill.student_encoder`): every layer of
      a student trains, so it has no frozen prefix and neither reads nor writes states.
    """
    config = EncoderConfig(layers=6, trainable_layers=trainable, freeze_embeddings=True)
    runs: dict[str, dict[str, Any]] = {}
    first = fresh(config)
    runs["joint_builds"] = {**prefill(first, data, root), "prefix_folder": folder_of(first)}
    built = folders(root)
    second = fresh(config)
    runs["joint_reuses"] = {**prefill(second, data, root), "prefix_folder": folder_of(second)}
    assert first.state_cache is not None and second.state_cache is not None
    states, again = first.state_cache.states, second.state_cache.states
    runs["joint_reuses"]["bit_for_bit"] = states.keys() == again.keys() and all(
        torch.equal(state, again[key]) for key, state in states.items()
    )
    changed = fresh(dataclasses.replace(config, max_length=config.max_length + 8))
    runs["encoder_changed"] = {**prefill(changed, data, root), "prefix_folder": folder_of(changed)}
    runs["encoder_changed"]["first_folder_kept"] = folders(root).items() >= built.items()
    clear_state_caches()
    student = student_encoder(first, student_layers)
    before = folders(root)
    runs["student"] = {**prefill(student, data, root), "prefix_folder": folder_of(student)}
    runs["student"]["folders_unchanged"] = folders(root) == before
    return runs


def folder_of(lm: TextEncoder) -> str | None:
    """The folder an encoder keeps its states in; None without a frozen prefix."""
    return lm.prefix_key.folder_name if lm.state_cache is not None else None


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    build = runs["joint_builds"]
    lines = [
        f"# Frozen-prefix states on disk ({result['dataset']})",
        "",
        f"MiniLM, 6 layers, the top {result['trainable_layers']} trained: the states after the "
        f"{6 - result['trainable_layers']} frozen layers, {build['texts']:,} texts; one run, in this "
        f"order, each as a new process; {result['machine']}; {result['when']}; load average "
        f"{result['load_average']['start']:.1f} at the start, {result['load_average']['end']:.1f} at the "
        "end (a shared machine: CPU seconds are the steadier figure). `bench/bench_state_store.py` "
        "describes the runs.",
        "",
        "| run | prefix folder | computed | read back | wall s | CPU s | CPU × the build |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        ratio = f"{run['cpu_s'] / build['cpu_s']:.3f}" if run["prefix_folder"] else "–"
        lines.append(
            f"| {name} | {run['prefix_folder'] or '– (none)'} | {run['computed']:,} | {run['read_back']:,} "
            f"| {run['wall_s']:.2f} | {run['cpu_s']:.2f} | {ratio} |"
        )
    reuse, changed, student = runs["joint_reuses"], runs["encoder_changed"], runs["student"]
    lines += [
        "",
        f"The reused states equal the built ones bit for bit: {reuse['bit_for_bit']}. Another encoder "
        f"version computes its own (first folder kept: {changed['first_folder_kept']}). A student has a "
        f"frozen prefix: {student['prefix_folder'] is not None} "
        f"(folders unchanged: {student['folders_unchanged']}). "
        f"On disk: {', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in result['folders'].items())}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--student-layers", type=int, default=2, help="the student's k (E4: 1, 2 or 3)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/state_store"))
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    load_start = os.getloadavg()[0]
    manifest, _, data = load_data(args.data)
    root = Path(tempfile.mkdtemp(prefix="bench_state_store_"))
    try:
        runs = measure(data, root, args.trainable_layers, args.student_layers)
        stored = folders(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "dataset": manifest["dataset"],
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}",
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "trainable_layers": args.trainable_layers,
        "runs": runs,
        "folders": stored,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
