"""The planners on their own: a listing in, typed operations with reasons out, no server, no bucket.

Local entries are real folders written by the simulated compiler; the listings are what a bucket server
returns (dicts), written here by hand, hostile ones included.
"""

from __future__ import annotations

import pytest

from optimum_neuron_cache import remote_layout as layout
from optimum_neuron_cache.fetch import Action, plan_model_area, plan_todo_fill, todo_probe_paths
from optimum_neuron_cache.local_cache import scan_entries
from optimum_neuron_cache.testing.simulated_compiler import CompileFailed, compile_graph, make_graphs, module_name
from optimum_neuron_cache.sync import plan_from_presence, probe_paths

AREA_OF = "neuronxcc-{v}/models/org--m/default"


def listing_of(version: str, area: str, modules: dict[str, dict[str, int]]) -> list[dict]:
    return [{"type": "file", "path": layout.area_file_path(area, module, name), "size": size, "xet_hash": None}
            for module, files in modules.items() for name, size in files.items()]


COMPLETE = {"model.hlo_module.pb": 10, "compile_flags.json": 2, "model.neff": 100, "model.done": 0}


def test_each_remote_entry_gets_one_operation_with_its_reason(tmp_path, version):
    graphs = make_graphs(6, seed="planner")
    names = [module_name(version, graph) for graph in graphs]
    compile_graph(tmp_path, version, graphs[1])  # complete here
    compile_graph(tmp_path, version, graphs[2], outcome="todo")  # extracted only
    compile_graph(tmp_path, version, graphs[3], outcome="crash")  # a compile lock left behind
    with pytest.raises(CompileFailed):
        compile_graph(tmp_path, version, graphs[4], outcome="failed")  # a cached failure
    local = {entry.name: entry for entry in scan_entries(tmp_path, version)}
    area = AREA_OF.format(v=version)
    remote = {name: COMPLETE for name in names[:5]}
    remote[names[5]] = {"model.neff": 100}  # no commit file: a partial upload, never planned
    plan = plan_model_area(version, area, listing_of(version, area, remote), local, {names[3]: "neuronx-cc is running"})
    actions = {op.module: (op.action, op.reason) for op in plan.ops}
    assert actions[names[0]][0] is Action.INSTALL and {f.filename for f in plan.ops[[o.module for o in plan.ops].index(names[0])].files} == set(COMPLETE)
    assert actions[names[1]][0] is Action.PRESENT
    assert actions[names[2]][0] is Action.FILL
    assert actions[names[3]] == (Action.LOCKED, "neuronx-cc is running")
    assert actions[names[4]][0] is Action.HEAL and "cached failure" in actions[names[4]][1]
    assert names[5] not in actions and plan.remote_modules == frozenset(names[:5])
    assert {op.module for op in plan.items} == {names[0], names[2], names[4]}
    assert plan.stranded == [(names[3], "neuronx-cc is running")]
    fill = next(op for op in plan.ops if op.module == names[2])
    assert {f.filename for f in fill.files} == {"model.neff", "model.done"}  # only what the todo entry lacks
    # A lock that can be told stale (verdict None) is replaced whole.
    stale = plan_model_area(version, area, listing_of(version, area, remote), local, {names[3]: None})
    assert next(op for op in stale.ops if op.module == names[3]).action is Action.REPLACE


def test_hostile_listing_items_are_never_planned(tmp_path, version):
    area = AREA_OF.format(v=version)
    good = module_name(version, make_graphs(1, seed="good")[0])
    listing = listing_of(version, area, {good: COMPLETE}) + [
        {"type": "file", "path": f"{area}/MODULE_1+2/../../escape/model.neff", "size": 1},
        {"type": "file", "path": f"{area}/MODULE_bad name+1/model.neff", "size": 1},
        {"type": "file", "path": f"{area}/MODULE_3+4/model.log", "size": 1},
        {"type": "file", "path": f"{area}/MODULE_5+6/model.neff", "size": 1e309},
        {"type": "file", "path": f"{area}/MODULE_5+6/model.done", "size": -1},
        {"type": "file", "path": f"{area}/MODULE_7+8/model.neff", "size": True},
        {"type": "file", "path": f"{area}/MODULE_7+8/model.done", "size": "0"},
        {"type": "file", "path": f"{area}/exports/../../x.json", "size": 10},
    ]
    plan = plan_model_area(version, area, listing, {})
    assert [op.module for op in plan.ops] == [good]
    assert len(plan.ignored) >= 4 and plan.record_files == ()


def test_records_are_read_along_only_under_the_size_cap(version):
    area = AREA_OF.format(v=version)
    listing = [{"type": "file", "path": f"{area}/exports/{'a' * 16}.json", "size": 300},
               {"type": "file", "path": f"{area}/exports/{'b' * 16}.json", "size": 50 * 1024 * 1024},
               {"type": "file", "path": f"{area}/exports/{'c' * 16}.json", "size": 0}]
    plan = plan_model_area(version, area, listing, {})
    assert plan.record_names == {f"{c * 16}.json" for c in "abc"}
    assert [remote.filename for remote in plan.record_files] == [f"{'a' * 16}.json"]


def test_todo_entries_are_filled_only_from_complete_flat_entries(tmp_path, version):
    graphs = make_graphs(2, seed="fill")
    for graph in graphs:
        compile_graph(tmp_path, version, graph, outcome="todo")
    todo = scan_entries(tmp_path, version)
    probes = todo_probe_paths(version, todo)
    assert len(probes) == 2 * (len(layout.PUBLISHABLE_FILES) + 1)  # and each entry's digest manifest
    whole, partial = (entry.name for entry in todo)
    answer = [{"type": "file", "path": layout.flat_file_path(version, whole, name), "size": size} for name, size in COMPLETE.items()]
    answer.append({"type": "file", "path": layout.flat_file_path(version, partial, "model.neff"), "size": 100})
    plan = plan_todo_fill(plan_model_area(version, AREA_OF.format(v=version), [], {}), todo, answer)
    assert [(op.module, op.action, op.source) for op in plan.ops] == [(whole, Action.FILL, "flat")]


def test_publishing_plans_only_success_entries_and_only_where_their_commit_file_is_missing(tmp_path, version):
    graphs = make_graphs(4, seed="publish-plan")
    for graph in graphs[:3]:
        compile_graph(tmp_path, version, graph)
    compile_graph(tmp_path, version, graphs[3], outcome="crash")
    entries = scan_entries(tmp_path, version)
    ready = sorted(entry.name for entry in entries if entry.state.publishable)
    area = AREA_OF.format(v=version)
    probes = probe_paths(entries, area, known_in_model_area={ready[2]})
    assert len(probes) == 3 + 2  # flat for each success entry; the model's area except the one already known there
    present = {layout.flat_file_path(version, ready[0], "model.done"), layout.area_file_path(area, ready[0], "model.done"),
               layout.flat_file_path(version, ready[1], "model.done"), layout.flat_file_path(version, ready[2], "model.done")}
    plan = plan_from_presence(entries, area, present, known_in_model_area={ready[2]})
    assert plan.present == (ready[0], ready[2])
    assert [(item.entry.name, item.to_flat, item.to_model) for item in plan.items] == [(ready[1], False, area)]
    assert plan.items[0].commit == "model.done" and "model.log" not in plan.items[0].files
