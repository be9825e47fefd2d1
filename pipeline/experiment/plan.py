"""Which runs the design asks for, given the runs already finished: the LR rule and the launch order.

Pure functions of the design and the finished results (tested on hand-made results): the LR
sweeps come first; a model's runs at the other budgets and seeds follow once its sweep has
chosen its LR; seeds go in ascending order, so an interrupted experiment has every model at the
same number of seeds.
"""

from __future__ import annotations

from pico.pipeline.experiment.design import Design, Run, budgets, seeds_at, shape_budgets, shapes_of


def sweep_budget(design: Design, model: str, shape: str) -> float:
    """The budget a shape's LR is swept at: lr.budget when the shape runs there, else its smallest."""
    own = shape_budgets(design, model, shape)
    return design.lr.budget if design.lr.budget in own else min(own)


def lr_grid(design: Design, results: dict[str, dict], domain: str, model: str, shape: str
            ) -> tuple[list[float], float | None]:
    """(the LRs to sweep, the chosen LR or None while the sweep is incomplete) of one domain, model and shape.

    The lowest select-set bpb wins (ties: the lower LR); while the winner is at an edge of the
    grid, the LR past that edge (x0.5 or x2) is added, at most lr.extend times."""
    if design.lr.fixed:
        lr = design.lr.fixed[domain]
        return [lr], lr
    b = sweep_budget(design, model, shape)
    select = {}
    for lr in _all_lrs(design, results, domain, model, shape, b):
        r = results.get(Run(domain, model, shape, b, lr, design.lr.seed).key(design))
        if r is not None:
            select[lr] = r["select"]["bpb"]
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


def chosen_lrs(design: Design, results: dict[str, dict]) -> dict[tuple[str, str, str], float]:
    out = {}
    for cell in cells(design):
        lr = lr_grid(design, results, *cell)[1]
        if lr is not None:
            out[cell] = lr
    return out


def plan(design: Design, results: dict[str, dict]) -> tuple[list[Run], int]:
    """(runs ready to launch and not finished, in launch order; the number of runs the design has in all,
    as far as the sweeps so far tell)."""
    order: list[Run] = []
    total: set[str] = set()
    chosen = {}
    for d, m, s in cells(design):
        grid, lr = lr_grid(design, results, d, m, s)
        if not design.lr.fixed:
            sweep = [Run(d, m, s, sweep_budget(design, m, s), x, design.lr.seed) for x in grid]
            order += sweep
            total |= {r.key(design) for r in sweep}
        chosen[d, m, s] = lr
    for seed in sorted({x for b in budgets(design) for x in seeds_at(design, b)}):
        for b in budgets(design):
            if seed not in seeds_at(design, b):
                continue
            for d, m, s in cells(design):
                if b not in shape_budgets(design, m, s):
                    continue
                lr = chosen[d, m, s]
                if lr is None:  # not swept yet: count the run, launch it later
                    if not (b == sweep_budget(design, m, s) and seed == design.lr.seed):
                        total.add(f"{d}-{m}-{s}-{b}-{seed}")
                    continue
                run = Run(d, m, s, b, lr, seed)
                order.append(run)
                total.add(run.key(design))
    ready, seen = [], set()
    for run in order:
        k = run.key(design)
        if k not in results and k not in seen:
            ready.append(run)
            seen.add(k)
    return ready, len(total)
