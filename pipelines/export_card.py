"""The model card (README.md) of an exported LM: what it is and how to use it, the data it was
trained on, its test metrics with their CIs, the experiment's claims and verdicts, and the
export's own checks. Every figure is read from the run's results.json and, when the run belongs
to an experiment, the experiment's results.json; nothing is written that those files do not say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nlpctr.atomic import JsonObject
from nlpctr.layout import Manifest
from nlpctr.models.encoder_source import DEFAULT_ENCODER
from nlpctr.models.export import EXPORT_FILE, HEAD_FILE, HEAD_WEIGHTS, ONNX_FILE, ExportedLM
from nlpctr.models.nlp_features import FORMS


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(value: Any, ci: Sequence[float] | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    sign = "+" if signed else ""
    shown = f"{value:{sign}.{digits}f}"
    return f"{shown} [{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]" if ci else shown


def _of(entry: JsonObject, key: str, signed: bool = False, digits: int = 4) -> str:
    """`entry[key]` with its CI (`entry[key + "_ci"]`)."""
    return _ci(entry.get(key), entry.get(f"{key}_ci"), digits, signed)


def _front_matter(exported: ExportedLM) -> list[str]:
    lines = ["---", "library_name: transformers", "pipeline_tag: feature-extraction"]
    if exported.lm.config.name == DEFAULT_ENCODER:
        lines.append("base_model: sentence-transformers/all-MiniLM-L6-v2")
    lines += ["tags:", "- nlpctr", "- click-through-rate", "- sponsored-search", "---", ""]
    return lines


def _usage(exported: ExportedLM, head: JsonObject) -> list[str]:
    config = exported.lm.config
    if head["pair_reading"] == "separate":
        text = "each of the query and the ad apart, then [u_query, u_ad, u_query * u_ad]"
    else:
        text = "`f'{query} [SEP] {ad}'` (the ad alone when there is no query)"
    apply_head = (
        "the click head (`click_head.safetensors`, layers as `click_head.json` lists them) gives "
        f"its {'logit' if exported.output == 'logit' else 'output vector'}"
        if exported.head is not None
        else "there is no click head: the pooled vector is the feature"
    )
    pooling = "masked mean over real tokens" if config.pooling == "mean" else "the [CLS] state"
    return [
        "## How to use it",
        "",
        f"Tokenise {text}, truncated at {config.max_length} tokens; run the model; pool the last "
        f"hidden states ({pooling}); {apply_head}.",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model, tokenizer = AutoModel.from_pretrained(FOLDER), AutoTokenizer.from_pretrained(FOLDER)",
        "# or all four steps: nlpctr.models.export.FolderScorer(FOLDER).outputs([(query, ad), ...])",
        "```",
        "",
    ]


def _training_data(results: JsonObject, manifest: Manifest | None) -> list[str]:
    provenance = results.get("provenance", {})
    lines = [
        "## Training data",
        "",
        f"- dataset: `{provenance.get('dataset', results.get('dataset'))}` (spec hash "
        f"`{provenance.get('spec_hash')}`), split `{provenance.get('split_mode')}` with seed "
        f"{provenance.get('split_seed')}, groups `{provenance.get('group')}`",
    ]
    split = manifest.split if manifest else None
    if split and split.rows:
        rows = ", ".join(f"{name} {count:,}" for name, count in split.rows.items())
        impressions = ", ".join(f"{name} {count:,}" for name, count in split.impressions.items())
        lines.append(f"- rows: {rows}; impressions: {impressions}")
    lines += [
        f"- features: the Feast service `{provenance.get('feature_service')}`",
        f"- encoder: `{provenance.get('encoder_version')}`",
        f"- code: `{provenance.get('code_version')}`",
        "",
    ]
    return lines


def _metrics(exported: ExportedLM, results: JsonObject) -> list[str]:
    test = results.get("metrics", {}).get("test", {})
    calibration = test.get("calibration") or {}
    model = "E0 + this LM's feature (E2)" if exported.kind == "cascade_finetuned" else "the joint model (E3)"
    if exported.kind == "student":
        model = "the teacher's joint model (E3)"
    lines = [
        f"## Metrics of {model} on the test split (95% group-bootstrap CIs)",
        "",
        "| metric | value [95% CI] |",
        "|---|---|",
        f"| AUC | {_of(test, 'auc')} |",
        f"| GAUC | {_of(test, 'gauc')} |",
        f"| RIG | {_of(test, 'rig')} |",
        f"| log loss | {_num(test.get('logloss'))} |",
        f"| calibration (predicted / observed CTR) | {_num(calibration.get('ratio'), 3)} |",
    ]
    if exported.kind == "cascade_finetuned" and results.get("lm"):
        lines.append(f"| this LM alone, test AUC | {_num(results['lm'].get('test_auc_standalone'))} |")
    return [*lines, ""]


def _experiment(exported: ExportedLM, experiment: JsonObject, feature: str | None) -> list[str]:
    lines: list[str] = []
    student = experiment.get("distillation", {}).get(exported.name) if exported.kind == "student" else None
    if student:
        lines += [
            "## This student in the experiment (test split, 95% CIs)",
            "",
            f"- E4 model with this student: AUC {_of(student, 'auc')}, RIG {_num(student.get('rig'))}",
        ]
        for form in FORMS:
            entry = student.get(form) or {}
            note = f" ({entry['conversion_note']})" if entry.get("conversion_note") else ""
            lines.append(
                f"- as a feature added to E0, {form} form ({entry.get('dim', '–')}-d): ΔAUC "
                f"{_of(entry, 'feature_delta_auc', True)}, ΔRIG "
                f"{_of(entry, 'feature_delta_rig', True)}; conversion (its gain / the teacher's): "
                f"AUC {_of(entry, 'conversion_auc', digits=3)}{note}"
            )
        lines.append("")
    measures = (
        {form: experiment.get("redundancy", {}).get(f"{feature}/{form}") for form in FORMS} if feature else {}
    )
    if any(measures.values()) and not student:
        lines += [f"## Its output as a feature added to E0 (`{feature}`, test split, 95% CIs)", ""]
        for form, measured in measures.items():
            if measured:
                lines.append(
                    f"- {form} form ({measured.get('dim', '–')}-d): ΔAUC {_of(measured, 'delta_auc', True)}, "
                    f"ΔRIG {_of(measured, 'delta_rig', True)}; standalone AUC "
                    f"{_num(measured.get('standalone_auc'))}; share of it E0's inputs explain (held-out R²) "
                    f"{_num(measured.get('explained_fraction'), 3)}"
                )
        lines.append("")
    claims = experiment.get("claims") or []
    if claims:
        lines += [
            "## The experiment's claims",
            "",
            "| claim | form | ΔAUC [95% CI] | ΔRIG [95% CI] | verdict |",
            "|---|---|---|---|---|",
        ]
        for claim in claims:
            layers = claim.get("detail", {}).get("layers")
            name = claim["id"] + (f" (L{layers})" if layers else "")
            lines.append(
                f"| `{name}` | {claim.get('form', '–')} | "
                f"{_ci(claim.get('estimate'), claim.get('ci'), signed=True)} | "
                f"{_of(claim, 'delta_rig', True)} | {claim['verdict']} |"
            )
        lines.append("")
    return lines


def model_card(
    exported: ExportedLM,
    head: JsonObject,
    record: JsonObject,
    results: JsonObject,
    manifest: Manifest | None,
    experiment: JsonObject | None,
    feature: str | None,
) -> str:
    """README.md of an export (`record` is its nlpctr_export.json)."""
    config = exported.lm.config
    lines = [
        *_front_matter(exported),
        f"# {exported.name}: an LM exported by nlpctr",
        "",
        f"This is {exported.description}. It has {config.layers} layers of `{config.version}` "
        f"(pooling {config.pooling}, {config.max_length} tokens, pair reading {config.pair_reading}).",
        "",
        *_usage(exported, head),
        *_training_data(results, manifest),
        *_metrics(exported, results),
        *(_experiment(exported, experiment, feature) if experiment else []),
        "## Checks made at export",
        "",
    ]
    for check in record["checks"]:
        lines.append(
            f"- {check['what']}: {check['pairs']} text pairs, largest |difference| "
            f"{check['max_abs_diff']:.2e}"
        )
    if record.get("onnx"):
        onnx = record["onnx"]
        lines.append(
            f"- `{ONNX_FILE}` (outputs {', '.join(onnx['outputs'])}) run by onnxruntime against this folder: "
            f"{onnx['texts_checked']} texts, largest |difference| {onnx['max_abs_diff']:.2e}"
        )
    head_files = f"`{HEAD_WEIGHTS}` and `{HEAD_FILE}`" if exported.head is not None else f"`{HEAD_FILE}`"
    lines += [
        "",
        "## Files",
        "",
        "`config.json`, `model.safetensors` and the tokenizer's files (transformers), "
        f"{head_files} (the click head and how to apply it), `{EXPORT_FILE}` "
        "(what was exported, from where, and these checks)"
        + (f", `{ONNX_FILE}`." if record.get("onnx") else "."),
        "",
    ]
    return "\n".join(lines)
