"""The table of a design's finished runs: bpb per cell, paired ratios, router behaviour, the scaling plot.

Pure arithmetic on result dicts (tested on hand-made ones):
- a cell is (domain, model, shape, budget) at the shape's chosen LR; its bpb is the mean and
  sample std (n-1) of the test bpb over the seeds that finished;
- a model's point at a budget is its best shape there: the lowest mean *select* bpb (the test set
  is never used to choose); with one shape per model that is the shape;
- ratios compare each model with each baseline at their best shapes, over the seeds both have
  (a seed fixes the data order, which moves every model's bpb alike): the ratio of the means over
  those paired seeds, and the per-seed ratios' min..max;
- router behaviour is what the model reported while scoring the test set (`pico eval`'s
  router/* statistics), averaged over seeds: boundary rate, share of boundaries at rule positions
  and at word starts (the byte after a spacelike one), chunk lengths where the router reports them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pico.configs.errors import UserError
from pico.pipeline.experiment.design import Design, budgets, label, picks_best, seeds_at, shape_budgets, shapes_of
from pico.pipeline.experiment.plan import best_shapes, cells, chosen_lrs, plan, unfinished

ROUTER_COLUMNS = (("boundary rate", "routed_frac_mean"), ("at rule", "spacelike_share_of_routed"),
                  ("at word start", "after_spacelike_share_of_routed"), ("chunk len mean", "chunk_len_mean"),
                  ("chunk len p50", "chunk_len_p50"), ("chunk len p90", "chunk_len_p90"))


def check_revisions(results: dict[str, dict], allow_mixed: bool) -> list[str]:
    """The training code the results ran (its content hash, `job.code_fingerprint`); an error when there are
    several and mixing was not allowed.

    A result records the hash of its code; an older one, only its git revision, whose hash git computes
    (`job.fingerprint_at`; failing that, the revision itself stands for it). So a planner, design, decoding or
    README commit, or a change undone, does not split a table."""
    revs = sorted({code_identity(r) for r in results.values()})
    if len(revs) > 1 and not allow_mixed:
        raise UserError(f"the results come from {len(revs)} versions of pico's training code "
                        f"({', '.join(r[:12] for r in revs)}); one table is one version: rerun the odd runs, "
                        "or pass --allow-mixed-revisions")
    for domain in {r["domain"] for r in results.values()}:
        sets = {(r["data"].get("test"), r["data"].get("select")) for r in results.values()
                if r["domain"] == domain and not r.get("diverged")}  # a diverged run has no held-out score
        if len(sets) > 1:
            raise UserError(f"domain {domain}: runs were scored on {len(sets)} different held-out sets; "
                            "move the runs of the old data away")
    return revs


def code_identity(r: dict) -> str:
    """The content hash of the code a result ran (see check_revisions)."""
    from pico.pipeline.experiment.job import fingerprint_at

    if r.get("code_sha"):
        return str(r["code_sha"])
    rev = str(r.get("git_revision"))
    return fingerprint_at(rev) or rev


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(design: Design, results: dict[str, dict]) -> dict:
    """Cells, best shapes, ratios and router rows of the finished results."""
    chosen = chosen_lrs(design, results)
    cell_rows = {}
    for (d, m, s), lr in chosen.items():
        for b in shape_budgets(design, m, s):
            here = [r for r in results.values()
                    if (r["domain"], r["model"], r.get("shape", "base"), r["budget"], r["lr"]) == (d, m, s, b, lr)]
            rs = sorted((r for r in here if not r.get("diverged")), key=lambda r: r["seed"])
            if not rs:
                continue
            mean, std = mean_std([r["test"]["bpb"] for r in rs])
            cell_rows[d, m, s, b] = {
                "domain": d, "model": m, "shape": s, "budget": b, "lr": lr, "n_seeds": len(rs), "mean": mean,
                "std": std, "select_mean": statistics.fmean(r["select"]["bpb"] for r in rs),
                "per_seed": {r["seed"]: r["test"]["bpb"] for r in rs}, "params": rs[0].get("params"),
                "diverged_seeds": sorted(r["seed"] for r in here if r.get("diverged")),
                "router": _router_means(rs)}
    best = {}
    for (d, m, s, b), c in cell_rows.items():
        old = best.get((d, m, b))
        if old is None or (c["select_mean"], s) < (old["select_mean"], old["shape"]):
            best[d, m, b] = c
    for (d, m, b) in best:
        if picks_best(design, b):  # the shape the planner ran every seed at (chosen at the first seed), not
            winner = best_shapes(design, results, d, m, b)[1]  # the lower mean of 3 seeds against 1
            if (d, m, winner, b) in cell_rows:
                best[d, m, b] = cell_rows[d, m, winner, b]
    baselines = design.baselines or [next(iter(design.models))]
    ratios = []
    for (d, m, b), c in sorted(best.items(), key=lambda x: _order(design, x[0])):
        for base in baselines:
            bc = best.get((d, base, b))
            if base == m or bc is None:
                continue
            shared = sorted(set(c["per_seed"]) & set(bc["per_seed"]))
            if not shared:
                continue
            per = [c["per_seed"][x] / bc["per_seed"][x] for x in shared]
            means = [statistics.fmean(cell["per_seed"][x] for x in shared) for cell in (c, bc)]
            ratios.append({"domain": d, "budget": b, "model": m, "shape": c["shape"], "baseline": base,
                           "baseline_shape": bc["shape"], "ratio_of_means": means[0] / means[1], "seeds": shared,
                           "per_seed": per, "min": min(per), "max": max(per)})
    return {"chosen_lr": {"/".join(k): v for k, v in chosen.items()}, "cells": list(cell_rows.values()),
            "best": [best[k] for k in sorted(best, key=lambda k: _order(design, k))], "ratios": ratios,
            "targets": targets(design, best, unfinished(design, results)), "diverged": sorted(k for k, r in results.items() if r.get("diverged"))}


def targets(design: Design, best: dict, open_: set[tuple[str, str, float]]) -> list[dict]:
    """The design's claims per domain and budget: the best of each group (lowest select-set bpb, as shapes
    are chosen), the ratio of their test-bpb means over paired seeds, and whether the claim holds. Only the
    claim's own budget gives a verdict, once every model of both groups has finished its runs up to it
    (`open_`: `plan.unfinished`) with all its seeds; the rest are provisional. A seed that diverged leaves
    no verdict: the claim is about models that train."""
    out = []
    for t in design.targets:
        judged_at = t.budget or max(budgets(design))
        members = list(dict.fromkeys([*t.models, *t.against]))
        for d in design.domains:
            done = [m for m in members if not any((d, m, b) in open_ for b in budgets(design) if b <= judged_at)]
            for b in budgets(design):
                pick = [min((best[d, m, b] for m in group if (d, m, b) in best), default=None,
                            key=lambda c: (c["select_mean"], c["model"])) for group in (t.models, t.against)]
                row = {"target": t.name, "domain": d, "budget": b, "at_most": t.at_most, "judged": b == judged_at,
                       "model": pick[0] and pick[0]["model"], "shape": pick[0] and pick[0]["shape"],
                       "against": pick[1] and pick[1]["model"], "against_shape": pick[1] and pick[1]["shape"],
                       "seeds": [], "ratio_of_means": None, "per_seed": [], "std": None, "state": "pending"}
                if None not in pick:
                    c, bc = pick
                    shared = sorted(set(c["per_seed"]) & set(bc["per_seed"]))
                    if shared:
                        per = [c["per_seed"][x] / bc["per_seed"][x] for x in shared]
                        ratio = (statistics.fmean(c["per_seed"][x] for x in shared)
                                 / statistics.fmean(bc["per_seed"][x] for x in shared))
                        want = len(seeds_at(design, b))
                        lost = sorted(set(c["diverged_seeds"]) | set(bc["diverged_seeds"]))
                        row.update(seeds=shared, ratio_of_means=ratio, per_seed=per, std=mean_std(per)[1])
                        if b != judged_at:
                            row["state"] = "provisional"
                        elif len(done) < len(members):
                            row["state"] = f"provisional ({len(done)} of {len(members)} models finished)"
                        elif len(shared) < want and lost:
                            row["state"] = f"no verdict (seeds {', '.join(map(str, lost))} diverged)"
                        elif len(shared) < want:
                            row["state"] = f"provisional ({len(shared)} of {want} seeds)"
                        elif ratio <= t.at_most:
                            row["state"] = "met"
                        else:
                            row["state"] = f"missed by {100 * (ratio / t.at_most - 1):.1f} %"
                out.append(row)
    return out


def _order(design: Design, key: tuple) -> tuple:
    d, m, b = key
    return list(design.domains).index(d), b, list(design.models).index(m)


def _router_means(rs: list[dict]) -> dict[str, float]:
    keys = {k for r in rs for k in (r.get("router_stats") or {})}
    out = {}
    for k in sorted(keys):
        vals = [r["router_stats"][k] for r in rs if r.get("router_stats", {}).get(k) is not None]
        if vals:
            out[k] = statistics.fmean(vals)
    return out


def missing(design: Design, results: dict[str, dict], failures: dict[str, dict]) -> list[dict]:
    """Runs the design still needs: not run yet, or failed (with the failed run's log path)."""
    ready, _ = plan(design, results)
    out = []
    for run in ready:
        key = run.key(design)
        f = failures.get(key)
        out.append({"key": key, "model": run.model, "state": "failed" if f else "not run", "log": f and f.get("log"),
                    "stage": f and f.get("stage"), "returncode": f and f.get("returncode")})
    return out


def _who(model: str | None, shape: str | None) -> str:
    return f"{model} ({shape})" if model else "-"


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _progress(finished: int, planned: int, ready: int) -> str:
    if finished >= planned:
        return f"all {finished} runs finished"
    waiting = planned - finished - ready
    return (f"{finished} of {planned} runs finished ({ready} ready to launch"
            + (f", {waiting} waiting for an LR or shape choice)" if waiting > 0 else ")"))


def markdown(design: Design, agg: dict, revs: list[str], todo: list[dict], n_finished: int, n_planned: int) -> str:
    isoflop = design.shape_rule != "fixed"
    lines = [f"# {design.title or design.name}", "",
             f"Design `{design.name}` ({design.shape_rule} shapes); pico training code {', '.join(f'`{r[:12]}`' for r in revs) or '-'} "
             "(content hash, `job.code_fingerprint`); "
             f"{_progress(n_finished, n_planned, len(todo))}. bpb: bits per byte on each domain's held-out *test* set "
             "(causal routing, `pico eval`); LRs and shapes were chosen on the disjoint *select* set.", "",
             "## Bits per byte" + (" (each model at its best shape per budget)" if isoflop else ""), "",
             "mean and sample std over the seeds that finished; compare models by the paired ratios below.", "",
             "| domain | budget | model | shape | params | LR | seeds | mean | std | per seed |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in agg["best"]:
        lines.append(f"| {c['domain']} | {label(c['budget'])} | {c['model']} | {c['shape']} | {fmt(c['params'], ',')} | "
                     f"{c['lr']:g} | {c['n_seeds']} | {c['mean']:.4f} | {fmt(c['std'])} | "
                     f"{', '.join(f'{v:.4f}' for v in c['per_seed'].values())} |")
    lines += ["", "## Ratios (model / baseline, each at its best shape)", "",
              "ratio of the means over the seeds both finished; per-seed ratios min..max.", "",
              "| domain | budget | model | baseline | ratio of means | pairs | per-seed min..max |",
              "| --- | ---: | --- | --- | ---: | ---: | --- |"]
    for r in agg["ratios"]:
        lines.append(f"| {r['domain']} | {label(r['budget'])} | {r['model']} | {r['baseline']} | "
                     f"{r['ratio_of_means']:.4f} | {len(r['seeds'])} | {r['min']:.4f}..{r['max']:.4f} |")
    if agg["targets"]:
        lines += ["", "## Targets", "",
                  "each group's best member at its best shape (chosen on the select set); ratio of the test-bpb means "
                  "over paired seeds, per-seed ratios min..max and their std; judged at the claim's budget once "
                  "every model of both groups has finished its runs there with all its seeds (a diverged seed "
                  "leaves no verdict), provisional elsewhere.", "",
                  "| target | domain | budget | best | against | ratio of means | at most | pairs | per-seed min..max "
                  "| std | state |",
                  "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
        for r in agg["targets"]:
            per = f"{min(r['per_seed']):.4f}..{max(r['per_seed']):.4f}" if r["per_seed"] else "-"
            lines.append(f"| {r['target']} | {r['domain']} | {label(r['budget'])} | {_who(r['model'], r['shape'])} | "
                         f"{_who(r['against'], r['against_shape'])} | {fmt(r['ratio_of_means'])} | {r['at_most']:g} | "
                         f"{len(r['seeds'])} | {per} | {fmt(r['std'])} | {r['state']} |")
    if isoflop:
        lines += ["", "## Every shape (IsoFLOP profile)", "",
                  "| domain | budget | model | shape | params | LR | seeds | select bpb | test bpb |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in sorted(agg["cells"], key=lambda c: (list(design.domains).index(c["domain"]), c["budget"],
                                                     list(design.models).index(c["model"]), c["params"] or 0)):
            lines.append(f"| {c['domain']} | {label(c['budget'])} | {c['model']} | {c['shape']} | {fmt(c['params'], ',')} "
                         f"| {c['lr']:g} | {c['n_seeds']} | {c['select_mean']:.4f} | {c['mean']:.4f} |")
    lines += ["", "## Router behaviour on the test set (the model's own statistics, mean over seeds)", "",
              "boundary rate: share of positions routed; at rule: share of boundaries at SpaceByte rule positions; "
              "at word start: at the byte after one; chunk lengths where the router reports them.", "",
              "| domain | budget | model | " + " | ".join(n for n, _ in ROUTER_COLUMNS) + " |",
              "| --- | ---: | --- |" + " ---: |" * len(ROUTER_COLUMNS)]
    for c in agg["best"]:
        if c["router"]:
            lines.append(f"| {c['domain']} | {label(c['budget'])} | {c['model']} | "
                         + " | ".join(fmt(c["router"].get(k), ".3f") for _, k in ROUTER_COLUMNS) + " |")
    if agg["diverged"]:
        lines += ["", "## Diverged runs (NaN or infinite loss: they lose the LR and shape choices)", ""]
        lines += [f"- `{k}`" for k in agg["diverged"]]
    if todo:
        lines += ["", "## Missing cells", ""]
        lines += [f"- `{t['key']}`: failed ({t['stage']}, exit {t['returncode']}); log: {t['log']}"
                  for t in todo if t["state"] == "failed"]
        waiting: dict[str, list[str]] = {}
        for t in todo:
            if t["state"] != "failed":
                waiting.setdefault(t["model"], []).append(t["key"])
        if waiting:
            lines.append("- ready to launch, not run yet: " + "; ".join(
                f"{m} {len(keys)} (`{keys[0]}`{', ...' if len(keys) > 1 else ''})" for m, keys in waiting.items()))
    return "\n".join(lines) + "\n"


def scaling_plot(design: Design, agg: dict, path: Path) -> Path | None:
    """bpb against budget per model (each at its best shape), one panel per domain."""
    if not agg["best"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(design.domains)
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for m in design.models:
            pts = sorted((c["budget"], c["mean"], c["std"] or 0.0) for c in agg["best"]
                         if c["domain"] == d and c["model"] == m)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("test bits per byte")
        ax.set_title(f"{d}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, design, path)


def _save(fig, design: Design, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(design.title or design.name, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def isoflop_plot(design: Design, agg: dict, path: Path) -> Path | None:
    """IsoFLOP profiles: test bpb against parameters, one line per model through its shapes at their
    chosen LRs, one panel per domain and budget; the shape chosen on the select set is starred."""
    cells_ = [c for c in agg["cells"] if c["params"]]
    panels = sorted({(c["domain"], c["budget"]) for c in cells_},
                    key=lambda k: (list(design.domains).index(k[0]), k[1]))
    if design.shape_rule != "isoflop" or not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {(c["domain"], c["model"], c["budget"]): c["shape"] for c in agg["best"]}
    budgets_ = sorted({b for _, b in panels})
    fig, axes = plt.subplots(len(design.domains), len(budgets_), squeeze=False,
                             figsize=(max(8.0, 5.5 * len(budgets_)), 4 * len(design.domains)))  # room for the title
    for i, d in enumerate(design.domains):
        for j, b in enumerate(budgets_):
            ax = axes[i][j]
            for k, m in enumerate(design.models):
                pts = sorted((c["params"], c["mean"], c["std"] or 0.0, c["shape"]) for c in cells_
                             if (c["domain"], c["model"], c["budget"]) == (d, m, b))
                if not pts:
                    continue
                xs, ys, es, names = zip(*pts)
                line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, color=f"C{k % 10}")
                for x, y, name in zip(xs, ys, names):
                    if best.get((d, m, b)) == name:
                        ax.plot([x], [y], marker="*", markersize=14, color=line[0].get_color())
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel("test bits per byte")
            ax.set_title(f"{d}, {label(b)} training FLOPs (star: best on select)", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    return _save(fig, design, path)


def build(design: Design, results: dict[str, dict], failures: dict[str, dict], allow_mixed: bool = False) -> dict:
    """Everything `pico experiment table` writes: markdown text and the JSON payload."""
    used = {k: r for k, r in results.items() if r["domain"] in design.domains and r["model"] in design.models
            and r.get("shape", "base") in shapes_of(design.models[r["model"]]) and r["budget"] in budgets(design)}
    revs = check_revisions(used, allow_mixed)
    agg = aggregate(design, used)
    todo = missing(design, used, failures)
    planned = plan(design, used)[1]
    return {"markdown": markdown(design, agg, revs, todo, len(used), planned),
            "json": {"design": design.name, "revisions": revs, "finished": len(used), "planned": planned,
                     "missing": todo, **agg}}


__all__ = ["build", "aggregate", "scaling_plot", "isoflop_plot", "check_revisions", "cells"]
