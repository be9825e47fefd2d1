"""Design files: strict parsing, one-line errors naming the key, steps and FLOP matching, the shipped designs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pico.configs.errors import UserError
from pico.pipeline.experiment.design import check_models, load_design, steps_for
from tests.conftest import REPO


def edit(path: Path, change) -> Path:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_tiny_design_resolves_steps_from_flops_per_byte(tiny_design):
    design = load_design(tiny_design)
    shapes = check_models(design)
    rule, plain = shapes["rule", "base"], shapes["plain", "base"]
    assert rule.router == "spacelike" and plain.router == "none"
    # every run of the budget spends the same training FLOPs: steps x FLOPs/byte x bytes/step ~ budget
    for sh in (rule, plain):
        steps = steps_for(sh, 3e9)
        assert steps > 1 and abs(steps * sh.flops_per_byte * sh.bytes_per_step / 3e9 - 1) < 1 / steps
    assert steps_for(rule, 3e9) != steps_for(plain, 3e9)  # they cost different FLOPs per byte


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(colour="red"), "unknown key colour"),
    (lambda r: r["models"]["rule"].update(typo=1), "unknown key models.rule.typo"),
    (lambda r: r["lr"].update(grid=[1e-3]), "lr: give exactly one of grid"),
    (lambda r: r.update(budgets=[1e3]), "budgets: 1000 is smaller than one training step of models.rule"),
    (lambda r: r["models"]["rule"]["overrides"].append("model.nonsense=3"), "models.rule: unknown key model.nonsense"),
    (lambda r: r.update(match_flops={"reference": "rule", "tolerance": 0.03}),
     "models.plain: 0.86[0-9]x rule's training FLOPs per byte, outside match_flops.tolerance"),
    (lambda r: r["domains"]["toy"].update(test=["/nonexistent/held-out"]), "domains.toy.test\\[0\\]: /nonexistent"),
    (lambda r: r["domains"].update(toy={"prep": {"inputs": ["${PICO_TEST_UNSET_CORPUS}/novels"]}}),
     "domains.toy.prep.inputs\\[0\\]: \\$\\{PICO_TEST_UNSET_CORPUS\\} is not set"),
    (lambda r: r.update(shape_rule="ladder", budgets=[3e9, 6e9]), "models.rule.shapes: shape_rule ladder needs one shape per budget"),
])
def test_bad_designs_are_one_line_errors_naming_the_key(tiny_design, change, message):
    edit(tiny_design, change)
    with pytest.raises(UserError, match=message) as e:
        design = load_design(tiny_design)
        check_models(design)
        from pico.pipeline.experiment.data import check_inputs, prepare

        for d in design.domains:
            check_inputs(design, d)
            prepare(design, d)
    assert "\n" not in str(e.value)


def test_match_flops_sets_the_width_within_the_tolerance(tiny_design):
    edit(tiny_design, lambda r: (r.update(match_flops={"reference": "rule", "tolerance": 0.03}),
                                 r["models"]["plain"].update(match="d_local")))
    shapes = check_models(load_design(tiny_design))
    ratio = shapes["plain", "base"].flops_per_byte / shapes["rule", "base"].flops_per_byte
    assert abs(ratio - 1) <= 0.03
    assert any(o.startswith("--model.d_local=") and o != "--model.d_local=32" for o in shapes["plain", "base"].overrides)


def test_the_cli_prints_one_line_without_a_traceback(tiny_design):
    edit(tiny_design, lambda r: r.update(colour="red"))
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "experiment", "run", str(tiny_design), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown key colour" in out.stderr and "Traceback" not in out.stderr


def test_a_run_refuses_to_add_other_training_code_to_finished_runs(tiny_design):
    from pico.pipeline.experiment.job import code_fingerprint
    from pico.pipeline.experiment.store import result_path, write_json

    design = load_design(tiny_design)
    key = "toy-rule-3e09-lr0.003-s0"
    write_json(result_path(design.results_dir, key), {
        "key": key, "domain": "toy", "model": "rule", "budget": 3e9, "lr": 3e-3, "seed": 0,
        "git_revision": "0123456789abcdef", "code_sha": "f00df00df00df00d", "test": {"bpb": 2.0}})
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "experiment", "run", str(tiny_design)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "trained with pico training code f00df00df00df00d (revision 0123456789ab)" in out.stderr
    assert f"this checkout's is {code_fingerprint()}" in out.stderr and "--allow-mixed-revisions" in out.stderr
    assert not (design.work / "runs").exists()  # nothing was launched


def test_a_result_is_stale_when_the_protocol_changes_not_only_the_spec(tiny_design):
    """The warmup (a design field) and the schedule (the harness's) are not in the model's spec: a result made
    under another protocol is not reused; one from before results recorded a protocol still is."""
    from pico.pipeline.experiment.design import Run, spec_hash
    from pico.pipeline.experiment.drive import finished
    from pico.pipeline.experiment.job import protocol_hash
    from pico.pipeline.experiment.store import result_path, write_json

    design = load_design(tiny_design)
    shapes = check_models(design)
    run = Run("toy", "rule", "base", 3e9, 3e-3, 0)
    shape = shapes["rule", "base"]
    steps = steps_for(shape, run.budget)
    record = {"key": run.key(design), "domain": "toy", "model": "rule", "shape": "base", "budget": 3e9, "lr": 3e-3,
              "seed": 0, "spec_sha": spec_hash(run, shape, steps), "test": {"bpb": 2.0}, "select": {"bpb": 2.0}}
    write_json(result_path(design.results_dir, run.key(design)), dict(record, protocol_sha="0" * 16))
    assert not finished(design, shapes)
    write_json(result_path(design.results_dir, run.key(design)),
               dict(record, protocol_sha=protocol_hash(design, run, shape, steps)))
    assert list(finished(design, shapes)) == [run.key(design)]
    longer = edit(tiny_design, lambda r: r.update(warmup_fraction=0.3))
    design = load_design(longer)
    assert not finished(design, check_models(design))
    write_json(result_path(design.results_dir, run.key(design)), record)  # no protocol recorded: by its spec
    assert list(finished(design, check_models(design))) == [run.key(design)]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_design_loads_and_costs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("PICO_CORPUS", str(tmp_path))
    monkeypatch.chdir(REPO)
    design = load_design(path)
    if path.name == "experiment4.yaml":  # a record of a retired option: readable, not trainable
        with pytest.raises(UserError, match="dechunk_skip is retired"):
            check_models(design)
        return
    check_models(design)


def test_select_is_cut_from_every_held_out_document_never_from_test_bytes(tmp_path, monkeypatch):
    """Version 2 of the held-out cut: test, the middle of every document but every 4th; select, equal shares
    of every document (past or before its test slice), a short document's rest going to the others."""
    from pico.pipeline.experiment import data
    from pico.pipeline.experiment.design import PrepSpec

    lines = [[f"doc {d} line {n:05d}\n".encode() for n in range(2000 if d != 2 else 200)] for d in range(8)]
    monkeypatch.setattr(data, "_val_documents", lambda shards: [b"".join(x) for x in lines])
    folder = tmp_path / "heldout"
    folder.mkdir()
    (folder / "done").write_text("")  # a version-1 folder: cut again
    data._heldout(PrepSpec(inputs=["x"], test_kb=48, select_kb=16), tmp_path, folder, "domains.toy.prep")
    test = {p.name: p.read_bytes() for p in (folder / "test").iterdir()}
    select = {p.name: p.read_bytes() for p in (folder / "select").iterdir()}
    assert len(test) == 6 and (folder / "done").read_text() == data.heldout_marker(PrepSpec(test_kb=48, select_kb=16))
    assert {int(n[:4]) for n in select} >= {0, 1, 3, 4, 5, 6, 7}  # every document with room (doc 2 is short)
    assert abs(sum(map(len, select.values())) - 16 * 1024) < 2048
    seen = {ln for t in test.values() for ln in t.splitlines()}
    assert not any(ln in seen for s in select.values() for ln in s.splitlines()[1:-1])  # whole lines: never shared


def test_held_out_sets_are_cut_again_when_their_sizes_change_and_prepared_data_is_never_reused_silently(
        tmp_path, monkeypatch):
    from pico.pipeline.experiment import data
    from pico.pipeline.experiment.design import PrepSpec

    docs = [f"doc {d} ".encode() + b"words and more words\n" * 3000 for d in range(8)]
    monkeypatch.setattr(data, "_val_documents", lambda shards: docs)
    folder = tmp_path / "heldout"
    data._heldout(PrepSpec(test_kb=48, select_kb=16), tmp_path, folder, "k")
    first = sum(p.stat().st_size for p in (folder / "test").iterdir())
    data._heldout(PrepSpec(test_kb=24, select_kb=16), tmp_path, folder, "k")  # the design's sizes changed: cut again
    assert sum(p.stat().st_size for p in (folder / "test").iterdir()) < first * 0.6
    (folder / "done").write_text(data.HELDOUT)  # cut before markers held sizes: kept, the marker completed
    stamp = (folder / "test" / "0000.txt").stat().st_mtime_ns
    data._heldout(PrepSpec(test_kb=24, select_kb=16), tmp_path, folder, "k")
    assert (folder / "test" / "0000.txt").stat().st_mtime_ns == stamp
    assert (folder / "done").read_text() == data.heldout_marker(PrepSpec(test_kb=24, select_kb=16))

    # pico prep records inputs by name with a digest of their files: the corpus may move, not change
    corpus, moved = tmp_path / "corpus", tmp_path / "elsewhere" / "corpus"
    for home in (corpus, moved):
        home.mkdir(parents=True)
        (home / "a.txt").write_bytes(b"words and more words\n" * 50)
    out = tmp_path / "data" / "shards"
    assert data._prep(PrepSpec(inputs=[str(corpus)], val_fraction=0.05), out, "k") == out
    assert json.loads((out / "manifest.json").read_text())["config"]["inputs"] == ["corpus"]
    assert data._prep(PrepSpec(inputs=[str(moved)], val_fraction=0.05), out, "k") == out
    (moved / "a.txt").write_bytes(b"other words\n")
    with pytest.raises(UserError, match="k: pico prep failed.*other input files"):
        data._prep(PrepSpec(inputs=[str(moved)], val_fraction=0.05), out, "k")
    for changed in (PrepSpec(inputs=[str(tmp_path / "moved")], val_fraction=0.05),
                    PrepSpec(inputs=[str(corpus)], val_fraction=0.02)):
        with pytest.raises(UserError, match=f"domains.toy.prep: {re.escape(str(out))} was prepared from .* delete"):
            data._prep(changed, out, "domains.toy.prep")
    # the pico prep before that recorded paths and hashed documents by path: there a moved corpus is other data
    (out / "manifest.json").write_text(json.dumps({"config": {"inputs": [str(corpus)], "val_fraction": 0.05,
                                                              "output": str(out)}}))
    assert data._prep(PrepSpec(inputs=[str(corpus)], val_fraction=0.05), out, "k") == out
    with pytest.raises(UserError, match="was prepared from"):
        data._prep(PrepSpec(inputs=[str(moved)], val_fraction=0.05), out, "k")


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 5000 + "]" * 5000, '{"key": 7}'])
def test_a_damaged_result_json_is_one_line_naming_it(tiny_design, text):
    design = load_design(tiny_design)
    bad = design.results_dir / "runs" / "toy-rule-3e09-lr0.003-s0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "experiment", "status", str(tiny_design)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"{bad}: not a" in out.stderr and "move it away" in out.stderr
