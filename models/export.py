"""A trained LM taken away: rebuilt from a run folder or a student's, written as a transformers
`save_pretrained` folder with its click head, read back the way a user would, and as ONNX.

The one place that computes an exported LM's output from the saved files (`FolderScorer`:
texts, AutoModel, pooling, click head), so `nlpctr export`'s check and the tests read the
folder as a user would. No Beam and no Feast. The four steps: docs/DESIGN.md, "Modules in
detail", models/export.py.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.layout import RunLayout
from nlpctr.models import distill
from nlpctr.models.checkpoints import load_checkpoint
from nlpctr.models.config import Mode, TrainConfig
from nlpctr.models.ctr_net import Fusion
from nlpctr.models.encoder import TextEncoder, pool
from nlpctr.models.runs import StudentMeta, TrainedRun, build_scorer
from nlpctr.models.text_batches import Pair, TextBatcher, pair_text

HEAD_WEIGHTS = "click_head.safetensors"
HEAD_FILE = "click_head.json"
EXPORT_FILE = "nlpctr_export.json"  # what the export came from, and its checks
ONNX_FILE = "model.onnx"


@dataclass
class ExportedLM:
    """An LM with its head, and what a user needs to know to compute what the run computed."""

    name: str  # the run or the student key
    kind: str  # cascade_finetuned | joint | student
    lm: TextEncoder
    head: nn.Sequential | None  # None: the pooled vector is the output
    output: str  # logit | vector
    with_query: bool  # the run's data had query texts (a separate reading's vector is then 3d)
    description: str  # one sentence for the model card
    source: Path  # the run (or the teacher's run) folder
    student: StudentMeta | None = None

    @property
    def reading(self) -> str:
        return self.lm.config.pair_reading

    def outputs(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """(pair vectors, head outputs) of the run's own model: the reference an export is checked on."""
        self.lm.eval()
        vectors = TextBatcher(self.lm, self.with_query).encode_pairs(pairs)
        if self.head is None:
            return vectors.numpy(), vectors.numpy()
        self.head.eval()
        with torch.inference_mode():
            return vectors.numpy(), self.head(vectors).squeeze(-1).numpy()


# ------------------------------------------------------------------------------- rebuilding


def _sequential(module: nn.Module) -> nn.Sequential:
    head = module if isinstance(module, nn.Sequential) else nn.Sequential(module)
    return copy.deepcopy(head).eval()


def _results(run_dir: Path) -> JsonObject:
    path = RunLayout(run_dir).results
    if not path.is_file():
        raise UserError(f"{run_dir} has no {RunLayout.RESULTS}: the run has not finished; train it again")
    return json.loads(path.read_text())


def lm_of_run(run_dir: Path) -> ExportedLM:
    """E2's fine-tuned LM (its chosen epoch, with its click head) or a joint run's LM (with its
    fusion head) from a finished `nlpctr train` run folder.

    Args:
        run_dir: the run folder, `RUNS/NAME/`.

    Returns:
        The LM, its click head and how it reads a pair, as an `ExportedLM`.

    Raises:
        UserError: the run has no LM (baseline, cascade-frozen) or has not finished.
    """
    path = RunLayout(run_dir).run
    if not path.is_file():
        raise UserError(f"{run_dir} is not a finished run (no {RunLayout.RUN}); train it with `nlpctr train`")
    spec = json.loads(path.read_text())
    mode = spec["mode"]
    if not Mode(mode).trains_lm:
        raise UserError(
            f"run {run_dir.name} is a {mode} run: it has no LM to export; export a cascade-finetuned "
            "or joint run, or a student of the experiment (RUNS/_students/<key>)"
        )
    if mode == Mode.JOINT:
        run = TrainedRun.load(run_dir)
        assert run.lm is not None and run.model.fusion is not None
        fusion = run.model.fusion
        score = fusion.fusion == Fusion.SCORE
        head = _sequential(fusion.score if score else fusion.project)
        what = (
            "the supplementary logit it adds to E0's"
            if score
            else "the projected vector that joins E0's tower"
        )
        description = f"the LM of joint run {run_dir.name} (fusion {fusion.fusion}); its head gives {what}"
        with_query = bool(spec.get("text_with_query", False))
        return ExportedLM(
            run_dir.name,
            "joint",
            run.lm,
            head,
            "logit" if score else "vector",
            with_query,
            description,
            run_dir,
        )
    lm_step = _results(run_dir).get("lm") or {}
    chosen = lm_step.get("chosen")  # `step-<k>` of the LM stage (models/recipe.py, stage1)
    checkpoint = RunLayout(run_dir).checkpoints("lm") / "stage1" / f"{chosen}.pt"
    if not chosen or not checkpoint.is_file():
        raise UserError(f"{run_dir} has no chosen LM checkpoint ({checkpoint}); train the run again")
    state = load_checkpoint(checkpoint, fix=f"delete the run and retrain it (`rm -r {run_dir}`)")
    config = TrainConfig.from_dict(spec["config"])
    lm = TextEncoder(config.encoder)
    lm.load_state_dict(state["lm"])
    width = int(
        state["model"]["head.0.weight"].shape[1]
    )  # 3 x the LM's width: a separate reading with queries
    scorer = build_scorer(config, width)
    scorer.load_state_dict(state["model"])
    description = (
        f"the LM of run {run_dir.name}, fine-tuned alone on clicks (E2) and stopped at its peak "
        f"validation AUC ({chosen}); its head gives a click logit from the text alone"
    )
    with_query = width == 3 * lm.dim and lm.config.pair_reading == "separate"
    return ExportedLM(
        run_dir.name,
        "cascade_finetuned",
        lm,
        _sequential(scorer.head),
        "logit",
        with_query,
        description,
        run_dir,
    )


def lm_of_student(folder: Path, runs_dir: Path) -> ExportedLM:
    """An E4 student (RUNS/_students/<key>) rebuilt on its teacher's run (`StudentMeta`).

    Args:
        folder: the student's folder, `RUNS/_students/<key>/`.
        runs_dir: the experiment's runs folder holding the teacher run.

    Returns:
        The student as an `ExportedLM` (no head for a feature-KD student).

    Raises:
        UserError: no complete student.json, the teacher run gone, or the student's checkpoint
            missing or damaged.
    """
    meta = StudentMeta.read(folder)
    teacher_dir = runs_dir / meta.teacher
    if not RunLayout(teacher_dir).run.is_file():
        raise UserError(f"student {meta.key}'s teacher run {teacher_dir} is gone; it cannot be rebuilt")
    teacher = TrainedRun.load(teacher_dir)
    assert teacher.lm is not None and teacher.model.fusion is not None
    lm = distill.student_encoder(teacher.lm, meta.layers)
    state = load_checkpoint(
        folder / meta.checkpoint, fix="re-run the experiment into its folder to train E4 again"
    )
    with_query = bool(teacher.spec.get("text_with_query", False))
    about = f"a {meta.layers}-layer {meta.method} student of joint run {meta.teacher}"
    if meta.method == "featurekd":
        lm.load_state_dict(state)
        description = f"{about}, trained to reproduce its teacher LM's pooled vector (no click head)"
        return ExportedLM(meta.key, "student", lm, None, "vector", with_query, description, teacher_dir, meta)
    lm.load_state_dict(state["lm"])
    model = copy.deepcopy(teacher.model)
    model.load_state_dict(state["model"])
    assert model.fusion is not None
    score = model.fusion.fusion == Fusion.SCORE
    head = _sequential(model.fusion.score if score else model.fusion.project)
    description = f"{about} (fusion {model.fusion.fusion}); its head is the student's fusion head"
    return ExportedLM(
        meta.key,
        "student",
        lm,
        head,
        "logit" if score else "vector",
        with_query,
        description,
        teacher_dir,
        meta,
    )


# ------------------------------------------------------------------------------- the folder


def head_description(exported: ExportedLM) -> JsonObject:
    """click_head.json: how the folder's files compute a pair's output (the module docstring)."""
    config = exported.lm.config
    layers: list[JsonObject] = []
    for index, module in enumerate(exported.head or []):
        if isinstance(module, nn.Linear):
            layers.append(
                {
                    "op": "linear",
                    "in": module.in_features,
                    "out": module.out_features,
                    "weight": f"{index}.weight",
                }
                | ({"bias": f"{index}.bias"} if module.bias is not None else {})
            )
        elif isinstance(module, nn.Tanh):
            layers.append({"op": "tanh"})
        else:
            raise TypeError(f"cannot describe head layer {module!r}")
    separate = config.pair_reading == "separate"
    return {
        "format": "nlpctr click head 1",
        "pooling": config.pooling,
        "max_length": config.max_length,
        "pair_reading": config.pair_reading,
        "pair_text": None if separate else "{query} [SEP] {ad} (the ad alone without a query)",
        "pair_vector": "[u_query, u_ad, u_query * u_ad] (u_query = 0 without a query)"
        if separate and exported.with_query
        else "the pooled vector",
        "input_dim": exported.lm.dim * (3 if separate and exported.with_query else 1),
        "output": exported.output if exported.head is not None else "vector",
        "layers": layers,
        "weights": HEAD_WEIGHTS if exported.head is not None else None,
    }


def save_folder(exported: ExportedLM, out: Path) -> JsonObject:
    """The transformers folder (config, safetensors, tokenizer) plus the click head's files;
    returns the head's description.

    Args:
        exported: the LM and head to save.
        out: the folder to write into (the caller's staging folder).

    Returns:
        The head's description, as written to `click_head.json`.
    """
    exported.lm.model.save_pretrained(out, safe_serialization=True)
    exported.lm.tokenizer.save_pretrained(out)
    description = head_description(exported)
    if exported.head is not None:
        state = {k: v.detach().contiguous() for k, v in exported.head.state_dict().items()}
        save_file(state, out / HEAD_WEIGHTS, metadata={"format": "pt"})
    (out / HEAD_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


class FolderScorer:
    """An exported folder read back with transformers' `AutoModel`/`AutoTokenizer` and its head's
    files alone: what a user's code does with it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.head_spec = json.loads((self.folder / HEAD_FILE).read_text())
        self.head = self._head()

    def _head(self) -> nn.Sequential | None:
        if not self.head_spec["layers"]:
            return None
        weights = load_file(self.folder / self.head_spec["weights"])
        modules: list[nn.Module] = []
        for layer in self.head_spec["layers"]:
            if layer["op"] == "tanh":
                modules.append(nn.Tanh())
                continue
            linear = nn.Linear(layer["in"], layer["out"], bias="bias" in layer)
            linear.weight.data.copy_(weights[layer["weight"]])
            if "bias" in layer:
                linear.bias.data.copy_(weights[layer["bias"]])
            modules.append(linear)
        return nn.Sequential(*modules).eval()

    def vectors(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Pooled vectors of texts, each tokenised and truncated at the export's max_length."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.head_spec["max_length"],
                    return_tensors="pt",
                )
                mask = batch["attention_mask"]
                hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
                out.append(pool(hidden, mask, self.head_spec["pooling"]))
        return torch.cat(out) if out else torch.empty((0, self.model.config.hidden_size))

    def pair_vectors(self, pairs: Sequence[Pair]) -> torch.Tensor:
        if self.head_spec["pair_reading"] != "separate":
            return self.vectors([pair_text(q, a) for q, a in pairs])
        ads = self.vectors([a for _, a in pairs])
        if self.head_spec["pair_vector"] == "the pooled vector":
            return ads
        asked = [i for i, (q, _) in enumerate(pairs) if q]
        queries = torch.zeros_like(ads)
        if asked:
            queries[asked] = self.vectors([pairs[i][0] or "" for i in asked])
        return torch.cat([queries, ads, queries * ads], dim=1)

    def outputs(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """(pair vectors, head outputs) as `ExportedLM.outputs` gives them."""
        vectors = self.pair_vectors(pairs)
        if self.head is None:
            return vectors.numpy(), vectors.numpy()
        with torch.inference_mode():
            return vectors.numpy(), self.head(vectors).squeeze(-1).numpy()


# ------------------------------------------------------------------------------- ONNX


class _OnnxGraph(nn.Module):
    """Token ids -> the pooled vector (and the head's output when it reads one text's vector)."""

    def __init__(self, model: nn.Module, pooling: str, head: nn.Sequential | None) -> None:
        super().__init__()
        self.model, self.pooling, self.head = model, pooling, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vector = pool(hidden, attention_mask, self.pooling)  # type: ignore[arg-type]
        if self.head is None:
            return vector
        return vector, self.head(vector).squeeze(-1)


def onnx_available() -> None:
    """Raise the one-line fix when the ONNX exporter or runtime is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--onnx needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
            "pip install 'nlpctr[onnx]'"
        ) from None


def export_onnx(folder: Path, path: Path, texts: Sequence[str]) -> JsonObject:
    """The folder's model (AutoModel), pooling and, when it reads one text's vector, its click
    head as one ONNX graph (inputs input_ids and attention_mask, batch and length dynamic;
    outputs `pooled_vector` and `head_output`); checked with onnxruntime against the folder on
    `texts`. Returns its inputs, outputs and the largest difference.

    Args:
        folder: an exported transformers folder (`save_folder`'s).
        path: the ONNX file to write.
        texts: sample texts; the first two trace the graph, all of them check it.

    Returns:
        `file`, `inputs`, `outputs`, `texts_checked` and `max_abs_diff` against the folder.

    Raises:
        ImportError: onnxruntime is not installed (callers check `onnx_available` first).
    """
    import onnxruntime

    scorer = FolderScorer(folder)
    spec = scorer.head_spec
    one_text = spec["pair_vector"] == "the pooled vector"
    head = scorer.head if one_text else None
    graph = _OnnxGraph(scorer.model, spec["pooling"], head).eval()
    sample = scorer.tokenizer(
        list(texts[:2]), padding=True, truncation=True, max_length=spec["max_length"], return_tensors="pt"
    )
    outputs = ["pooled_vector", *(["head_output"] if head is not None else [])]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    dims = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    # The exporter warns about torchvision's ops and its own axis renaming, none of which this
    # graph has: kept from the user's terminal.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (sample["input_ids"], sample["attention_mask"]),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=outputs,
                dynamic_shapes=dims,
                external_data=False,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = scorer.tokenizer(
        list(texts), padding=True, truncation=True, max_length=spec["max_length"], return_tensors="pt"
    )
    got = session.run(
        None, {"input_ids": check["input_ids"].numpy(), "attention_mask": check["attention_mask"].numpy()}
    )
    with torch.inference_mode():
        want = graph(check["input_ids"], check["attention_mask"])
    want = want if isinstance(want, tuple) else (want,)
    diff = max(float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want, strict=True))
    return {
        "file": path.name,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": outputs,
        "texts_checked": len(texts),
        "max_abs_diff": diff,
    }
