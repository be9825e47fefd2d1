"""Which runs the design asks for, given the runs already finished: the LR rule and the launch order.

Pure functions of the design and the finished results (tested on hand-made results), model-major:
a model's LR sweeps come first, then its runs at the other budgets and seeds once the sweep has
chosen their LR (and, for a `shapes: best` budget, their shape), seeds in ascending order; then the
next model's. An interrupted experiment leaves whole models, the first ones of the design, and
while a model waits for a choice the next model's runs fill the free slots.
"""

from __future__ import annotations

from pico.pipeline.experiment.design import (Design, Run, budgets, label, picks_best, seeds_at, shape_budgets,
                                             shapes_of)
from pico.pipeline.experiment.store import select_bpb


def sweep_budget(design: Design, model: str, shape: str) -> float:
    """The budget a shape's LR is swept at: lr.budget when the shape runs there, else its smallest."""
    own = shape_budgets(design, model, shape)
    return design.lr.budget if design.lr.budget in own else min(own)


def lr_grid(design: Design, results: dict[str, dict], domain: str, model: str, shape: str
            ) -> tuple[list[float], float | None]:
    """(the LRs to sweep, the chosen LR or None while the sweep is incomplete) of one domain, model and shape.

    The lowest select-set bpb wins (ties: the lower LR; a run that diverged loses); while the winner is at an edge of the
    grid, the LR past that edge (x0.5 or x2) is added, at most lr.extend times."""
    if design.lr.fixed:
        lr = design.lr.fixed[domain]
        return [lr], lr
    b = sweep_budget(design, model, shape)
    select = {}
    for lr in _all_lrs(design, results, domain, model, shape, b):
        r = results.get(Run(domain, model, shape, b, lr, design.lr.seed).key(design))
        if r is not None:
            select[lr] = select_bpb(r)
    grid = sorted(design.lr.grid)
    for _ in range(design.lr.extend + 1):
        if not all(lr in select for lr in grid):
            return grid, None
        best = min(grid, key=lambda lr: (select[lr], lr))
        if len(grid) - len(design.lr.grid) == design.lr.extend or grid[0] < best < grid[-1]:
            return grid, best
        grid = [best / 2, *grid] if best == grid[0] else [*grid, best * 2]
    raise AssertionError("unreachable")


def _all_lrs(design: Design, results: dict[str, dict], domain: str, model: str, shape: str, b: float) -> set[float]:
    return {r["lr"] for r in results.values() if (r["domain"], r["model"], r.get("shape", "base"), r["budget"],
                                                  r["seed"]) == (domain, model, shape, b, design.lr.seed)}


def cells(design: Design):
    """(domain, model, shape) in the design's order: model-major, so a stopped experiment has its first
    models on every domain rather than every model on its first domain."""
    for m, spec in design.models.items():
        for d in design.domains:
            for s in shapes_of(spec):
                yield d, m, s


def swept_shapes(design: Design, results: dict[str, dict], domain: str, model: str) -> list[str]:
    """The shapes one domain and model sweeps, given the results so far: the model's `start` (default
    every shape), grown by the next listed shape while the best swept one (lowest select bpb at its
    chosen LR) sits at an end of the range and `shapes` lists one beyond it."""
    names = list(shapes_of(design.models[model]))
    start = design.models[model].start
    if not start:
        return names
    lo, hi = names.index(start[0]), names.index(start[-1])
    while True:
        select = {}
        for s in names[lo:hi + 1]:
            lr = lr_grid(design, results, domain, model, s)[1]
            r = lr is not None and results.get(Run(domain, model, s, sweep_budget(design, model, s), lr,
                                                   design.lr.seed).key(design))
            if not r:  # still sweeping
                return names[lo:hi + 1]
            select[s] = select_bpb(r)
        best = min(range(lo, hi + 1), key=lambda j: (select[names[j]], j))
        if best == lo and lo > 0:
            lo -= 1
        elif best == hi and hi < len(names) - 1:
            hi += 1
        else:
            return names[lo:hi + 1]


def chosen_lrs(design: Design, results: dict[str, dict]) -> dict[tuple[str, str, str], float]:
    out = {}
    for cell in cells(design):
        lr = lr_grid(design, results, *cell)[1]
        if lr is not None:
            out[cell] = lr
    return out


def best_shapes(design: Design, results: dict[str, dict], domain: str, model: str, budget: float
                ) -> tuple[list[str] | None, str | None]:
    """A `shapes: best` budget of one domain and model: (the shapes its first seed runs at, None while the
    sweep budget has not chosen every shape's LR; the shape its other seeds run at, None until both
    first-seed runs finished).

    The first are the shape with the lowest select bpb at the sweep budget (ties: the earlier shape) and
    the better of its neighbours in the model's shape list; the second is whichever of them has the
    lower select bpb at this budget."""
    names = swept_shapes(design, results, domain, model)
    select, lrs = {}, {}
    for s in names:
        lrs[s] = lr_grid(design, results, domain, model, s)[1]
        if lrs[s] is None:
            return None, None
        select[s] = select_bpb(results[Run(domain, model, s, design.lr.budget, lrs[s], design.lr.seed).key(design)])
    i = min(range(len(names)), key=lambda j: (select[names[j]], j))
    near = [j for j in (i - 1, i + 1) if 0 <= j < len(names)]
    picked = [names[i]] + ([names[min(near, key=lambda j: (select[names[j]], j))]] if near else [])
    first = seeds_at(design, budget)[0]
    here = {s: results.get(Run(domain, model, s, budget, lrs[s], first).key(design)) for s in picked}
    if any(r is None for r in here.values()):
        return picked, None
    return picked, min(picked, key=lambda s: (select_bpb(here[s]), names.index(s)))


def plan(design: Design, results: dict[str, dict]) -> tuple[list[Run], int]:
    """(runs ready to launch and not finished, in launch order; the number of runs the design has in all,
    as far as the sweeps so far tell).

    Model-major: a model's LR sweeps, then its runs at the other budgets and seeds (ascending), then the
    next model's; a run whose LR or shape is not chosen yet waits, and the next model's runs fill in."""
    order, total, _ = _named(design, results)
    ready, seen = [], set()
    for run in order:
        k = run.key(design)
        if k not in results and k not in seen:
            ready.append(run)
            seen.add(k)
    return ready, len(total)


def unfinished(design: Design, results: dict[str, dict]) -> set[tuple[str, str, float]]:
    """The (domain, model, budget)s with a run still to do: ready, or waiting for an LR or shape choice. A
    model's numbers at budget b are final once none of its budgets up to b is here (an LR sweep or a
    shape range may still grow until then)."""
    order, _, waiting = _named(design, results)
    return {(r.domain, r.model, r.budget) for r in order if r.key(design) not in results} | waiting


def _named(design: Design, results: dict[str, dict]) -> tuple[list[Run], set[str], set[tuple[str, str, float]]]:
    """(the runs the design names now, in launch order, finished ones included; the keys of all its runs, those
    waiting for a choice as placeholders; the (domain, model, budget)s with runs waiting)."""
    order: list[Run] = []
    total: set[str] = set()
    waits: set[tuple[str, str, float]] = set()
    seeds = sorted({x for b in budgets(design) for x in seeds_at(design, b)})
    for model in design.models:
        mine = [(d, s) for d in design.domains for s in swept_shapes(design, results, d, model)]
        chosen = {}
        for d, s in mine:
            grid, lr = lr_grid(design, results, d, model, s)
            if not design.lr.fixed:
                sweep = [Run(d, model, s, sweep_budget(design, model, s), x, design.lr.seed) for x in grid]
                order += sweep
                total |= {r.key(design) for r in sweep}
            chosen[d, s] = lr
        for seed in seeds:
            for b in budgets(design):
                if seed not in seeds_at(design, b):
                    continue
                for d in design.domains:
                    runs, waiting = _runs_at(design, results, chosen, d, model, b, seed)
                    order += runs
                    total |= {r.key(design) for r in runs} | {f"{d}-{model}-?{i}-{label(b)}-{seed}" for i in range(waiting)}
                    if waiting:
                        waits.add((d, model, b))
    return order, total, waits


def _runs_at(design: Design, results: dict[str, dict], chosen: dict, domain: str, model: str, budget: float,
             seed: int) -> tuple[list[Run], int]:
    """(the runs of one domain, model, budget and seed that can be named now; how many more wait for a choice)."""
    if picks_best(design, budget):
        picked, winner = best_shapes(design, results, domain, model, budget)
        first = seed == seeds_at(design, budget)[0]
        if picked is None:
            return [], min(2, len(swept_shapes(design, results, domain, model))) if first else 1
        shapes = picked if first else [winner] if winner else []
        return [Run(domain, model, s, budget, chosen[domain, s], seed) for s in shapes], int(not shapes)
    runs, waiting = [], 0
    for d, s in chosen:
        if d != domain or budget not in shape_budgets(design, model, s):
            continue
        if chosen[d, s] is None:  # not swept yet: count the run, launch it later
            waiting += not (budget == sweep_budget(design, model, s) and seed == design.lr.seed)
            continue
        runs.append(Run(d, model, s, budget, chosen[d, s], seed))
    return runs, waiting
