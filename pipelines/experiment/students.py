"""E4 of the experiment protocol: students of the teacher LM, each judged as an NLP feature.

Per student depth: SuKD (the joint model with a k-layer LM, click loss + distance to the
teacher's supplementary output), No-KD (the same without the distance) and feature-KD (the LM
alone, distance to the teacher's pooled vectors), all from `models/distill.py`. Every student is
measured as an NLP feature added to E0, which is how the paper deploys it, in both forms (its
pooled vector, and its click score: its own head's, or a probe's on its vectors).
"""

from __future__ import annotations

import shutil
import typing
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nlpctr.models import claims, distill
from nlpctr.models.ctr_net import Fusion
from nlpctr.models.data import Tensors
from nlpctr.models.device import Placement
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.increments import Conversion, FeatureJudge, RedundancyMeasure
from nlpctr.models.nlp_features import FORMS, SCORE, VECTOR, NlpFeature, feature_key
from nlpctr.models.prediction import predict
from nlpctr.models.results import RunEntry, StudentEntry, StudentForm, TeacherEntry
from nlpctr.models.runs import STUDENTS, StudentMeta, TrainedRun
from nlpctr.models.text_batches import TextBatcher, pair_units
from nlpctr.models.trainer import LoopConfig
from nlpctr.pipelines.experiment.config import Protocol

# A student's conversion rate when the teacher feature gains nothing significant over E0.
NOT_DISTILLED = Conversion(
    conversion_auc=None,
    conversion_auc_ci=None,
    conversion_rig=None,
    conversion_rig_ci=None,
    conversion_note=distill.NOTHING_TO_DISTIL,
)


class Experiment(typing.Protocol):
    """What E4 reads of the running protocol (`protocol.Experiment`), stated here so that this
    stage needs no import of the module that calls it."""

    protocol: Protocol
    judge: FeatureJudge
    runs: dict[str, RunEntry]
    runs_dir: Path
    placement: Placement
    seed: int
    progress: bool

    def stage(self, name: str) -> AbstractContextManager[None]: ...


def teacher_run(protocol: Protocol, valid_gain: Mapping[str, float]) -> str:
    """E4's teacher: the joint run named by `distill.teacher_fusion`, or with `best`, the one
    whose LM feature (score form) adds most to E0 on validation (the test split only judges)."""
    fusion = protocol.distill.teacher_fusion
    if fusion in protocol.fusions:  # (checked when E4 runs; else `best`)
        return f"joint_{fusion}"
    candidates = [f"joint_{f}" for f in protocol.fusions]
    return max(candidates, key=lambda run: valid_gain[feature_key(run, SCORE)])  # ties: the first listed


def student_feature(
    exp: Experiment, key: str, method: str, layers: int, teacher: TrainedRun, data: Tensors, targets: Targets
) -> tuple[NlpFeature, np.ndarray, TextEncoder]:
    """One student trained (`models/distill.py`) into `RUNS/_students/<key>/` (with the
    `student.json` that `nlpctr export` rebuilds it from): its feature on the shared frame's rows,
    its end-to-end test predictions and its LM. Feature-KD's end to end is E0 + its vector."""
    settings = exp.protocol.distill
    folder = exp.runs_dir / STUDENTS / key
    shutil.rmtree(folder, ignore_errors=True)  # a student never resumes another's weights
    teacher_name = teacher.directory.name
    rows_of_text = data.text_index.numpy()
    if method == "featurekd":
        text_loop = LoopConfig(**{**settings.feature_kd, "seed": exp.seed})
        student = distill.fit_feature_kd(
            teacher.lm, data, layers, text_loop, folder, targets.vectors, exp.progress
        )
        vectors = distill.pooled_vectors(student.lm, data).cpu().numpy()[rows_of_text]
        StudentMeta(key, method, layers, teacher_name, distill.FEATURE_KD_WEIGHTS).write(folder)
        return NlpFeature(key, "student", vectors), np.empty(0), student.lm
    joint_loop = LoopConfig(**{**settings.loop, "seed": exp.seed})
    weight = float(settings.weight) if method == "sukd" else 0.0
    joint = distill.fit_joint_student(
        teacher.model,
        teacher.lm,
        data,
        layers,
        weight,
        joint_loop,
        folder,
        targets.supplementary,
        exp.progress,
    )
    p = predict(joint.model, data, data.rows("test"), TextBatcher.for_data(joint.lm, data))
    vectors = distill.pooled_vectors(joint.lm, data)
    score = None
    assert joint.model.fusion is not None
    if joint.model.fusion.fusion == Fusion.SCORE:  # its own click head: the student's supplementary score
        joint.model.fusion.eval()
        with torch.inference_mode():
            score = joint.model.fusion.score(vectors).squeeze(-1).cpu().numpy()[rows_of_text]
    assert joint.result.checkpoint is not None
    StudentMeta(key, method, layers, teacher_name, str(joint.result.checkpoint.relative_to(folder))).write(
        folder
    )
    return NlpFeature(key, "student", vectors.cpu().numpy()[rows_of_text], score), p, joint.lm


@dataclass(frozen=True)
class Targets:
    """What students learn from the teacher, per unique pair of the shared frame."""

    supplementary: torch.Tensor  # SuKD: the fusion's output (score fusion: its logit)
    vectors: torch.Tensor  # feature-KD: the teacher LM's pooled vectors


def student_forms(
    judge: FeatureJudge,
    measures: Mapping[str, RedundancyMeasure],
    key: str,
    teacher: str,
    distillable: Mapping[str, bool],
) -> dict[str, StudentForm]:
    """Per form, the student feature's gain over E0 and its conversion rate against the teacher
    feature's, or "nothing to distil" where the teacher feature's own gain is not significant."""
    out: dict[str, StudentForm] = {}
    for form in FORMS:
        gain = judge.feature_entry(measures[feature_key(key, form)])
        if distillable[form]:
            rate = judge.conversion(feature_key(key, form), feature_key(teacher, form))
        else:
            rate = NOT_DISTILLED
        out[form] = StudentForm(**gain, **rate)
    return out


def distil(
    exp: Experiment, measures: dict[str, RedundancyMeasure]
) -> tuple[dict[str, StudentEntry], TeacherEntry]:
    """SuKD, No-KD and feature-KD students of the teacher LM (`teacher_run`).

    Every student's output is measured as an NLP feature added to E0 in both forms (into
    `measures`); per form, its conversion rate is that feature's gain over the teacher feature's,
    with a paired CI, or "nothing to distil" when the teacher feature's own gain over E0 is not
    significantly positive in that form.
    """
    protocol, judge = exp.protocol, exp.judge
    settings = protocol.distill
    teacher_name = teacher_run(protocol, judge.valid_gain)
    teacher = TrainedRun.load(exp.runs_dir / teacher_name, exp.placement)
    assert teacher.lm is not None
    data = teacher.pre.tensorize(judge.frame)
    targets = Targets(
        distill.supplementary_outputs(teacher.model, teacher.lm, data),
        distill.pooled_vectors(teacher.lm, data),
    )
    reading = teacher.lm.config.pair_reading  # encoder-only throughput: the texts the LM encodes
    pairs = data.texts[: int(settings.throughput_texts)]
    sample = [text for q, a in pairs for text in pair_units(q, a, reading) if text is not None]
    distillable = {
        form: claims.verdict(measures[feature_key(teacher_name, form)]["delta_auc_ci"]) == claims.HOLDS
        for form in FORMS
    }
    out: dict[str, StudentEntry] = {}
    speeds: dict[int, tuple[float, float]] = {}
    for layers in (int(k) for k in settings.students):
        for method in ("sukd", "nokd", "featurekd"):
            key = f"{method}_L{layers}"
            with exp.stage(f"distill_{key}"):
                feature, p, lm = student_feature(exp, key, method, layers, teacher, data, targets)
                measures.update(judge.judge(feature))
                if method == "featurekd":
                    p = judge.increments[feature_key(key, VECTOR)]  # deployed as E0 + its vector
                if layers not in speeds:  # timed side by side, on the same texts
                    speeds[layers] = (
                        distill.inference_rows_per_s(lm, sample),
                        distill.inference_rows_per_s(teacher.lm, sample),
                    )
                end_to_end = judge.student_entry(method, layers, p)
                forms = student_forms(judge, measures, key, teacher_name, distillable)
                out[key] = StudentEntry(
                    **end_to_end,
                    score=forms[SCORE],
                    vector=forms[VECTOR],
                    rows_per_s=speeds[layers][0],
                    teacher_rows_per_s=speeds[layers][1],
                )
    return out, teacher_entry(exp, teacher_name, measures, distillable)


def teacher_entry(
    exp: Experiment,
    teacher_name: str,
    measures: Mapping[str, RedundancyMeasure],
    distillable: Mapping[str, bool],
) -> TeacherEntry:
    """What the report says of the teacher: how it was chosen, end to end, and as a feature per form."""
    protocol, judge = exp.protocol, exp.judge
    run = exp.runs[teacher_name]
    score, vector = (judge.feature_entry(measures[feature_key(teacher_name, form)]) for form in FORMS)
    return TeacherEntry(
        run=teacher_name,
        fusion=teacher_name.removeprefix("joint_"),
        selected_by="validation ΔAUC of its LM feature (score form) over E0"
        if protocol.distill.teacher_fusion == "best"
        else "distill.teacher_fusion",
        valid_delta_auc={
            f"joint_{f}": judge.valid_gain[feature_key(f"joint_{f}", SCORE)] for f in protocol.fusions
        },
        layers=int(protocol.lm_layers),
        auc=run["auc"],
        rig=run["rig"],
        gauc=run["gauc"],
        score=score,
        vector=vector,
        nothing_to_distil={form: not ok for form, ok in distillable.items()},
    )
