"""memetrain.run_record: which config differences refuse a resume, and resume=never's set-aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from memetrain.errors import ConfigError
from memetrain.run_record import (
    ABSENT,
    ADDED_OPTIONS,
    FREE_TO_CHANGE,
    check_same_config,
    differences,
    holds_a_run,
    set_aside,
)

RECORDED = {
    "seed": 917,
    "resume": "auto",
    "data": {"batch_size": 16, "num_workers": 2, "worker_kind": "process", "eval_splits": ["dev", "test"]},
    "trainer": {
        "lr": 0.001,
        "log_every": 10,
        "precision": "no",
        "deterministic": False,
        "betas": [0.9, 0.999],
    },
    "method": {"name": "supervised", "init": {"image": None}},
}


def changed(**dotted):
    """RECORDED with dotted keys replaced (a value of ... deletes the key)."""
    import copy

    config = copy.deepcopy(RECORDED)
    for key, value in dotted.items():
        *parents, last = key.split("__")
        node = config
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return config


def test_the_same_config_and_bookkeeping_changes_continue():
    assert differences(RECORDED, changed()) == []
    bookkeeping = changed(resume="never", trainer__log_every=1, data__worker_kind="thread")
    assert differences(RECORDED, bookkeeping) == []
    assert {"resume", "trainer.log_every", "data.worker_kind"} <= FREE_TO_CHANGE.keys()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"trainer__lr": 0.0123}, ("trainer.lr", 0.001, 0.0123)),
        ({"seed": 918}, ("seed", 917, 918)),
        ({"data__num_workers": 4}, ("data.num_workers", 2, 4)),  # the worker count decides the batches
        ({"trainer__deterministic": 0}, ("trainer.deterministic", False, 0)),  # a bool is not a number
        ({"trainer__betas": [0.9, 0.98]}, ("trainer.betas", [0.9, 0.999], [0.9, 0.98])),
        ({"data__eval_splits": ["dev"]}, ("data.eval_splits", ["dev", "test"], ["dev"])),
        ({"method__init__image": "w.safetensors"}, ("method.init.image", None, "w.safetensors")),
    ],
)
def test_a_change_that_can_change_results_is_found(change, expected):
    assert differences(RECORDED, changed(**change)) == [expected]


def test_a_key_only_one_side_has_counts():
    [(key, old, new)] = differences(RECORDED, changed(trainer__precision=...))
    assert (key, old, new) == ("trainer.precision", "no", ABSENT)
    assert differences({**RECORDED, "extra": 1}, RECORDED)[0][0] == "extra"


def test_an_option_added_since_with_a_null_default_is_the_same():
    assert differences(RECORDED, changed(method__init__text=None)) == []
    assert differences(changed(method__init__text=None), RECORDED) == []
    assert differences(RECORDED, changed(method__init__text="w.safetensors")) != []


def test_an_option_added_since_with_another_default_compares_as_what_runs_did_before_it():
    before = RECORDED  # recorded before data.interpolation existed: its runs resized bilinearly
    assert differences(before, changed(data__interpolation="bilinear")) == []
    assert differences(before, changed(data__interpolation="auto")) == [
        ("data.interpolation", "bilinear", "auto")
    ]
    with pytest.raises(
        ConfigError,
        match=r"data.interpolation: 'bilinear' \(absent: as before the option\) there, 'auto' now",
    ):
        check_same_config(Path("run/config.yaml"), before, changed(data__interpolation="auto"), "")
    assert ADDED_OPTIONS.keys().isdisjoint(FREE_TO_CHANGE)


def test_numbers_equal_as_values_are_the_same():
    assert differences(changed(data__batch_size=16), changed(data__batch_size=16.0)) == []


def test_the_refusal_lists_every_differing_option_with_both_values(tmp_path):
    where = tmp_path / "run" / "config.yaml"
    with pytest.raises(ConfigError) as refused:
        check_same_config(where, RECORDED, changed(trainer__lr=0.0123, seed=1), "Do this or that.")
    message = str(refused.value)
    assert message.startswith(f"{where} was made with another config (")
    assert "trainer.lr: 0.001 there, 0.0123 now" in message and "seed: 917 there, 1 now" in message
    assert message.endswith("Do this or that.") and "\n" not in message


def test_set_aside_moves_everything_and_keeps_earlier_set_asides(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "checkpoints" / "step_0000004" / "model.safetensors").write_bytes(b"weights")
    (run / "results.json").write_text("{}")
    assert holds_a_run(run)
    first = set_aside(run)
    assert not holds_a_run(run) and sorted(p.name for p in run.iterdir()) == ["previous"]
    assert (first / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == b"weights"
    (run / "results.json").write_text('{"second": 1}')
    second = set_aside(run)
    assert first != second and first.parent == second.parent == run / "previous"
    assert (first / "results.json").read_text() == "{}"
    assert (second / "results.json").read_text() == '{"second": 1}'
    assert not holds_a_run(tmp_path / "missing")


def test_a_run_is_finished_only_with_a_results_file_memetrain_could_have_written(tmp_path):
    from memetrain.run_record import finished

    assert not finished(tmp_path)
    (tmp_path / "results.json").write_text('{"protocols": {"classifier": {}}, "steps": 4')  # cut off
    assert not finished(tmp_path)
    (tmp_path / "results.json").write_text('["not", "an", "object"]')
    assert not finished(tmp_path)
    (tmp_path / "results.json").write_text('{"protocols": {"classifier": {}}, "steps": 4}')
    assert finished(tmp_path)
