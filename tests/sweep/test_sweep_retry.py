"""Why a sweep job ended without results, whether the driver submits it again, and how sweep.json
records it: causes from Slurm states and the tasks' error lines, the retry bound counted across
driver restarts and started again after a job was reported, records written before retries existed
read as jobs without history, and records with retries read by the collector."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from memetrain.errors import ConfigError
from memetrain.sweep import record
from memetrain.sweep.collect import collect_sweep
from memetrain.sweep.grid import JobSpec
from memetrain.sweep.launchers import SlurmLauncher, _expand_ids
from memetrain.sweep.record import DONE, FAILED, JobState
from memetrain.sweep.retry import (
    CANCELLED,
    ERROR,
    KILLED_CAUSE,
    LOST,
    NODE_FAILURE,
    REPORTED,
    RETRIED,
    TIME_LIMIT,
    Ending,
    RetryPolicy,
    classify,
    event,
    retries_since_reported,
)
from tests.helpers import REPO

KILLED_LINE = (
    "/runs/text-seed0: training was killed by SIGKILL (see the job's log); re-run the sweep to resume it"
)
PEER_LINE = "/runs/text-seed0: training stopped: another process of the run died (see the job's log); re-run the sweep"
ERROR_LINE = (
    "/runs/text-seed0: training failed with exit code 2 (see the job's log); re-run the sweep to resume it"
)


@pytest.mark.parametrize(
    "state, errors, cause",
    [
        ("CANCELLED by 0", [], CANCELLED),
        ("CANCELLED", [PEER_LINE], CANCELLED),  # a cancelled job's training may fail on its way out
        ("NODE_FAIL", [], NODE_FAILURE),
        ("TIMEOUT", [], TIME_LIMIT),
        ("LOST", [], LOST),
        ("FAILED", [PEER_LINE, KILLED_LINE], KILLED_CAUSE),  # rank 1 killed, rank 0 lost its peer
        ("FAILED", [PEER_LINE], KILLED_CAUSE),  # its peer died (exit code 3): not the run's own error
        ("FAILED", [ERROR_LINE], ERROR),
        ("FAILED", [], KILLED_CAUSE),  # no task lived to write its result
        ("FAILED", ["text-seed0: requeued 3 times (launcher.max_requeues), not requeued again. The training saved"], TIME_LIMIT),
        ("COMPLETED", [], ERROR),
    ],
)  # fmt: skip
def test_the_cause_of_an_ending(state, errors, cause):
    ending = classify(state, errors)
    assert ending.cause == cause
    assert "\n" not in ending.detail


def test_retries_are_bounded_per_report_and_cancel_follows_on_cancel():
    policy = RetryPolicy("retry", 2)
    cancelled, killed, error = (
        Ending(CANCELLED, "Slurm state CANCELLED"),
        Ending(KILLED_CAUSE, KILLED_LINE),
        Ending(ERROR, PEER_LINE),
    )
    history: list[dict] = []
    assert policy.decide(cancelled, history) == (True, "")
    history.append(event("12_0", cancelled, RETRIED))
    assert policy.decide(killed, history) == (True, "")
    history.append(event("13", killed, RETRIED))
    assert policy.decide(killed, history) == (False, "retried 2 times already (launcher.max_retries)")
    history.append(event("14", killed, REPORTED))
    assert retries_since_reported(history) == 0  # the user ran the sweep again: a new budget
    assert policy.decide(killed, history) == (True, "")
    assert policy.decide(error, []) == (False, "")  # its own error: the same job would fail again
    assert RetryPolicy("fail", 2).decide(cancelled, []) == (False, "launcher.on_cancel=fail")
    with pytest.raises(ConfigError, match=r"^launcher.on_cancel='again': choose retry or fail$"):
        RetryPolicy("again", 2)
    with pytest.raises(ConfigError, match=r"^launcher.max_retries=-1: "):
        RetryPolicy("retry", -1)


def test_per_method_launcher_options_and_their_errors(tmp_path):
    cfg = OmegaConf.load(REPO / "configs" / "launcher" / "slurm.yaml")
    cfg.methods = {"text": {"tasks_per_node": 2, "cpus_per_task": 3}}
    launcher = SlurmLauncher(cfg, tmp_path, "demo")
    assert (
        launcher.parameters("text")["ntasks_per_node"] == 2
        and launcher.parameters("text")["cpus_per_task"] == 3
    )
    assert launcher.parameters("clip")["ntasks_per_node"] == 1 and launcher.parameters()["cpus_per_task"] == 8
    launcher.check_methods({"text", "clip"})
    with pytest.raises(
        ConfigError, match=r"^launcher.methods.text: the sweep has no method 'text'; its methods are clip$"
    ):
        launcher.check_methods({"clip"})
    cfg.methods = {"text": {"setup": ["module load x"]}}
    with pytest.raises(ConfigError, match=r"^launcher.methods.text.setup: not an option a method can set"):
        SlurmLauncher(cfg, tmp_path, "demo")


def test_sacct_array_ranges_expand_to_tasks():
    assert _expand_ids("12_[3-5,7]") == ["12_3", "12_4", "12_5", "12_7"]
    assert _expand_ids("12_[1%2]") == ["12_1"]
    assert _expand_ids("12_4") == ["12_4"] and _expand_ids("13") == ["13"]


def _specs() -> list[JobSpec]:
    return [
        JobSpec("text-seed0", {"method": "text"}, 0, ["model=lstm", "seed=0"]),
        JobSpec("text-seed1", {"method": "text"}, 1, ["model=lstm", "seed=1"]),
    ]


def test_records_without_retries_still_load_and_new_ones_are_collected(tmp_path):
    specs = _specs()
    old = {  # sweep.json as drivers wrote it before retries were recorded
        "sweep": "tiny",
        "jobs": [
            {k: v for k, v in record.job_entry(spec, JobState(FAILED, error="boom")).items() if k not in ("cause", "retries", "requeues", "history")}
            for spec in specs
        ],
    }  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    header, jobs = record.load_record(tmp_path)
    assert header == {"sweep": "tiny"} and jobs["text-seed0"]["history"] == []

    history = [event("12_0", Ending(CANCELLED, "Slurm state CANCELLED"), RETRIED)]
    states = {"text-seed0": JobState(DONE, slurm_job_id="13_0"), "text-seed1": JobState(DONE)}
    record.write(tmp_path, {"sweep": "tiny"}, specs, states, {"text-seed0": history})
    entry = record.load(tmp_path)["text-seed0"]
    assert (entry["retries"], entry["requeues"], entry["history"]) == (1, 0, history)
    for spec in specs:
        (tmp_path / spec.name).mkdir()
        results = {
            "protocols": {
                "classifier": {"splits": {"test": {"auroc": 0.5 + spec.seed / 10, "accuracy": 0.5}}}
            }
        }
        (tmp_path / spec.name / "results.json").write_text(json.dumps(results))
    assert "| method=text | 2 |" in collect_sweep(tmp_path)

    (tmp_path / "sweep.json").write_text(
        json.dumps({"jobs": [{**old["jobs"][0], "history": [{"cause": "x"}]}]})
    )
    with pytest.raises(ConfigError, match="is not a sweep record .*history is not a list of endings"):
        record.load(tmp_path)
