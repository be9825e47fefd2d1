"""benchmarks/experiment.py's bookkeeping on fake run JSONs: LR choice, launch order, mean/std/ratios,
one rev per table. No training: the experiment itself is a benchmark, not a test."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("experiment", REPO / "benchmarks" / "experiment.py")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)


def fake(domain, model, budget, lr, seed, test, select=None, rev="abc"):
    key = experiment.run_key(domain, model, budget, lr, seed)
    return {"key": key, "rev": rev, "domain": domain, "model": model, "budget": budget, "lr": lr, "seed": seed,
            "steps": 100, "flops_per_byte": 8.9e6, "flops": budget, "test_bpb": test,
            "select_bpb": test if select is None else select, "test_sha": "t", "select_sha": "s",
            "train_s": 10.0, "score_s": 2.0, "wall_s": 12.0, "eval_router": {},
            "routing": {"boundary_rate": 0.2, "rule_rate": 0.18, "share_at_rule": 0.5, "share_after_rule": 0.3,
                        "share_at_or_after_rule": 0.8, "rule_recall": 0.5, "chunk_len_p50": 4, "chunk_len_p90": 9,
                        "chunk_len_hist": [1, 2, 3] + [0] * 30}}


def sweep(domain, model, best_lr, bpb=2.5):
    return [fake(domain, model, 1e13, lr, 0, bpb + (0 if lr == best_lr else 0.1)) for lr in experiment.LRS]


def test_lr_chosen_on_select_set_only_when_sweep_complete():
    runs = sweep("prose", "pico", 6e-3)
    runs[1]["test_bpb"] = 9.0  # the test score must not pick the LR
    assert experiment.choose_lrs(runs) == {("prose", "pico"): 6e-3}
    assert experiment.choose_lrs(runs[:2]) == {}


def test_plan_order_sweeps_then_seed0_then_other_seeds():
    ready, total = experiment.plan([])
    assert total == 7 * 2 * 6
    first = [(s["domain"], s["model"]) for s in ready[:24]]
    assert first[:12] == [("prose", m) for m in experiment.CORE for _ in experiment.LRS]
    assert all(d == "code" and m in experiment.CORE for d, m in first[12:])
    runs = [r for d in experiment.DOMAINS for m in experiment.CORE for r in sweep(d, m, 6e-3)]
    ready, _ = experiment.plan(runs)
    finals = [s for s in ready if s["budget"] == 3e13]
    assert ready[0]["model"] not in experiment.CORE and ready[0]["budget"] == 1e13  # every sweep first
    runs += [r for d in experiment.DOMAINS for m in experiment.MODELS if m not in experiment.CORE
             for r in sweep(d, m, 6e-3)]
    finals, total = experiment.plan(runs)
    assert total == 7 * 2 * 6 and all(s["budget"] == 3e13 and s["lr"] == 6e-3 for s in finals)
    assert [s["seed"] for s in finals] == [0] * 14 + [1] * 14 + [2] * 14  # each seed of every model, then the next
    assert all(s["model"] in experiment.CORE for s in finals[:8])


def test_aggregate_mean_std_and_paired_ratios():
    runs = sweep("code", "chunk", 6e-3) + sweep("code", "spacelike", 6e-3)
    chunk, space = [2.0, 2.2, 2.1], [2.1, 2.2, 2.4]
    runs += [fake("code", "chunk", 3e13, 6e-3, s, b) for s, b in enumerate(chunk)]
    runs += [fake("code", "spacelike", 3e13, 6e-3, s, b) for s, b in enumerate(space)]
    agg = experiment.aggregate(runs)
    cell = agg["cells"]["code/chunk/3e+13"]
    assert cell["mean"] == pytest.approx(2.1) and cell["std"] == pytest.approx(statistics.stdev(chunk))
    r = agg["ratios"]["code/chunk/spacelike/3e+13"]
    assert r["ratio_of_means"] == pytest.approx(2.1 / statistics.fmean(space))
    assert r["per_seed"] == pytest.approx([c / s for c, s in zip(chunk, space)])
    assert r["target"] == 0.97 and r["n_pairs"] == 3
    assert agg["ratios"]["code/chunk/spacelike/1e+13"]["target"] is None


def test_ratio_of_means_uses_only_the_seeds_both_models_have():
    runs = sweep("prose", "pico", 6e-3) + sweep("prose", "vanilla", 6e-3)
    runs += [fake("prose", "pico", 3e13, 6e-3, 0, 2.2)]
    runs += [fake("prose", "vanilla", 3e13, 6e-3, s, b) for s, b in enumerate([2.0, 1.8])]
    r = experiment.aggregate(runs)["ratios"]["prose/pico/vanilla/3e+13"]
    assert r["ratio_of_means"] == pytest.approx(1.1) and r["seeds"] == [0] and r["n_pairs"] == 1


def test_table_written_and_mixed_revs_refused(tmp_path):
    runs = sweep("prose", "vanilla", 6e-3) + sweep("prose", "chunk", 6e-3)
    md_paths = experiment.write_table(runs, 84, tmp_path, pictures=False)
    text = md_paths[0].read_text()
    assert "**6 of 84**" in text and "| prose | chunk | 0.006 |" in text
    assert json.loads(md_paths[1].read_text())["chosen_lr"] == {"prose/chunk": 6e-3, "prose/vanilla": 6e-3}
    for r in runs[:2] + [fake("prose", "pico", 1e13, 3e-3, 0, 2.0, rev="other")]:
        (tmp_path / f"{r['key']}.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="2 pico revs"):
        experiment.load_runs(tmp_path)


def test_edge_pick_extends_the_grid_by_the_same_rule_for_every_model():
    runs = sweep("code", "vanilla", 3e-3)  # best at the low edge: 1.5e-3 is swept next
    assert experiment.choose_lrs(runs) == {}
    ready, _ = experiment.plan(runs, models=("vanilla",))
    code = [s for s in ready if s["domain"] == "code"]
    assert (code[0]["lr"], code[0]["budget"]) == (1.5e-3, 1e13)
    runs.append(fake("code", "vanilla", 1e13, 1.5e-3, 0, 2.55))  # worse than 3e-3: 3e-3 is now interior
    assert experiment.choose_lrs(runs) == {("code", "vanilla"): 3e-3}
    runs[-1]["select_bpb"] = 2.4  # better: 7.5e-4 next, and after that the pick stands
    assert experiment.lr_grid(runs, "code", "vanilla")[0][0] == 7.5e-4
    runs.append(fake("code", "vanilla", 1e13, 7.5e-4, 0, 2.3))
    assert experiment.choose_lrs(runs) == {("code", "vanilla"): 7.5e-4}
    high = sweep("prose", "pico", 1.2e-2)
    assert experiment.lr_grid(high, "prose", "pico")[0][-1] == 2.4e-2


def test_stop_at_is_the_next_such_time_even_past_midnight():
    now = experiment.dt.datetime.now(experiment.dt.timezone.utc)
    for minutes in (1, 60, 23 * 60):  # later today, or tomorrow once today's has passed
        spec = (now + experiment.dt.timedelta(minutes=minutes)).strftime("%H:%M")
        delta = experiment.stop_time(spec) - now
        assert experiment.dt.timedelta(0) < delta <= experiment.dt.timedelta(minutes=minutes)
    assert experiment.stop_time("") is None


def test_dechunk_variants_are_also_compared_with_the_rule_on_the_same_return_path():
    runs = [r for m in ("pico", "pico-dechunk", "spacelike", "spacelike-dechunk") for r in sweep("code", m, 6e-3)]
    ratios = experiment.aggregate(runs)["ratios"]
    assert "code/pico-dechunk/spacelike-dechunk/1e+13" in ratios and "code/pico-dechunk/spacelike/1e+13" in ratios
    assert "code/pico/spacelike-dechunk/1e+13" not in ratios


@pytest.fixture
def experiment3():
    experiment.use("experiment3")
    yield experiment
    experiment.use("experiment2")


def test_fixed_lr_design_plans_every_model_at_one_budget_without_a_sweep(experiment3, tmp_path):
    ready, total = experiment3.plan([])
    models = list(experiment3.MODELS)
    assert total == len(ready) == len(models) * 2 * 2 and {s["budget"] for s in ready} == {1e13}
    assert [s["seed"] for s in ready] == [0] * (2 * len(models)) + [1] * (2 * len(models))
    assert {(s["domain"], s["lr"]) for s in ready} == {("prose", 6e-3), ("code", 3e-3)}
    assert experiment3.RESULTS.name == "experiment3" and experiment3.RUNS.parent == experiment3.RESULTS
    runs = [fake(s["domain"], s["model"], 1e13, s["lr"], s["seed"], 2.0 + 0.01 * i)
            for i, s in enumerate(ready[:len(models)])]  # seed 0 on prose
    ratios = experiment3.aggregate(runs)["ratios"]
    assert "prose/spacelike-dechunk-ri0.25/spacelike-dechunk/1e+13" in ratios
    assert "prose/chunk-dechunk-ri0.25/spacelike-dechunk-ri0.25/1e+13" in ratios
    assert "prose/chunk-ri0.25/spacelike-dechunk/1e+13" not in ratios  # not the same return path
    assert all(r["target"] is None for r in ratios.values())
    text = experiment3.write_table(runs, total, tmp_path, pictures=False)[0].read_text()
    assert "LR sweep" not in text and "| prose | chunk-ri0.25 | 0.006 | 2.0400 |" in text


def test_unknown_design_is_refused():
    with pytest.raises(SystemExit, match="not one of experiment2, experiment3, experiment4"):
        experiment.use("experiment9")
