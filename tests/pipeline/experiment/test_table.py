"""The table's arithmetic on hand-made result JSONs: the LR rule, best shapes, paired ratios, revisions."""

from __future__ import annotations

import json
import re
import statistics

import pytest

from pico.configs.errors import UserError
from pico.pipeline.experiment import table
from pico.pipeline.experiment.design import Run, load_design
from pico.pipeline.experiment.plan import chosen_lrs, lr_grid, plan
from pico.pipeline.experiment.store import legacy, load_results, portable, write_json
from tests.conftest import REPO
from tests.pipeline.experiment.conftest import TINY, edit_design


def result(design, model, shape, budget, lr, seed, test, select=None, rev="abc", router=None):
    run = Run("toy", model, shape, budget, lr, seed)
    return run.key(design), {"key": run.key(design), "domain": "toy", "model": model, "shape": shape, "budget": budget,
                             "lr": lr, "seed": seed, "git_revision": rev, "params": 100,
                             "data": {"test": "t", "select": "s"}, "test": {"bpb": test},
                             "select": {"bpb": test + 0.1 if select is None else select},
                             "router_stats": router or {}}


def test_lr_sweep_extends_at_the_edge_then_final_seeds_follow(tiny_design):
    design = edit_design(tiny_design, lambda r: r.update(lr={"grid": [1e-3, 2e-3], "budget": 3e9, "extend": 1},
                                                          budgets=[3e9, {"flops": 6e9, "seeds": [0, 1]}]))
    ready, _ = plan(design, {})
    assert {(r.model, r.lr, r.budget) for r in ready} == {(m, lr, 3e9) for m in ("rule", "plain") for lr in (1e-3, 2e-3)}
    results = dict(result(design, m, "base", 3e9, lr, 0, 2.0 - lr * 100) for m in ("rule", "plain") for lr in (1e-3, 2e-3))
    # 2e-3 wins at the grid's top edge: the sweep adds 4e-3 before choosing
    assert lr_grid(design, results, "toy", "rule", "base") == ([1e-3, 2e-3, 4e-3], None)
    results.update(dict([result(design, "rule", "base", 3e9, 4e-3, 0, 5.0)]))
    assert lr_grid(design, results, "toy", "rule", "base")[1] == 2e-3
    ready, _ = plan(design, results)
    rule = [(r.budget, r.lr, r.seed) for r in ready if r.model == "rule"]
    assert rule == [(6e9, 2e-3, 0), (6e9, 2e-3, 1)]  # the 3e9 seed-0 run at 2e-3 is the sweep's own run


def test_means_std_paired_ratios_and_best_shape(tiny_design):
    design = edit_design(tiny_design, lambda r: (
        r.update(shape_rule="isoflop", seeds=[0, 1, 2], baselines=["plain"]),
        r["models"]["rule"].update(shapes={"small": ["model.d_latent=32"], "big": []}),
        r["models"]["plain"].update(shapes={"small": [], "big": ["model.d_local=40"]})))
    rows = [("rule", "small", [2.0, 2.2, 2.1], 3.0), ("rule", "big", [1.8, 2.0, 1.9], 2.0),  # big wins on select
            ("plain", "small", [1.9, 2.1], 1.0), ("plain", "big", [1.0, 1.0, 1.0], 9.0)]
    results = {}
    for model, shape, tests, select in rows:
        for seed, t in enumerate(tests):
            k, r = result(design, model, shape, 3e9, 3e-3, seed, t, select=select,
                          router={"routed_frac_mean": 0.2 + seed / 100} if model == "rule" else None)
            results[k] = r
    agg = table.aggregate(design, results)
    best = {c["model"]: c for c in agg["best"]}
    # the select set picks the shape even where the test set would disagree (plain big has the lower test bpb)
    assert best["rule"]["shape"] == "big" and best["plain"]["shape"] == "small"
    assert best["rule"]["mean"] == pytest.approx(1.9) and best["rule"]["std"] == pytest.approx(statistics.stdev([1.8, 2.0, 1.9]))
    (ratio,) = agg["ratios"]
    assert ratio["model"] == "rule" and ratio["baseline"] == "plain" and ratio["seeds"] == [0, 1]
    assert ratio["ratio_of_means"] == pytest.approx((1.8 + 2.0) / (1.9 + 2.1))  # paired seeds only, not seed 2
    assert (ratio["min"], ratio["max"]) == (pytest.approx(1.8 / 1.9), pytest.approx(2.0 / 2.1))
    assert best["rule"]["router"]["routed_frac_mean"] == pytest.approx(0.21)
    md = table.build(design, results, {})["markdown"]
    assert "| toy | 3e09 | rule | plain | 0.9500 | 2 | 0.9474..0.9524 |" in md
    assert table.isoflop_plot(design, agg, tiny_design.parent / "isoflop.png").stat().st_size > 1000
    assert table.isoflop_plot(edit_design(tiny_design, lambda r: (r.update(shape_rule="fixed"), [
        m.pop("shapes") for m in r["models"].values()])), agg, tiny_design.parent / "no.png") is None


def test_targets_pick_each_groups_best_on_select_and_judge_only_with_all_seeds(tiny_design):
    third = dict(TINY["rule"], overrides=[*TINY["rule"]["overrides"], "model.router=learned"])
    design = edit_design(tiny_design, lambda r: (
        r.update(seeds=[0, 1], targets=[{"name": "routed vs plain", "models": ["rule", "mod"], "against": ["plain"],
                                         "at_most": 0.97},
                                        {"name": "learned vs rule", "models": ["mod"], "against": ["rule"]}]),
        r["models"].update(mod=third)))
    rows = [("rule", [1.90, 1.94], 2.0), ("mod", [1.80, 1.84], 2.1),  # mod is better on test, rule on select
            ("plain", [2.00, 2.00], 2.0)]
    results = dict(result(design, m, "base", 3e9, 3e-3, seed, t, select=sel)
                   for m, tests, sel in rows for seed, t in enumerate(tests))
    routed, learned = table.aggregate(design, results)["targets"]
    # the group's best is chosen on the select set (rule), not on the test set (mod)
    assert (routed["model"], routed["against"], routed["seeds"]) == ("rule", "plain", [0, 1])
    assert routed["ratio_of_means"] == pytest.approx(1.92 / 2.0) and routed["state"] == "met"
    assert learned["ratio_of_means"] == pytest.approx(1.82 / 1.92) and learned["state"] == "met"
    results[next(k for k in results if k.startswith("toy-rule") and k.endswith("s0"))]["test"]["bpb"] = 1.98
    routed = table.aggregate(design, results)["targets"][0]
    assert routed["state"] == "missed by 1.0 %"  # (1.98 + 1.94) / 4.0 = 0.98 = 1.0103 x 0.97
    one_seed = {k: v for k, v in results.items() if k.endswith("s0")}
    assert table.aggregate(design, one_seed)["targets"][0]["state"] == "provisional (0 of 3 models finished)"
    # a model of a group still to run (mod) leaves the verdict open, though the best so far has every seed
    no_mod = {k: v for k, v in results.items() if not k.startswith("toy-mod")}
    routed, learned = table.aggregate(design, no_mod)["targets"]
    assert routed["state"] == "provisional (2 of 3 models finished)" and routed["seeds"] == [0, 1]
    assert learned["state"] == "pending"
    # a seed of the best model that diverged leaves no verdict, not a ratio over the seeds that trained
    diverged = {k: dict(v, diverged=True, test={"bpb": None}, select={"bpb": None}) if k.startswith("toy-rule") and
                k.endswith("s1") else v for k, v in results.items()}
    assert table.aggregate(design, diverged)["targets"][0]["state"] == "no verdict (seeds 1 diverged)"
    # nor does it hold back a table after a rescore, which leaves a diverged run's held-out fingerprints as they were
    diverged["toy-rule-3e09-lr0.003-s1"]["data"] = {"test": "old", "select": "old"}
    assert "no verdict (seeds 1 diverged)" in table.build(design, diverged, {})["markdown"]
    md = table.build(design, results, {})["markdown"]
    assert "| routed vs plain | toy | 3e09 | rule (base) | plain (base) | 0.9800 | 0.97 | 2 |" in md


@pytest.mark.parametrize("target, message", [
    ({"models": ["rule"], "against": ["nope"]}, "targets[0].against: 'nope' is not a model"),
    ({"models": [], "against": ["plain"]}, "targets[0].models: empty"),
    ({"models": ["rule"], "against": ["plain"], "at_most": 0}, "targets[0].at_most=0"),
    ({"models": ["rule"], "against": ["plain"], "budget": 5e9}, "targets[0].budget=5e+09 is not one of the budgets"),
])
def test_bad_targets_name_the_key(tiny_design, target, message):
    with pytest.raises(UserError, match=re.escape(message)):
        edit_design(tiny_design, lambda r: r.update(targets=[target]))


def test_revisions_do_not_mix_unless_allowed(tiny_design):
    design = load_design(tiny_design)
    results = dict([result(design, "rule", "base", 3e9, 3e-3, 0, 2.0, rev="aaa"),
                    result(design, "plain", "base", 3e9, 3e-3, 0, 2.0, rev="bbb")])
    with pytest.raises(UserError, match="2 versions of pico's training code .*--allow-mixed-revisions"):
        table.build(design, results, {})
    assert table.build(design, results, {}, allow_mixed=True)["json"]["revisions"] == ["aaa", "bbb"]


def test_missing_cells_name_the_failed_runs_log(tiny_design, tmp_path):
    design = load_design(tiny_design)
    k, r = result(design, "rule", "base", 3e9, 3e-3, 0, 2.0)
    built = table.build(design, {k: r}, {"toy-plain-3e09-lr0.003-s0": {"log": "/logs/x.log", "stage": "train",
                                                                        "returncode": -9}})
    assert "- `toy-plain-3e09-lr0.003-s0`: failed (train, exit -9); log: /logs/x.log" in built["markdown"]


def test_experiment2_records_read_through_the_importer(tmp_path):
    design = load_design(REPO / "configs" / "experiments" / "experiment2.yaml")
    results = load_results(design.results_dir if design.results_dir.is_absolute() else REPO / design.results_dir)
    assert len(results) == 92
    built = table.build(design, results, {})
    ratios = {(r["domain"], r["model"], r["baseline"], r["budget"]): r for r in built["json"]["ratios"]}
    # experiment 2's headline (README): the rule vs the plain Transformer at 3e13, 3 seeds
    rule = ratios["prose", "spacelike", "vanilla", 3e13]
    assert len(rule["seeds"]) == 3 and 0.98 < rule["ratio_of_means"] < 1.02
    old = json.loads((REPO / "benchmarks/results/experiment2/results.json").read_text())
    mine = {c["model"]: c for c in built["json"]["best"] if c["domain"] == "prose" and c["budget"] == 3e13}
    assert mine["spacelike"]["mean"] == pytest.approx(old["cells"]["prose/spacelike/3e+13"]["mean"])


def test_legacy_conversion_keeps_the_models_router_statistics():
    old = {"key": "k", "domain": "prose", "model": "pico", "budget": 1e13, "lr": 3e-3, "seed": 0, "steps": 5,
           "rev": "r", "test_bpb": 2.0, "select_bpb": 2.1, "test_sha": "t", "select_sha": "s",
           "eval_router": {"routed_frac_mean": 0.2}, "routing": {"boundary_rate": 0.9}}
    new = legacy(old)
    assert new["test"]["bpb"] == 2.0 and new["router_stats"] == {"routed_frac_mean": 0.2}
    assert new["git_revision"] == "r" and new["shape"] == "base"


def test_results_are_written_atomically(tmp_path):
    path = write_json(tmp_path / "runs" / "k.json", {"key": "k"})
    assert json.loads(path.read_text()) == {"key": "k"} and not list(tmp_path.glob("runs/.*tmp"))


def test_result_files_record_no_absolute_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable(tmp_path / "runs" / "logs" / "k.log") == "runs/logs/k.log"
    assert portable("runs/logs/k.log") == "runs/logs/k.log"
    assert portable(tmp_path.parent / "elsewhere" / "k.log") == "k.log"  # outside the working directory: its name


def _absolute_strings(node, where=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _absolute_strings(v, f"{where}.{k}")
    elif isinstance(node, list):
        for v in node:
            yield from _absolute_strings(v, where)
    elif isinstance(node, str) and node.startswith(("/", "~")):
        yield where, node


def test_committed_results_hold_no_absolute_local_path():
    found = []
    for path in sorted((REPO / "benchmarks" / "results").rglob("*.json*")):
        text = path.read_text()
        try:
            docs = [json.loads(text)]
        except ValueError:  # JSON lines
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        found += [f"{path.relative_to(REPO)}{where}: {value}" for doc in docs for where, value in _absolute_strings(doc)]
    assert not found, found[:5]


def test_launch_order_is_model_major(tiny_design):
    """A stopped experiment has its first models on every domain, not every model on its first domain."""
    def two_domains(raw):
        raw["domains"]["other"] = dict(raw["domains"]["toy"])
        raw["lr"]["fixed"]["other"] = 3e-3
    design = edit_design(tiny_design, two_domains)
    ready, total = plan(design, {})
    assert [(r.model, r.domain) for r in ready] == [("rule", "toy"), ("rule", "other"), ("plain", "toy"), ("plain", "other")]
    assert total == 4


def _staged(raw):
    raw["models"]["rule"]["shapes"] = {"s": ["model.d_local=24"], "m": ["model.d_local=32"], "l": ["model.d_local=40"]}
    raw.update(shape_rule="isoflop", lr={"grid": [1e-3, 2e-3], "budget": 3e9},
               budgets=[3e9, {"flops": 6e9, "shapes": "best", "seeds": [0, 1, 2]}])


def test_a_best_budget_runs_the_best_shape_and_its_better_neighbour_then_seeds_at_the_winner(tiny_design):
    design = edit_design(tiny_design, _staged)
    ready, total = plan(design, {})
    assert {r.budget for r in ready} == {3e9} and total == 3 * 2 + 2 + 4 + 3  # sweeps (rule's 3 shapes, plain's one), then 2 + 2 seeds (1 + 2 for plain)
    sweep = {"s": 2.3, "m": 2.0, "l": 2.1}  # m wins at 3e9; l is its better neighbour
    results = dict(result(design, "rule", s, 3e9, lr, 0, 9.0, select=sweep[s] + lr * 10) for s in sweep
                   for lr in (1e-3, 2e-3))  # 1e-3 wins every sweep: no extension
    ready, _ = plan(design, results)
    rule = [(r.shape, r.budget, r.lr, r.seed) for r in ready if r.model == "rule"]
    assert rule == [("m", 6e9, 1e-3, 0), ("l", 6e9, 1e-3, 0)]
    results.update([result(design, "rule", "m", 6e9, 1e-3, 0, 9.0, select=1.9)])
    assert [r.shape for r in plan(design, results)[0] if r.model == "rule"] == ["l"]  # seeds 1, 2 wait for l's score
    results.update([result(design, "rule", "l", 6e9, 1e-3, 0, 9.0, select=1.8)])  # the bigger shape wins at 6e9
    rule = [(r.shape, r.seed) for r in plan(design, results)[0] if r.model == "rule"]
    assert rule == [("l", 1), ("l", 2)]
    results.update(result(design, "rule", "l", 6e9, 1e-3, x, 9.0 - x / 10, select=1.8) for x in (1, 2))
    assert not [r for r in plan(design, results)[0] if r.model == "rule"]
    best = {c["budget"]: c for c in table.aggregate(design, results)["best"] if c["model"] == "rule"}
    assert best[6e9]["shape"] == "l" and best[6e9]["n_seeds"] == 3 and best[3e9]["shape"] == "m"
    # the winner's other seeds score worse on select than the neighbour's one: the table still reports the
    # shape every seed ran at (chosen at the first seed, as the planner chose it), not the 1-seed neighbour
    results.update(result(design, "rule", "l", 6e9, 1e-3, x, 9.0 - x / 10, select=2.5) for x in (1, 2))
    best = {c["budget"]: c for c in table.aggregate(design, results)["best"] if c["model"] == "rule"}
    assert best[6e9]["shape"] == "l" and best[6e9]["n_seeds"] == 3


def test_a_diverged_run_loses_the_lr_and_shape_choices_instead_of_blocking_them(tiny_design):
    design = edit_design(tiny_design, _staged)
    sweep = {"s": 2.3, "m": 2.0, "l": 2.1}
    results = dict(result(design, "rule", s, 3e9, lr, 0, 9.0, select=sweep[s] + lr * 10) for s in sweep
                   for lr in (1e-3, 2e-3))
    diverged = [k for k, r in results.items() if r["shape"] == "m" and r["lr"] == 1e-3]
    for k in diverged:  # m's best LR diverged: m takes 2e-3 (select 2.02), still ahead of l (2.11 at 1e-3)
        results[k].update(diverged=True, test={"bpb": None}, select={"bpb": None})
    assert chosen_lrs(design, results)["toy", "rule", "m"] == 2e-3
    rule = [(r.shape, r.lr) for r in plan(design, results)[0] if r.model == "rule" and r.budget == 6e9]
    assert rule == [("m", 2e-3), ("l", 1e-3)]
    agg = table.aggregate(design, results)
    assert agg["diverged"] == diverged and all(c["mean"] is not None for c in agg["cells"])
    assert f"- `{diverged[0]}`" in table.build(design, results, {})["markdown"]


def test_a_best_budget_needs_an_isoflop_sweep_elsewhere(tiny_design):
    def fixed(raw):
        _staged(raw)
        raw["shape_rule"] = "fixed"
        del raw["models"]["rule"]["shapes"]
    with pytest.raises(UserError, match=r"budgets\[1\].shapes=best: needs shape_rule isoflop"):
        edit_design(tiny_design, fixed)
    with pytest.raises(UserError, match=r"budgets\[1\].shapes=best"):
        edit_design(tiny_design, lambda raw: (_staged(raw), raw["lr"].update(budget=6e9)))


def test_the_code_fingerprint_is_the_content_of_the_training_code(tmp_path):
    """Same training code, same fingerprint: on disk and from git's objects alike, through planner, design and
    decoding commits and through a change that was undone; a real change is a new one."""
    import subprocess

    from pico.pipeline.experiment.job import code_fingerprint, fingerprint_at

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    def commit(files: dict[str, str]) -> str:
        for path, text in files.items():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)
        git("add", "-A")
        git("commit", "-qm", "x")
        return git("rev-parse", "HEAD")

    git("init", "-q")
    base = commit({"model/pico.py": "w = 1\n", "configs/q.yaml": "a: 1\n"})
    fp = fingerprint_at(base, tmp_path)
    assert fp == code_fingerprint(tmp_path) and len(fp) == 16
    later = commit({"pipeline/experiment/plan.py": "p", "configs/experiments/x.yaml": "c", "model/generate.py": "g",
                    "README.md": "r"})
    assert fingerprint_at(later, tmp_path) == fp == code_fingerprint(tmp_path)
    changed = commit({"model/pico.py": "w = 2\n"})
    assert fingerprint_at(changed, tmp_path) != fp
    undone = commit({"model/pico.py": "w = 1\n"})
    assert fingerprint_at(undone, tmp_path) == fp == code_fingerprint(tmp_path)
    assert fingerprint_at("abc", tmp_path) is None


def test_training_and_scoring_never_import_the_decoder():
    """job.NOT_RUN_CODE leaves decoding out of a run's revision: `pico train` and `pico eval` must not use it."""
    import subprocess
    import sys

    code = ("import sys, pico.pipeline.train.trainer, pico.pipeline.commands.eval, pico.pipeline.experiment.job; "
            "print(sorted(m for m in sys.modules if m in ('pico.model.generate', 'pico.pipeline.commands.generate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_sweep_grows_past_an_end_shape_that_wins(tiny_design):
    """With `start`, the IsoFLOP sweep adds the next listed shape while an end of the swept range wins, so
    the minimum ends up with a shape on each side (or at the end of the list)."""
    from pico.pipeline.experiment.plan import swept_shapes

    def staged(raw):
        raw["models"]["rule"].update(shapes={k: [f"model.d_local={w}"] for k, w in
                                             (("xs", 16), ("s", 24), ("m", 32), ("l", 40))}, start=["s", "m"])
        raw.update(shape_rule="isoflop", lr={"fixed": {"toy": 1e-3}})
    design = edit_design(tiny_design, staged)
    assert [r.shape for r in plan(design, {})[0] if r.model == "rule"] == ["s", "m"]
    select = {"xs": 1.9, "s": 2.0, "m": 2.1, "l": 1.0}  # l would win, but nothing points past m
    results = dict(result(design, "rule", s, 3e9, 1e-3, 0, 9.0, select=select[s]) for s in ("s", "m"))
    assert swept_shapes(design, results, "toy", "rule") == ["xs", "s", "m"]  # s, the small end, won
    assert [r.shape for r in plan(design, results)[0] if r.model == "rule"] == ["xs"]
    results.update([result(design, "rule", "xs", 3e9, 1e-3, 0, 9.0, select=select["xs"])])
    assert swept_shapes(design, results, "toy", "rule") == ["xs", "s", "m"]  # xs wins at the list's end: done
    assert not [r for r in plan(design, results)[0] if r.model == "rule"]
    other = dict(result(design, "rule", s, 3e9, 1e-3, 0, 9.0, select=x) for s, x in (("s", 2.0), ("m", 1.5)))
    assert swept_shapes(design, other, "toy", "rule") == ["s", "m", "l"]  # had m, the large end, won: l follows


@pytest.mark.parametrize("start, message", [(["xs", "m"], "give adjacent shapes"), (["big"], "'big' is not one of")])
def test_start_shapes_must_be_adjacent_names(tiny_design, start, message):
    def staged(raw):
        raw["models"]["rule"].update(shapes={"xs": [], "s": [], "m": []}, start=start)
        raw.update(shape_rule="isoflop")
    with pytest.raises(UserError, match=f"models.rule.start.*{message}"):
        edit_design(tiny_design, staged)


def test_hours_left_use_the_rate_each_shape_measured(tiny_design):
    """Small shapes train at a fraction of larger ones' FLOP/s: the time left charges each cell its own rate."""
    from pico.pipeline.experiment.drive import estimate, hours_left

    design = edit_design(tiny_design, _staged)
    rates = {"s": 1e9, "m": 4e9, "l": 4e9}
    rows = estimate(design)["cells"]
    sweep = {r["shape"]: r["flops"] / 2 for r in rows if r["model"] == "rule" and not r.get("best")}  # 2 LRs each
    results = {}
    for s, rate in rates.items():  # rule's sweeps at 3e9 all done, at each shape's own rate
        for lr in (1e-3, 2e-3):
            k, r = result(design, "rule", s, 3e9, lr, 0, 2.0)
            results[k] = dict(r, flops=sweep[s], flops_per_byte=1e6, train={"bytes_per_s_median": rate / 1e6})
    left, median = hours_left(design, results)
    plain = sum(r["flops"] for r in rows if r["model"] == "plain")  # unmeasured model and shape: the median
    best = next(r["flops"] for r in rows if r.get("best") and r["model"] == "rule")  # rule's own median
    assert median == 4e9 and left == pytest.approx((plain / 4e9 + best / 4e9) / 3600)
    results = {k: dict(r, train={"bytes_per_s_median": 1e3}) for k, r in results.items()}  # all at 1e9
    assert hours_left(design, results)[0] == pytest.approx((plain + best) / 1e9 / 3600)
    # a run scored by a rerun that trained no step measured no rate: it is left out, not a crash
    results[next(iter(results))]["train"] = {"bytes_per_s_median": None}
    assert hours_left(design, results)[0] == pytest.approx((plain + best) / 1e9 / 3600)
