"""The sponsored-search simulator: reproducible files, a consistent ground truth, a spec that
the real ingest job accepts, and a redundancy knob that does what it says."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nlpctr.errors import UserError
from nlpctr.pipelines import cli, ingest, simulate
from nlpctr.pipelines.simulator import clicks, lexicon, world
from nlpctr.pipelines.specs import data_root, load_spec

ROWS = 5_000
COMPONENTS = list(clicks.COMPONENTS)


def _simulate(out: Path, rows: int = ROWS, rho: float = 0.5, seed: int = 0, chunk_rows: int = 2_000) -> Any:
    argv = ["--rows", str(rows), "--redundancy", str(rho), "--seed", str(seed), "--out", str(out)]
    return simulate.run([*argv, "--chunk-rows", str(chunk_rows), "--no-progress"])


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small simulated log (several chunks), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("sim") / "log.parquet"
    result = _simulate(out)
    log = pq.read_table(out).to_pandas()
    truth = pq.read_table(result["paths"]["truth"]).to_pandas()
    return {"out": out, "result": result, "log": log, "truth": truth}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    sim: dict[str, Any], tmp_path: Path
) -> None:
    again = _simulate(tmp_path / "same" / "log.parquet")
    for key in ("log", "truth", "truth_json", "spec"):
        first = Path(sim["result"]["paths"][key]).read_bytes()
        assert Path(again["paths"][key]).read_bytes() == first, key
    other = _simulate(tmp_path / "other" / "log.parquet", seed=1)
    assert Path(other["paths"]["log"]).read_bytes() != sim["out"].read_bytes()
    assert Path(other["paths"]["truth"]).read_bytes() != Path(sim["result"]["paths"]["truth"]).read_bytes()


def test_log_rows_values_and_entities(sim: dict[str, Any]) -> None:
    log = sim["log"]
    assert len(log) == ROWS
    assert log["impression_id"].is_unique
    assert set(log["clicked"].unique()) == {0, 1}
    assert log["position"].between(1, 10).all() and log["position"].nunique() == 10
    assert set(log["device"]) == set(clicks.DEVICES)
    # Position effect is real: the top slot gets more clicks than the bottom half.
    assert log.loc[log.position == 1, "clicked"].mean() > log.loc[log.position >= 6, "clicked"].mean()
    # A log in time order over the 30 days, so time splits work.
    stamps = log["event_time"]
    assert stamps.is_monotonic_increasing
    assert stamps.min() >= pd.Timestamp(clicks.START)
    assert stamps.max() < pd.Timestamp(clicks.START) + pd.Timedelta(days=clicks.DAYS)
    assert (stamps.max() - stamps.min()) > pd.Timedelta(days=clicks.DAYS - 1)
    # Fixed texts per entity; each ad belongs to one advertiser.
    assert (log.groupby("ad_id")["ad_text"].nunique() == 1).all()
    assert (log.groupby("query_id")["query_text"].nunique() == 1).all()
    assert (log.groupby("ad_id")["advertiser_id"].nunique() == 1).all()
    ads, advertisers, queries = world.entity_counts(ROWS)
    assert log["ad_id"].nunique() <= ads and log["ad_id"].nunique() > 0.9 * ads
    assert log["advertiser_id"].nunique() <= advertisers
    assert log["query_id"].nunique() <= queries


def test_texts_are_composed_from_the_real_datasets(sim: dict[str, Any]) -> None:
    pools = lexicon.load_pools(data_root())
    titles = [t for source in pools.titles.values() for t in source]
    for text in sim["log"]["ad_text"].unique():
        assert any(title in text for title in titles), text
    real_queries = set(pools.queries)
    queries = sim["log"]["query_text"].unique()
    # Every query is a real query, plain or with modifiers around it.
    assert all(any(q in text for q in real_queries) for text in queries[:200])
    assert len(set(queries) & real_queries) > 0.5 * min(len(queries), len(real_queries))


def test_ground_truth_is_beside_the_data_and_consistent(sim: dict[str, Any]) -> None:
    log, truth, result = sim["log"], sim["truth"], sim["result"]
    paths = {key: Path(value) for key, value in result["paths"].items()}
    assert paths["truth"] == sim["out"].with_name("log.truth.parquet")
    assert paths["truth_json"] == sim["out"].with_name("log.truth.json")
    assert paths["spec"] == sim["out"].with_name("log.spec.yaml")
    assert list(truth["impression_id"]) == list(log["impression_id"])

    np.testing.assert_allclose(truth[COMPONENTS].sum(axis=1), truth["logit"], rtol=0, atol=1e-9)
    rho, beta = 0.5, result["coefficients"]["text_strength"]
    expected_text = beta * (math.sqrt(rho) * truth["t_ad"] + math.sqrt(1 - rho) * truth["t_pair"])
    np.testing.assert_allclose(truth["text_effect"], expected_text, atol=1e-12)
    np.testing.assert_allclose(truth["click_prob"], 1 / (1 + np.exp(-truth["logit"])), atol=1e-12)
    assert (truth["rho"] == rho).all()
    # T_ad is the ad's own; T_pair the (query, ad) pair's.
    keyed = truth.assign(ad_id=log["ad_id"], query_id=log["query_id"])
    assert (keyed.groupby("ad_id")["t_ad"].nunique() == 1).all()
    assert (keyed.groupby(["query_id", "ad_id"])["t_pair"].nunique() == 1).all()
    assert abs(truth["t_ad"].mean()) < 0.1 and 0.85 < truth["t_ad"].std() < 1.15
    assert abs(truth["t_pair"].mean()) < 0.1 and 0.85 < truth["t_pair"].std() < 1.15

    saved = json.loads(paths["truth_json"].read_text())
    assert (saved["rho"], saved["seed"], saved["rows"]) == (rho, 0, ROWS)
    ctr, mean_p = log["clicked"].mean(), truth["click_prob"].mean()
    assert saved["realised"]["ctr"] == pytest.approx(ctr)
    assert saved["realised"]["clicks"] == int(log["clicked"].sum())
    assert saved["realised"]["mean_click_prob"] == pytest.approx(mean_p)
    assert abs(ctr - mean_p) < 4 * math.sqrt(mean_p * (1 - mean_p) / ROWS)
    variance = saved["variance"]
    assert variance["logit"] == pytest.approx(truth["logit"].var(ddof=0))
    for name in COMPONENTS:
        assert variance["components"][name] == pytest.approx(truth[name].var(ddof=0), abs=1e-12)
    assert variance["components"]["base"] < 1e-20
    # The components are independent by design, so their shares add up to about 1.
    assert sum(variance["shares"].values()) == pytest.approx(1.0, abs=0.1)
    assert saved["coefficients"]["t_ad_weights"] == lexicon.T_AD_WEIGHTS


def test_t_ad_is_a_lexical_function_of_the_ad_text(sim: dict[str, Any]) -> None:
    """No embedding: T_ad is an affine function of word-class cues of the ad's text."""
    pools = lexicon.load_pools(data_root())
    ads = sim["log"].assign(t_ad=sim["truth"]["t_ad"]).drop_duplicates("ad_id")
    brands = frozenset(pools.brands)
    cues = [lexicon.text_cues(text, brands) for text in ads["ad_text"]]
    raw = lexicon.t_ad_raw({key: np.array([c[key] for c in cues]) for key in cues[0]})
    assert np.corrcoef(raw, ads["t_ad"])[0, 1] == pytest.approx(1.0, abs=1e-9)


def test_text_cues_read_word_classes() -> None:
    cues = lexicon.text_cues("Best 10 iPhone Deals - Why Wait?", frozenset())
    for key in ("number", "superlative", "brand", "deal", "question", "informative"):
        assert cues[key] == 1.0, key
    plain = lexicon.text_cues("a quiet walk in the park", frozenset())
    assert all(plain[key] == 0.0 for key in ("number", "superlative", "brand", "deal", "question"))
    assert plain["words"] == 6.0
    assert lexicon.content_words("The Best Shoes for Runners") == frozenset({"best", "shoe", "runner"})


def test_spec_prepares_with_the_real_ingest_job(sim: dict[str, Any], tmp_path: Path) -> None:
    spec_path = Path(sim["result"]["paths"]["spec"])
    spec = load_spec(str(spec_path))
    assert spec.source.path == sim["out"].resolve()
    assert spec.entities == ("ad_id", "advertiser_id", "query_id", "position")
    manifest = ingest.run(["--dataset", str(spec_path), "--out", str(tmp_path / "prepared")])
    assert manifest["rows_in"] == ROWS
    assert manifest["rows_written"] == ROWS
    assert manifest["rows_rejected"] == 0
    prepared = pq.read_table(tmp_path / "prepared" / "impressions").to_pandas()
    assert len(prepared) == ROWS
    assert int(prepared["clicks"].sum()) == int(sim["log"]["clicked"].sum())
    assert set(prepared["device"]) == set(clicks.DEVICES)
    # Time split: the training rows all come before the test rows.
    by_split = prepared.groupby("split")["event_timestamp"]
    assert by_split.max()["train"] <= by_split.min()["test"]


def _r2(y: np.ndarray, x: np.ndarray) -> float:
    design = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())


def test_redundancy_knob_moves_what_ids_know_about_text(tmp_path: Path) -> None:
    rows = 20_000
    in_sample, held_out, unexplained = {}, {}, {}
    for rho in (0.0, 0.5, 1.0):
        result = _simulate(tmp_path / f"rho{rho}" / "log.parquet", rows=rows, rho=rho, chunk_rows=50_000)
        log = pq.read_table(result["paths"]["log"], columns=["ad_id", "query_id"]).to_pandas()
        text = pq.read_table(result["paths"]["truth"], columns=["text_effect"]).column(0).to_numpy()
        frame = log.assign(text=text)
        # What an ad ID can know: the ad's mean text effect.
        in_sample[rho] = _r2(text, frame.groupby("ad_id")["text"].transform("mean").to_numpy())
        # Held out: ad and query means from even rows, judged on odd rows (no noise fitting).
        fit, judge = frame.iloc[::2], frame.iloc[1::2]
        features = np.column_stack(
            [
                judge["ad_id"].map(fit.groupby("ad_id")["text"].mean()),
                judge["query_id"].map(fit.groupby("query_id")["text"].mean()),
            ]
        )
        known = ~np.isnan(features).any(axis=1)
        y = judge["text"].to_numpy()[known]
        held_out[rho] = _r2(y, features[known])
        unexplained[rho] = (1.0 - held_out[rho]) * float(y.var())
    assert in_sample[0.0] < 0.1
    assert 0.35 < in_sample[0.5] < 0.65
    assert in_sample[1.0] > 0.99
    assert in_sample[0.0] < in_sample[0.5] < in_sample[1.0]
    assert held_out[0.0] < 0.05 < held_out[0.5] < held_out[1.0]
    assert held_out[1.0] > 0.95
    # What text adds beyond the IDs shrinks as rho grows.
    assert unexplained[0.0] > unexplained[0.5] > unexplained[1.0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rows", "0"], "--rows"),
        (["--rows", "-5"], "--rows"),
        (["--redundancy", "-0.1"], "--redundancy"),
        (["--redundancy", "1.01"], "--redundancy"),
        (["--redundancy", "nan"], "--redundancy"),
        (["--seed", "-1"], "--seed"),
        (["--chunk-rows", "0"], "--chunk-rows"),
        (["--impressions-per-row", "0"], "--impressions-per-row"),
        (["--out", "log.csv"], ".parquet"),
    ],
)
def test_bad_arguments_are_user_errors(flags: list[str], message: str, tmp_path: Path) -> None:
    options = {"--rows": "100", "--redundancy": "0.5", "--out": str(tmp_path / "log.parquet")}
    options.update(zip(flags[::2], flags[1::2], strict=True))
    with pytest.raises(UserError, match=message):
        simulate.run([part for pair in options.items() for part in pair])
    assert list(tmp_path.iterdir()) == []


def test_missing_data_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out" / "log.parquet"
    monkeypatch.setenv("NLPCTR_DATA_ROOT", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="data root"):
        _simulate(out, rows=100)
    (tmp_path / "partial").mkdir()
    monkeypatch.setenv("NLPCTR_DATA_ROOT", str(tmp_path / "partial"))
    with pytest.raises(UserError, match=r"trec2013_impressions\.tsv is missing"):
        _simulate(out, rows=100)
    assert not out.parent.exists()


def test_cli_prints_the_summary_and_exits_2_on_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "log.parquet"
    assert cli.main(["data", "simulate", "--rows", "300", "--redundancy", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("simulated 300 rows (rho=1, seed=0)")
    assert cli.main(["data", "simulate", "--rows", "300", "--redundancy", "2", "--out", str(out)]) == 2
    assert "--redundancy must be between 0 and 1" in capsys.readouterr().err


def test_a_crash_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_chunk = simulate.simulate_chunk
    calls = []

    def failing_chunk(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_chunk(*args)

    monkeypatch.setattr(simulate, "simulate_chunk", failing_chunk)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _simulate(tmp_path / "log.parquet", rows=3_000, chunk_rows=1_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
