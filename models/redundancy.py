"""How much of an NLP feature the CTR model already knows (the redundancy measures of DESIGN.md).

A feature is (n,) or (n, d); every measure weights a row by its impressions and takes numpy
arrays and `metrics.Labels`, so the caller trains E0 and E0 + feature and passes their outputs
in. Measures (standalone AUC, explained fraction, CKA, the E2 curve): docs/DESIGN.md, "The
measures" (Redundancy) and "Modules in detail", redundancy.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Generic, TypedDict, TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from nlpctr.models import metrics
from nlpctr.models.ctr_net import CtrModel
from nlpctr.models.data import Tensors
from nlpctr.models.device import device_of
from nlpctr.models.evaluation import PairedDelta
from nlpctr.models.schema import SPLITS

KINDS = ("frozen", "cascade_finetuned", "joint", "probe", "student")
# Ridge penalties tried by the probes, for weights normalised to mean 1 (so alpha is in rows).
ALPHAS = (1.0, 10.0, 100.0, 1000.0)
VARIANCE_COVERED = 0.9  # an embedding is probed through the principal components covering this

Matrix = np.ndarray | sp.spmatrix
T = TypeVar("T")


def subsample(rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """At most `max_rows` of `rows`, drawn without replacement (seeded), in their original order."""
    rows = np.asarray(rows)
    if len(rows) <= max_rows:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False)
    return rows[np.sort(keep)]


def _as_matrix(feature: np.ndarray) -> np.ndarray:
    """A score (n,) or an embedding (n, d) as an (n, d) float64 matrix."""
    values = np.asarray(feature, dtype=np.float64)
    return values[:, None] if values.ndim == 1 else values


# ------------------------------------------------------------------------------- standalone AUC


def standalone_auc(
    train_feature: np.ndarray,
    train_labels: metrics.Labels,
    test_feature: np.ndarray,
    test_labels: metrics.Labels,
    seed: int = 0,
) -> float:
    """Test AUC of a logistic regression on the feature alone, fitted on the train rows.

    Each aggregated row is a clicked sample weighted by its clicks and a non-clicked one weighted
    by its non-clicks, which is the binomial likelihood of the row. For a score the fit is
    monotone in it, so this is metrics.auc of the score, or of minus the score.
    """
    x = _as_matrix(train_feature)
    clicks = train_labels.clicks.astype(np.float64)
    non_clicks = train_labels.impressions.astype(np.float64) - clicks
    samples = np.concatenate([x, x])
    y = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    weight = np.concatenate([clicks, non_clicks])
    keep = weight > 0
    samples, y, weight = samples[keep], y[keep], weight[keep] / weight[keep].mean()
    if len(np.unique(y)) < 2:
        raise ValueError("standalone_auc needs both clicks and non-clicks in the training rows")
    scaler = StandardScaler().fit(samples, sample_weight=weight)
    model = LogisticRegression(max_iter=1000, random_state=seed)
    model.fit(scaler.transform(samples), y, sample_weight=weight)
    logit = model.decision_function(scaler.transform(_as_matrix(test_feature)))
    # metrics.auc clips predictions to (EPS, 1 - EPS); ranks in (0, 1) keep every distinction.
    return metrics.auc(test_labels, rankdata(logit) / (len(logit) + 1))


# ------------------------------------------------------------------------------- what E0 sees


def e0_design_matrix(data: Tensors, rows: np.ndarray | torch.Tensor) -> sp.csr_matrix:
    """E0's inputs for `rows` as a linear probe sees them: a one-hot block per categorical column
    (index 0, unknown, has its own column) and the dense columns standardised on the training split.

    Pass E0's own tensors (the dense block must not hold an LM's score). Matrices built from the
    same `data` have the same columns, so train and test rows line up.
    """
    index = np.asarray(rows, dtype=np.int64)
    categorical = data.categorical.numpy()
    blocks = []
    for column, size in enumerate(data.vocab_sizes):
        codes = categorical[index, column]
        blocks.append(
            sp.csr_matrix((np.ones(len(index)), (np.arange(len(index)), codes)), shape=(len(index), size))
        )
    dense = data.dense.numpy().astype(np.float64)
    train = dense[data.split == SPLITS[0]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    blocks.append(sp.csr_matrix((dense[index] - mean) / np.where(std > 0, std, 1.0)))
    return sp.hstack(blocks, format="csr")


def e0_representation(
    model: CtrModel, data: Tensors, rows: np.ndarray | torch.Tensor, batch_size: int = 4096
) -> np.ndarray:
    """E0's penultimate vector (`CtrModel.penultimate`) for each of `rows`, in order."""
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    device = device_of(model)
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(index), batch_size):
            batch = index[start : start + batch_size]
            cascade = tuple(vectors[batch].to(device) for vectors in data.cascade)
            inputs = (data.categorical[batch].to(device), data.dense[batch].to(device), cascade)
            out.append(model.penultimate(*inputs).cpu())
    width = model.tower.mlp.out_dim
    return torch.cat(out).numpy().astype(np.float64) if out else np.empty((0, width))


# ------------------------------------------------------------------------------- probes


def _principal_targets(
    train: np.ndarray, test: np.ndarray, weights: np.ndarray, max_components: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test projected on the train rows' weighted principal axes (top ones only).

    sklearn's PCA takes no sample weights, and the weighted covariance is d × d, so eigh does it.
    Keeps the components covering VARIANCE_COVERED of the variance, at most `max_components`.
    """
    mean = np.average(train, axis=0, weights=weights)
    centred = train - mean
    covariance = (centred * weights[:, None]).T @ centred / weights.sum()
    variances, axes = np.linalg.eigh(covariance)
    order = np.argsort(variances)[::-1]
    variances, axes = np.clip(variances[order], 0, None), axes[:, order]
    covered = np.cumsum(variances) / max(variances.sum(), np.finfo(float).tiny)
    k = min(max_components, int(np.searchsorted(covered, VARIANCE_COVERED)) + 1, len(variances))
    return centred @ axes[:, :k], (test - mean) @ axes[:, :k]


def _fit_ridge(x: Matrix, targets: np.ndarray, weights: np.ndarray, seed: int) -> Ridge:
    """Ridge with its penalty chosen from ALPHAS on a seeded, weighted 25% hold-out of the rows.

    Not RidgeCV: its leave-one-out path builds a dense n × n or p × p matrix (E0's one-hot inputs
    have ~30k columns on Upworthy), and its cv= path scores without sample weights. lsqr works on
    sparse and dense inputs alike. Penalties are tried from the largest down, stopping when the
    held-out R² falls: a small penalty is the slow one for lsqr, and the curve is single-peaked.
    """
    fit_rows, held_rows = train_test_split(np.arange(len(targets)), test_size=0.25, random_state=seed)
    best_alpha, best_score = None, -np.inf
    for alpha in sorted(ALPHAS, reverse=True):
        ridge = Ridge(alpha=alpha, solver="lsqr").fit(
            x[fit_rows], targets[fit_rows], sample_weight=weights[fit_rows]
        )
        score = r2_score(
            targets[held_rows],
            ridge.predict(x[held_rows]),
            sample_weight=weights[held_rows],
            multioutput="variance_weighted",
        )
        if score <= best_score:
            break
        best_alpha, best_score = alpha, score
    return Ridge(alpha=best_alpha, solver="lsqr").fit(x, targets, sample_weight=weights)


def probe_r2(
    x_train: Matrix,
    feature_train: np.ndarray,
    x_test: Matrix,
    feature_test: np.ndarray,
    weights_train: np.ndarray | None = None,
    weights_test: np.ndarray | None = None,
    max_components: int = 16,
    seed: int = 0,
) -> float:
    """Held-out R² of a ridge probe predicting the feature from x (rows weighted, e.g. by impressions).

    A score is predicted as it is; an embedding through its top principal components (fitted on
    train), the R² weighted by each component's variance. The raw held-out R² is returned: it
    is negative when the probe predicts worse than the weighted test mean. NaN for a feature
    that is constant on the train rows.
    """
    y_train, y_test = _as_matrix(feature_train), _as_matrix(feature_test)
    w_train = np.ones(len(y_train)) if weights_train is None else np.asarray(weights_train, dtype=np.float64)
    w_train = w_train / w_train.mean()
    if y_train.shape[1] > 1:
        y_train, y_test = _principal_targets(y_train, y_test, w_train, max_components)
    if np.allclose(y_train, y_train[0]):
        return float("nan")
    ridge = _fit_ridge(x_train, y_train, w_train, seed)
    return float(
        r2_score(y_test, ridge.predict(x_test), sample_weight=weights_test, multioutput="variance_weighted")
    )


def explained_fraction(
    x_train: Matrix,
    feature_train: np.ndarray,
    x_test: Matrix,
    feature_test: np.ndarray,
    labels_train: metrics.Labels,
    labels_test: metrics.Labels,
    max_components: int = 16,
    seed: int = 0,
) -> float:
    """The fraction of the feature that x already explains: `probe_r2` weighted by impressions."""
    return probe_r2(
        x_train,
        feature_train,
        x_test,
        feature_test,
        labels_train.impressions,
        labels_test.impressions,
        max_components,
        seed,
    )


def linear_cka(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same rows.

    ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F) on column-centred matrices: O(n d²), never n × n.
    With weights, a row counts `weight` times (weighted centring, rows scaled by √weight).
    """
    a, b = _as_matrix(x), _as_matrix(y)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    a = (a - w @ a) * np.sqrt(w)[:, None]
    b = (b - w @ b) * np.sqrt(w)[:, None]
    denominator = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if denominator == 0:
        return float("nan")
    return float(np.linalg.norm(b.T @ a) ** 2 / denominator)


# ------------------------------------------------------------------------------- one feature


@dataclass(frozen=True)
class RedundancySettings:
    """The experiment protocol's `redundancy:`: the sample each probe and CKA uses."""

    max_rows: int  # rows (a seeded sample) per split
    max_components: int  # principal components of an embedding a probe predicts


@dataclass(frozen=True)
class FeatureRedundancy:
    """Every redundancy measure of one NLP feature against E0 (one entry of results.json)."""

    kind: str
    standalone_auc: float
    delta_auc: float | None
    delta_auc_ci: list[float] | None
    delta_rig: float | None
    delta_rig_ci: list[float] | None
    delta_gauc: float | None
    delta_gauc_ci: list[float] | None
    explained_fraction: float
    explained_fraction_representation: float
    cka: float
    rows: dict[str, int]

    def to_dict(self) -> FeatureRedundancyRecord:
        return FeatureRedundancyRecord(**asdict(self))


class FeatureRedundancyRecord(TypedDict):
    """`FeatureRedundancy` as results.json holds it."""

    kind: str
    standalone_auc: float
    delta_auc: float | None
    delta_auc_ci: list[float] | None
    delta_rig: float | None
    delta_rig_ci: list[float] | None
    delta_gauc: float | None
    delta_gauc_ci: list[float] | None
    explained_fraction: float
    explained_fraction_representation: float
    cka: float
    rows: dict[str, int]


@dataclass(frozen=True)
class TrainTest(Generic[T]):
    """One quantity on the train rows and on the test rows (a feature, labels, E0's inputs)."""

    train: T
    test: T


def _number(value: float | None) -> float | None:
    return None if value is None else float(value)


def _ci(value: Sequence[float] | None) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def measure_feature(
    kind: str,
    feature: TrainTest[np.ndarray],
    labels: TrainTest[metrics.Labels],
    e0_inputs: TrainTest[Matrix],
    e0_representation: TrainTest[np.ndarray],
    delta: PairedDelta,
    max_rows: int = 20_000,
    max_components: int = 16,
    seed: int = 0,
) -> FeatureRedundancy:
    """All measures for one feature; each pair's arrays are aligned on the train and test rows.
    Standalone AUC is scored on every test row; the rest on seeded draws of at most `max_rows`.

    Args:
        kind: what the feature is, one of KINDS (a score or a vector).
        feature: the feature's values on the train and the test rows.
        labels: the labels of those rows.
        e0_inputs: E0's inputs on those rows (`e0_design_matrix`).
        e0_representation: E0's penultimate vectors on those rows.
        delta: `evaluation.paired_delta` of E0 + feature against E0 on the test rows.
        max_rows: the row cap of the logistic fit and probes (train) and of probes and CKA (test).
        max_components: principal components of a vector feature the probes predict.
        seed: the seed of the row draws.

    Returns:
        A `FeatureRedundancy`: standalone AUC, deltas with CIs, explained fractions, CKA, rows.

    Raises:
        ValueError: `kind` is not one of KINDS.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    labels_test = labels.test
    train = subsample(np.arange(len(labels.train.impressions)), max_rows, seed)
    test = subsample(np.arange(len(labels_test.impressions)), max_rows, seed + 1)
    feature_train, feature_test = np.asarray(feature.train), np.asarray(feature.test)
    sub_train, sub_test = labels.train.subset(train), labels_test.subset(test)
    scaler = StandardScaler().fit(e0_representation.train[train], sample_weight=sub_train.impressions)
    representation_train = scaler.transform(e0_representation.train[train])
    representation_test = scaler.transform(e0_representation.test[test])

    return FeatureRedundancy(
        kind=kind,
        standalone_auc=standalone_auc(feature_train[train], sub_train, feature_test, labels_test, seed),
        delta_auc=_number(delta.get("delta_auc")),
        delta_auc_ci=_ci(delta.get("delta_auc_ci")),
        delta_rig=_number(delta.get("delta_rig")),
        delta_rig_ci=_ci(delta.get("delta_rig_ci")),
        delta_gauc=_number(delta.get("delta_gauc")),
        delta_gauc_ci=_ci(delta.get("delta_gauc_ci")),
        explained_fraction=explained_fraction(
            e0_inputs.train[train],
            feature_train[train],
            e0_inputs.test[test],
            feature_test[test],
            sub_train,
            sub_test,
            max_components,
            seed,
        ),
        explained_fraction_representation=explained_fraction(
            representation_train,
            feature_train[train],
            representation_test,
            feature_test[test],
            sub_train,
            sub_test,
            max_components,
            seed,
        ),
        cka=linear_cka(feature_test[test], e0_representation.test[test], sub_test.impressions),
        rows={"train": len(train), "test": len(test), "test_standalone_auc": len(labels_test.impressions)},
    )


# ------------------------------------------------------------------------------- the E2 curve


class E2PointForm(TypedDict):
    """One checkpoint's feature in one form: standalone, and as a gain over E0 (test, valid)."""

    standalone_auc: float
    delta_auc: float | None
    delta_rig: float | None
    valid_delta_auc: float | None


class E2Point(TypedDict):
    """One E2 checkpoint on the curve; `chosen`: E2's rule (peak standalone validation AUC)."""

    checkpoint: str
    step: int
    chosen: bool
    valid_auc_standalone: float | None
    score: E2PointForm
    vector: E2PointForm


class E2CurveForm(TypedDict):
    best_valid_feature_checkpoint: str
    best_test_delta_auc_checkpoint: str
    best_test_delta_rig_checkpoint: str
    peak_auc_is_best_feature: bool


class E2Curve(TypedDict):
    """results.json's `e2_curve` (`e2_curve`)."""

    points: list[E2Point]
    peak_auc_checkpoint: str
    valid_auc_rising_at_end: bool
    forms: dict[str, E2CurveForm]


def e2_curve(points: Sequence[E2Point], forms: Sequence[str] = ("score", "vector")) -> E2Curve:
    """Standalone AUC against incremental gain across E2's checkpoints.

    Each point is {checkpoint, step, chosen, valid_auc_standalone, <form>: {standalone_auc,
    delta_auc, delta_rig, valid_delta_auc}}; `chosen` is the peak standalone validation AUC
    checkpoint (E2's rule). Per form: which checkpoint adds most to E0 on validation (what claim 1
    selects) and on test, and whether the peak-AUC checkpoint is it; ties go to the earliest.
    """
    if not points:
        raise ValueError("e2_curve needs at least one checkpoint")
    names = [point["checkpoint"] for point in points]
    peak = next((p["checkpoint"] for p in points if p.get("chosen")), names[0])

    def best(form: str, key: str) -> str:
        return names[int(np.nanargmax([float(point[form][key]) for point in points]))]

    per_form: dict[str, E2CurveForm] = {}
    for form in forms:
        valid_best = best(form, "valid_delta_auc")
        per_form[form] = {
            "best_valid_feature_checkpoint": valid_best,
            "best_test_delta_auc_checkpoint": best(form, "delta_auc"),
            "best_test_delta_rig_checkpoint": best(form, "delta_rig"),
            "peak_auc_is_best_feature": peak == valid_best,
        }
    aucs = [float(p["valid_auc_standalone"]) for p in points]
    return {
        "points": list(points),
        "peak_auc_checkpoint": peak,
        "valid_auc_rising_at_end": len(aucs) > 1 and aucs[-1] > aucs[-2],
        "forms": per_form,
    }
