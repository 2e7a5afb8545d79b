"""E4 of the experiment protocol: students of the teacher LM, each judged as an NLP feature.

Per student depth: SuKD (the joint model with a k-layer LM, click loss + distance to the
teacher's supplementary output), No-KD (the same without the distance) and feature-KD (the LM
alone, distance to the teacher's pooled vectors), all from `models/distill.py`. Every student's
output is measured as an NLP feature added to E0, which is how the paper deploys it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nlpctr.models import claims, distill
from nlpctr.models.config import loop_config
from nlpctr.models.nlp_features import NlpFeature
from nlpctr.models.runs import TrainedRun
from nlpctr.models.text_batches import TextBatcher, pair_units
from nlpctr.models.trainer import predict

if TYPE_CHECKING:  # (the protocol calls this stage; a runtime import would be circular)
    from nlpctr.pipelines.protocol import Experiment

# A student's conversion rate when the teacher feature gains nothing significant over E0.
NOT_DISTILLED = {
    "conversion_auc": None,
    "conversion_auc_ci": None,
    "conversion_rig": None,
    "conversion_rig_ci": None,
    "conversion_note": distill.NOTHING_TO_DISTIL,
}


def teacher_run(protocol: Mapping[str, Any], valid_gain: Mapping[str, float]) -> str:
    """E4's teacher: the joint run named by `distill.teacher_fusion`, or with `best`, the one
    whose LM feature adds most to E0 on validation (the test split only judges)."""
    fusion = protocol["distill"]["teacher_fusion"]
    if fusion in protocol["fusions"]:  # (checked when E4 runs; else `best`)
        return f"joint_{fusion}"
    candidates = [f"joint_{f}" for f in protocol["fusions"]]
    return max(candidates, key=lambda run: valid_gain[run])  # ties: the first listed


def distil(exp: Experiment, measures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """SuKD, No-KD and feature-KD students of the teacher LM (`teacher_run`).

    Every student's output is measured as an NLP feature added to E0 (into `measures`); its
    conversion rate is that feature's gain over the teacher feature's, with a paired CI, or
    "nothing to distil" when the teacher feature's own gain over E0 is not significantly positive.
    """
    protocol, judge = exp.protocol, exp.judge
    settings = protocol["distill"]
    teacher_name = teacher_run(protocol, judge.valid_gain)
    teacher = TrainedRun.load(exp.runs_dir / teacher_name, exp.placement)
    assert teacher.lm is not None
    data = teacher.pre.tensorize(judge.frame)
    test = data.rows("test")
    joint_loop = loop_config({"loop": {**settings["loop"], "seed": exp.seed}})
    text_loop = loop_config({"loop": {**settings["feature_kd"], "seed": exp.seed}})
    targets = distill.supplementary_outputs(teacher.model, teacher.lm, data)
    teacher_vectors = distill.pooled_vectors(teacher.lm, data)
    reading = teacher.lm.config.pair_reading  # encoder-only throughput: the texts the LM encodes
    pairs = data.texts[: int(settings["throughput_texts"])]
    sample = [text for q, a in pairs for text in pair_units(q, a, reading) if text is not None]
    rows_of_text = data.text_index.numpy()
    teacher_feature = measures[teacher_name]
    distillable = claims.verdict(teacher_feature["delta_auc_ci"]) == claims.HOLDS
    out: dict[str, Any] = {}
    speeds: dict[int, tuple[float, float]] = {}
    for layers in (int(k) for k in settings["students"]):
        for method in ("sukd", "nokd", "featurekd"):
            key = f"{method}_L{layers}"
            folder = exp.runs_dir / "_students" / key
            shutil.rmtree(folder, ignore_errors=True)  # a student never resumes another's weights
            with exp.stage(f"distill_{key}"):
                if method == "featurekd":
                    student = distill.fit_feature_kd(
                        teacher.lm, data, layers, text_loop, folder, teacher_vectors, exp.progress
                    )
                    vectors = distill.pooled_vectors(student.lm, data).cpu().numpy()[rows_of_text]
                    feature = NlpFeature(key, "student", vectors, cascade=vectors)
                    p = increment = judge.fit_increment(feature)  # a cascade feature: E0 + it
                    lm = student.lm
                else:
                    weight = float(settings["weight"]) if method == "sukd" else 0.0
                    joint = distill.fit_joint_student(
                        teacher.model,
                        teacher.lm,
                        data,
                        layers,
                        weight,
                        joint_loop,
                        folder,
                        targets,
                        exp.progress,
                    )
                    p = predict(joint.model, data, test, TextBatcher.for_data(joint.lm, data))
                    output = (
                        distill.supplementary_outputs(joint.model, joint.lm, data).cpu().numpy()[rows_of_text]
                    )
                    feature = NlpFeature.of_output(key, "student", output)
                    increment = judge.fit_increment(feature)
                    lm = joint.lm
                measures[key] = judge.measure(feature, increment)
                if layers not in speeds:  # timed side by side, on the same texts
                    speeds[layers] = (
                        distill.inference_rows_per_s(lm, sample),
                        distill.inference_rows_per_s(teacher.lm, sample),
                    )
                out[key] = judge.student_entry(method, layers, p, measures[key])
                out[key].update(judge.conversion(key, teacher_name) if distillable else NOT_DISTILLED)
                out[key]["rows_per_s"], out[key]["teacher_rows_per_s"] = speeds[layers]
    teacher_entry = exp.runs[teacher_name]
    teacher_info = {
        "run": teacher_name,
        "fusion": teacher_name.removeprefix("joint_"),
        "selected_by": "validation ΔAUC of its LM feature over E0"
        if settings["teacher_fusion"] == "best"
        else "distill.teacher_fusion",
        "valid_delta_auc": {f"joint_{f}": judge.valid_gain[f"joint_{f}"] for f in protocol["fusions"]},
        "layers": int(protocol["joint_lm_layers"]),
        "auc": teacher_entry["auc"],
        "rig": teacher_entry["rig"],
        "gauc": teacher_entry["gauc"],
        "feature_delta_auc": teacher_feature["delta_auc"],
        "feature_delta_auc_ci": teacher_feature["delta_auc_ci"],
        "feature_delta_rig": teacher_feature["delta_rig"],
        "nothing_to_distil": not distillable,
    }
    return out, teacher_info
