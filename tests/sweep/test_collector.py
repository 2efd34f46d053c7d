"""The collector: groups runs by all but the seed, mean ± sample std with n, lists what it leaves out.

Run directories are written as run.py writes them: config.yaml from the composed Hydra config
(OmegaConf.to_yaml, resolved), results.json with run.py's keys and metrics scored by the real
``score_splits``, and Hydra's ``.hydra/overrides.yaml`` and choices for hand-made runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from memetrain.cli import CONFIG_DIR
from memetrain.errors import ConfigError
from memetrain.eval.protocols import Outputs, score_splits, score_targets
from memetrain.sweep.collect import Cell, collect_sweep
from tests.helpers import run_launcher

SPLITS = ("dev", "test")


def scored_protocol(rng: np.random.Generator, n: int = 40) -> dict:
    """One protocol's results.json entry for random labels and scores, scored by the real code."""
    outputs, scores = {}, {}
    for split in SPLITS:
        labels = np.array([0, 1] * (n // 2))
        outputs[split] = Outputs([f"m{i}" for i in range(n)], labels[:, None], np.zeros((n, 1)), None)
        scores[split] = np.clip(labels * 0.2 + rng.random(n) * 0.8, 0, 1)
    return score_splits(scores, outputs, label_index=0, dev_split="dev", label_fraction=1.0)


MAMI_LABELS = ["misogynous", "shaming", "stereotype", "objectification", "violence"]


def scored_targets(rng: np.random.Generator, targets: list[str], n: int = 40) -> dict:
    """A protocol's entry for MAMI's five labels, the run predicting ``targets``, scored by the real
    ``score_targets`` (task A in splits, the others in multilabel)."""
    outputs, scores = {}, {}
    for split in SPLITS:
        labels = (rng.random((n, len(MAMI_LABELS))) < 0.5).astype(np.int64)
        outputs[split] = Outputs([f"m{i}" for i in range(n)], labels, np.zeros((n, 1)), None)
        columns = [MAMI_LABELS.index(t) for t in targets]
        scores[split] = np.clip(labels[:, columns] * 0.3 + rng.random((n, len(targets))) * 0.7, 0, 1)
    return score_targets(scores, outputs, targets, MAMI_LABELS, "misogynous", "dev", 1.0)


def write_run(
    run_dir: Path,
    overrides: list[str],
    seed: int,
    protocols: tuple[str, ...] = ("classifier",),
    source: str = "synth",
    hydra_record: bool = True,
    targets: list[str] | None = None,
) -> dict:
    """A finished run directory as run.py leaves it; returns its results."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"seed={seed}"], return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if hydra_record:  # what Hydra writes beside every run it starts
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create([*overrides, f"seed={seed}"]), run_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, run_dir / ".hydra" / "hydra.yaml")
    rng = np.random.default_rng([zlib.crc32(run_dir.name.encode()), seed])
    results = {
        "method": cfg.method.name,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {"shards": cfg.data.shards, "source": source, "label_fraction": cfg.data.label_fraction},
        "seed": seed,
        "steps": cfg.trainer.max_steps,
        "skipped_steps": 0,
        "world_size": 1,
        "protocols": {
            protocol: scored_targets(rng, targets) if targets else scored_protocol(rng)
            for protocol in protocols
        },
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def write_sweep(sweep_dir: Path, jobs: list[dict]) -> None:
    """sweep.json as the sweep launcher writes it: a header and {name, group, seed, overrides, status,
    log, error, ...} per job."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": sweep_dir.name, "jobs": jobs}, indent=2))


def grid_job(
    sweep_dir: Path,
    group: dict,
    seed: int,
    status: str = "done",
    write: bool = True,
    train: list[str] | None = None,
    **kwargs,
) -> dict:
    """One job of sweep.json; its run directory too when ``write``. ``train``: the job's overrides
    (default: the group's values as overrides, for groups keyed by override keys)."""
    name = "-".join(f"{v}" for v in group.values()) + f"-seed{seed}"
    overrides = [*(train if train is not None else [f"{k}={v}" for k, v in group.items()]), f"seed={seed}"]
    if write:
        write_run(sweep_dir / name, overrides[:-1], seed, hydra_record=False, **kwargs)
    return {
        "name": name,
        "group": group,
        "seed": seed,
        "overrides": overrides,
        "pretrain": None,
        "after": None,
        "stage": 0,
        "status": status,
        "log": str(sweep_dir / "logs" / f"{name}.log"),
        "error": None,
        "slurm_job_id": None,
    }


def metric(run_dir: Path, name: str, protocol: str = "classifier", split: str = "test") -> float:
    return json.loads((run_dir / "results.json").read_text())["protocols"][protocol]["splits"][split][name]


def markdown_rows(markdown: str) -> dict[str, list[str]]:
    """Model -> the other cells of each body row of the first Markdown table."""
    rows = {}
    for line in markdown.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_a_cell_is_the_mean_and_the_sample_std():
    cell = Cell([0.5, 0.6, 0.7])
    assert cell.n == 3 and cell.mean == pytest.approx(0.6) and cell.std == pytest.approx(0.1)
    assert Cell([0.5]).std is None and Cell([]).mean is None


def test_sweep_rows_are_mean_and_sample_std_over_seeds_with_n(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [
        grid_job(sweep, {"model": model, "data.label_fraction": 0.1}, seed)
        for model in ("lstm", "resnet18")
        for seed in range(3)
    ]
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)

    rows = markdown_rows(markdown)
    assert markdown.splitlines()[0] == "| Model | n | AUROC (test) | Accuracy (test) |"
    for model in ("lstm", "resnet18"):
        dirs = [sweep / job["name"] for job in jobs if job["group"]["model"] == model]
        n, auroc, accuracy = rows[f"model={model}"]
        assert n == "3"
        for cell, name in ((auroc, "auroc"), (accuracy, "accuracy")):
            values = [metric(d, name) for d in dirs]
            assert cell == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    assert "Common to every row: `data.label_fraction=0.1`" in markdown
    assert "sample standard deviation (ddof=1)" in markdown and "Every job counted (6)" in markdown
    assert (sweep / "table.md").read_text() == markdown
    assert (sweep / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_and_missing_jobs_are_listed_and_never_averaged(tmp_path):
    sweep = tmp_path / "sweep"
    group = {"model": "lstm"}
    jobs = [
        grid_job(sweep, group, 0),
        {**grid_job(sweep, group, 1, status="failed", write=False), "error": "exit code 1"},
        grid_job(sweep, group, 2, status="pending", write=False),
        grid_job(sweep, group, 3, status="done", write=False),  # done, but its results.json is gone
    ]
    write_sweep(sweep, jobs)
    write_run(sweep / "stray-seed0", ["model=lstm"], 0)  # a run the sweep does not list
    markdown = collect_sweep(sweep)

    n, auroc, _ = markdown_rows(markdown)["method=supervised model=lstm"]
    assert n == "1 of 4"
    assert auroc == f"{metric(sweep / jobs[0]['name'], 'auroc'):.4f}"  # one run: its value, no std
    assert "Not counted (4; listed, never averaged):" in markdown
    assert "- `stray-seed0/`: a run directory that sweep.json does not list (not counted)" in markdown
    assert f"- `lstm-seed1` (seed 1): failed (exit code 1); log: {jobs[1]['log']}" in markdown
    assert "- `lstm-seed2` (seed 2): pending" in markdown
    assert "- `lstm-seed3` (seed 3): done but" in markdown


def cut(text: str) -> str:
    return text[: len(text) // 2]


def set_key(path: list, value):
    """A results.json edit: the key at ``path`` set to ``value`` (deleted for ``DELETE``)."""

    def edit(text: str) -> str:
        results = json.loads(text)
        *parents, last = path
        node = results
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return json.dumps(results)

    return edit


DELETE = object()
TEST_AUROC = ["protocols", "classifier", "splits", "test", "auroc"]
UNREADABLE = [  # (how results.json is damaged, why the collector says it is not counted)
    (cut, "is not JSON, or is cut off ("),
    (lambda text: "", "is empty (0 bytes)"),
    (lambda text: "\n  \n", "is empty (4 bytes)"),
    (lambda text: "<html>502 Bad Gateway</html>", "is not JSON, or is cut off (Expecting value: line 1 column 1"),
    (lambda text: "[1, 2]", "holds a JSON list, not the object of a memetrain run's results"),
    (set_key(["protocols"], DELETE), "has no 'protocols' object: it is not a results.json written by memetrain"),
    (set_key(TEST_AUROC, "0.71"), 'has protocols.classifier.splits.test.auroc="0.71", not a number'),
    (set_key(["protocols", "classifier", "splits", "test"], [0.7]), "has protocols.classifier.splits.test=[0.7], not an object"),
    (set_key(["seed"], "zero"), 'has seed="zero", not an integer or null'),
    (set_key(["data"], None), "has data=null, not an object"),
]  # fmt: skip


def test_results_it_cannot_read_are_listed_with_why_and_the_rest_is_tabled(tmp_path):
    """A truncated, empty, non-JSON or malformed results.json (real files, as a full disk, a copy cut
    short or another tool could leave them) never stops the collector and is never averaged."""
    sweep = tmp_path / "sweep"
    group = {"model": "lstm"}
    jobs = [grid_job(sweep, group, seed) for seed in range(len(UNREADABLE) + 2)]
    for job, (damage, _) in zip(jobs[2:], UNREADABLE):
        results = sweep / job["name"] / "results.json"
        results.write_text(damage(results.read_text()))
    unreadable_dir = sweep / jobs[1]["name"] / "results.json"  # a directory where the file should be
    unreadable_dir.unlink()
    unreadable_dir.mkdir()
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)

    n, auroc, _ = markdown_rows(markdown)["method=supervised model=lstm"]
    assert n == f"1 of {len(jobs)}"
    assert auroc == f"{metric(sweep / jobs[0]['name'], 'auroc'):.4f}"
    assert f"Not counted ({len(jobs) - 1}; listed, never averaged):" in markdown
    listed = [line for line in markdown.splitlines() if line.startswith("- `lstm-seed")]
    assert len(listed) == len(jobs) - 1
    assert listed[0].startswith(
        f"- `lstm-seed1` (seed 1): {sweep}/lstm-seed1/results.json cannot be read (Is a directory)"
    )
    for line, job, (_, why) in zip(listed[1:], jobs[2:], UNREADABLE):
        assert line.startswith(
            f"- `{job['name']}` (seed {job['seed']}): {sweep / job['name']}/results.json {why}"
        ), line
        assert line.endswith("; delete it and re-run the job"), line
    assert (sweep / "table.csv").is_file() and (sweep / "table.png").is_file()


def test_a_task_b_score_without_its_keys_is_listed(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"model": "lstm"}, seed, source="mami", targets=MAMI_LABELS) for seed in (0, 1)]
    results = sweep / jobs[1]["name"] / "results.json"
    task_b = ["protocols", "classifier", "multilabel", "test"]
    results.write_text(set_key([*task_b, "f1_weighted_macro"], DELETE)(results.read_text()))
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)
    assert markdown_rows(markdown)["method=supervised model=lstm"][0] == "1 of 2"
    assert f"{results} lacks protocols.classifier.multilabel.test.f1_weighted_macro; delete it" in markdown


def test_a_hand_made_run_with_results_but_no_readable_config_is_listed(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"lstm-seed{seed}", ["model=lstm"], seed)
    (runs / "lstm-seed1" / "config.yaml").unlink()
    write_run(runs / "lstm-seed2", ["model=lstm"], 2)
    (runs / "lstm-seed2" / "config.yaml").write_bytes(b"seed: \xff\xfe\n")  # not UTF-8
    markdown = collect_sweep(runs)
    assert markdown_rows(markdown)["method=supervised model=lstm"][0] == "1"
    assert "- `lstm-seed1/`: has a results.json but no config.yaml (not counted)" in markdown
    assert "- `lstm-seed2/`: its config.yaml cannot be read ('utf-8' codec can't decode" in markdown


def test_mami_rows_add_the_weighted_f1_column(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"model": "lstm"}, seed, source="mami") for seed in (0, 1)]
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)

    assert markdown.splitlines()[0] == "| Model | n | AUROC (test) | Accuracy (test) | F1 (weighted) (test) |"
    values = [metric(sweep / job["name"], "f1_weighted") for job in jobs]
    f1 = markdown_rows(markdown)["method=supervised model=lstm"][3]
    assert f1 == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


@pytest.mark.parametrize("targets", [MAMI_LABELS, MAMI_LABELS[1:]], ids=["tasks A and B", "task B alone"])
def test_task_b_runs_add_their_weighted_macro_and_per_label_columns(tmp_path, targets):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"model": "lstm"}, seed, source="mami", targets=targets) for seed in (0, 1)]
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)

    task_b = [
        "Task B F1 (MAMI score)",
        "Task B F1 (weighted)",
        "Task B F1 (macro)",
        "Task B AUROC",
        *(f"F1 {t}" for t in MAMI_LABELS[1:]),
    ]
    task_a = ["AUROC", "Accuracy", "F1 (weighted)"] if targets[0] == "misogynous" else []
    assert (
        markdown.splitlines()[0]
        == "| Model | n | " + " | ".join(f"{m} (test)" for m in [*task_a, *task_b]) + " |"
    )
    assert "no auroc" not in markdown  # a task-B-only run is not short of task A's metrics
    results = [json.loads((sweep / job["name"] / "results.json").read_text()) for job in jobs]
    scored = [r["protocols"]["classifier"]["multilabel"]["test"] for r in results]
    expected = [
        [m["f1_weighted_macro"] for m in scored],
        [m["f1_weighted"] for m in scored],
        [m["f1_macro"] for m in scored],
        [m["auroc"] for m in scored],
        *([m["per_label"][t]["f1"] for m in scored] for t in MAMI_LABELS[1:]),
    ]
    cells = markdown_rows(markdown)["method=supervised model=lstm"][1 + len(task_a) :]
    assert cells == [f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" for v in expected]


def test_published_rows_are_printed_beside_ours_with_deltas(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"model": m}, seed) for m in ("lstm", "resnet18") for seed in (0, 1)]
    write_sweep(sweep, jobs)
    reference = tmp_path / "published.yaml"
    reference.write_text(
        "title: A study\nsplit: test\nmetrics: {auroc: their AUROC, accuracy: their accuracy}\nrows:\n"
        "  - {label: Their LSTM, match: {model: lstm, data.image_size: 64}, auroc: [0.6, 0.05], accuracy: 0.55}\n"
        "  - {label: Their ViT, match: {model: vit_b16}, auroc: 0.7}\n"
        "  - {label: Their dev LSTM, split: dev, match: {model: lstm}, auroc: 0.9}\n"
    )
    markdown = collect_sweep(sweep, reference=str(reference))

    header = markdown.splitlines()[0]
    assert header.endswith("| Published | AUROC (published) | Accuracy (published) | Δ AUROC | Δ Accuracy |")
    rows = markdown_rows(markdown)
    lstm = [sweep / job["name"] for job in jobs if job["group"]["model"] == "lstm"]
    ours_auroc = np.mean([metric(d, "auroc") for d in lstm])
    ours_accuracy = np.mean([metric(d, "accuracy") for d in lstm])
    assert rows["model=lstm"][3:] == [
        "Their LSTM",
        "0.6000 ± 0.0500",
        "0.5500",
        f"{ours_auroc - 0.6:+.4f}",
        f"{ours_accuracy - 0.55:+.4f}",
    ]
    assert rows["model=resnet18"][3:] == ["–"] * 5
    assert "Published rows without a row here: Their ViT." in markdown  # the dev row is for another split
    assert "Δ = ours − published" in markdown


def test_reference_by_name_and_unknown_names(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"method": m, "data.image_size": 224}, 0) for m in ("supervised", "cass", "clip")]
    write_sweep(sweep, jobs)
    rows = markdown_rows(collect_sweep(sweep, reference="cass_table1"))
    published = {name: cells[3] for name, cells in rows.items()}
    assert published == {
        "method=supervised": "ResNet-50 224 (supervised)",
        "method=cass": "ResNet-50 224 (CASS)",
        "method=clip": "–",
    }
    with pytest.raises(ConfigError, match="choose one of .*cass_table1"):
        collect_sweep(sweep, reference="no_such_table")


def test_a_published_task_b_score_stands_beside_our_task_b_score(tmp_path):
    sweep = tmp_path / "sweep"
    group = {"method": "semimemes", "data.label_fraction": 0.05}
    jobs = [
        grid_job(sweep, group, s, source="mami", targets=MAMI_LABELS[1:], train=["model=lstm"])
        for s in (0, 1)
    ]
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep, reference="semimemes_mami")
    header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
    cells = dict(zip(header[1:], markdown_rows(markdown)["method=semimemes"]))
    scores = [
        json.loads((sweep / j["name"] / "results.json").read_text())["protocols"]["classifier"]["multilabel"][
            "test"
        ]
        for j in jobs
    ]
    ours = np.mean([m["f1_weighted_macro"] for m in scores])  # each label's macro F1 weighted by positives
    assert cells["Published"] == "SemiMemes (5 % labels)"
    assert cells["Task B F1 (MAMI score) (published)"] == "0.6782"
    assert cells["Δ Task B F1 (MAMI score)"] == f"{ours - 0.6782:+.4f}"
    assert "F1 (weighted) (published)" not in cells  # never beside the main label's weighted F1


def test_a_published_value_is_never_set_beside_another_metric(tmp_path):
    # a task-A MAMI sweep (main label's weighted F1) against the SemiMemes task-B table: refused
    sweep = tmp_path / "sweep"
    group = {"method": "semimemes", "data.label_fraction": 0.05}
    jobs = [grid_job(sweep, group, s, source="mami", train=["model=lstm"]) for s in (0, 1)]
    write_sweep(sweep, jobs)
    with pytest.raises(
        ConfigError, match="publishes task_b_f1_weighted_macro.*only set beside the same metric"
    ):
        collect_sweep(sweep, reference="semimemes_mami")


def test_a_reference_must_name_its_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(sweep, [grid_job(sweep, {"model": "lstm"}, 0)])
    reference = tmp_path / "published.yaml"
    reference.write_text("title: A\nrows:\n  - {label: L, match: {model: lstm}, auroc: 0.6}\n")
    with pytest.raises(ConfigError, match="name the published metrics"):
        collect_sweep(sweep, reference=str(reference))
    reference.write_text(
        "title: A\nmetrics: {accuracy: acc}\nrows:\n  - {label: L, match: {model: lstm}, auroc: 0.6}\n"
    )
    with pytest.raises(ConfigError, match="publishes \\['auroc'\\], which the table's metrics do not name"):
        collect_sweep(sweep, reference=str(reference))


def test_every_published_table_loads_and_names_its_metrics():
    from memetrain.sweep.reference import REFERENCE_DIR, load_reference

    for path in sorted(REFERENCE_DIR.glob("*.yaml")):
        table = load_reference(path.stem)
        assert table.metrics and all(set(row.values) <= set(table.metrics) for row in table.rows), path.name


def test_csv_and_tex_parse_back_to_the_same_numbers(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"model": m}, seed) for m in ("lstm", "resnet18") for seed in range(3)]
    write_sweep(sweep, jobs)
    collect_sweep(sweep)

    rows = list(csv.DictReader(io.StringIO((sweep / "table.csv").read_text())))
    assert [row["model"] for row in rows] == ["lstm", "resnet18"]
    tex = (sweep / "table.tex").read_text()
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    for row, line in zip(rows, body):
        dirs = [sweep / job["name"] for job in jobs if job["group"]["model"] == row["model"]]
        values = [metric(d, "auroc") for d in dirs]
        assert float(row["auroc_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(row["auroc_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row["n"] == row["auroc_n"] == "3" and row["seeds"] == "0 1 2"
        name, n, auroc, accuracy = (cell.strip() for cell in line.removesuffix("\\\\").split(" & "))
        assert name == f"model={row['model']}" and n == "3"
        mean, std = map(float, re.fullmatch(r"\$(\S+) \\pm (\S+)\$", auroc).groups())
        assert (mean, std) == (round(float(row["auroc_mean"]), 4), round(float(row["auroc_std"]), 4))
    assert "\\begin{tabular}{lrll}" in tex and "\\toprule" in tex


def test_hand_made_runs_group_by_their_config_without_the_seed(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"lstm-seed{seed}", ["model=lstm"], seed)
    write_run(runs / "lstm-lr-seed0", ["model=lstm", "trainer.lr=0.01"], 0)
    write_run(runs / "concat-seed0", [], 0)
    (runs / "unfinished-seed2").mkdir()  # started, never wrote results.json
    config = (runs / "lstm-seed0" / "config.yaml").read_text()
    (runs / "unfinished-seed2" / "config.yaml").write_text(re.sub(r"(?m)^seed: 0$", "seed: 2", config))
    (runs / "notes").mkdir()  # not a run directory: ignored
    markdown = collect_sweep(runs)

    rows = markdown_rows(markdown)
    assert list(rows) == [
        "model=fusion_concat trainer.lr=–",
        "model=lstm trainer.lr=0.01",
        "model=lstm trainer.lr=–",
    ]
    lstm = [metric(runs / f"lstm-seed{seed}", "auroc") for seed in (0, 1)]
    assert rows["model=lstm trainer.lr=–"][:2] == [
        "2 of 3",
        f"{np.mean(lstm):.4f} ± {np.std(lstm, ddof=1):.4f}",
    ]
    assert rows["model=lstm trainer.lr=0.01"][0] == rows["model=fusion_concat trainer.lr=–"][0] == "1"
    assert "`unfinished-seed2` (seed 2): no results.json (unfinished or failed" in markdown
    assert (
        "Common to every row: `eval=classifier` `method=supervised` `trainer=single` `data=synth`" in markdown
    )
    assert "notes" not in markdown


def test_runs_without_a_hydra_record_are_told_apart_by_their_config(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"a-seed{seed}", ["model=lstm"], seed, hydra_record=False)
    write_run(runs / "b-seed0", ["model=lstm", "data.batch_size=8"], 0, hydra_record=False)
    rows = markdown_rows(collect_sweep(runs))
    assert {name: cells[0] for name, cells in rows.items()} == {
        "data.batch_size=32": "2",
        "data.batch_size=8": "1",
    }


def test_protocol_choice_falls_back_to_the_linear_probe_and_can_be_set(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [grid_job(sweep, {"method": "dino"}, seed, protocols=("linear_probe", "knn")) for seed in (0, 1)]
    write_sweep(sweep, jobs)
    assert "linear_probe protocol on the test split" in collect_sweep(sweep)
    knn = [metric(sweep / job["name"], "accuracy", "knn", "dev") for job in jobs]
    markdown = collect_sweep(sweep, protocol="knn", split="dev")
    assert markdown.splitlines()[0] == "| Model | n | AUROC (dev) | Accuracy (dev) |"
    assert markdown_rows(markdown)["method=dino"][2] == f"{np.mean(knn):.4f} ± {np.std(knn, ddof=1):.4f}"
    with pytest.raises(ConfigError, match="no run in .* has classifier metrics; the runs have knn/dev"):
        collect_sweep(sweep, protocol="classifier")


def test_rows_of_different_protocols_say_which_in_a_column(tmp_path):
    """As in the demo sweep: classifiers beside a CLIP run evaluated by a linear probe."""
    sweep = tmp_path / "sweep"
    jobs = [
        grid_job(sweep, {"method": "fusion-concat"}, 0, train=["model=fusion_concat"]),
        grid_job(
            sweep,
            {"method": "clip-probe"},
            0,
            train=["method=clip", "eval=probe"],
            protocols=("linear_probe",),
        ),
    ]
    write_sweep(sweep, jobs)
    markdown = collect_sweep(sweep)
    assert markdown.splitlines()[0] == "| Model | n | Protocol | AUROC (test) | Accuracy (test) |"
    rows = markdown_rows(markdown)
    assert rows["method=fusion-concat"][1] == "classifier" and rows["method=clip-probe"][1] == "linear_probe"
    assert "Cells: the protocol in the Protocol column on the test split" in markdown


def test_a_directory_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "plots").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no runs in .*empty: it has no sweep.json and no sub-directory"):
        collect_sweep(tmp_path / "empty")
    result = run_launcher("collect.py", str(tmp_path / "empty"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no runs in {tmp_path / 'empty'}")


@pytest.mark.slow
def test_collects_two_real_training_runs(synth_shards, tmp_path):
    """Two tiny runs (seeds 0 and 1) of launcher/train.py as one Hydra multirun, then the launcher."""
    from tests.helpers import tiny_run_overrides

    overrides = [o for o in tiny_run_overrides(synth_shards, tmp_path, steps=2) if not o.startswith("hydra.")]
    train = run_launcher(
        "train.py",
        "--multirun",
        *overrides,
        "model=lstm",
        "data.num_workers=0",
        "eval.tsne=false",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'runs'}",
        "hydra.sweep.subdir=seed${seed}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    result = run_launcher("collect.py", str(tmp_path / "runs"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    n, auroc, accuracy = markdown_rows(result.stdout)["method=supervised model=lstm"]
    values = [metric(tmp_path / "runs" / f"seed{seed}", "accuracy") for seed in (0, 1)]
    assert n == "2" and accuracy == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    assert "Common to every row: `eval=classifier` `method=supervised`" in result.stdout
    assert {p.name for p in (tmp_path / "runs").glob("table.*")} == {
        "table.md",
        "table.csv",
        "table.tex",
        "table.png",
    }


def test_hydra_records_read_without_yaml_say_what_yaml_says(tmp_path):
    """The fast reading of .hydra/overrides.yaml and the choices agrees with a YAML parse, and
    leaves to YAML whatever Hydra had to quote."""
    import yaml

    from memetrain.sweep.runs import _choices, _plain_items

    overrides = ["model=lstm", "+x=a b", "~model/image@model.vit", "k=[1,2]", "n=null", "d={a: 1}", "z: y"]
    path = tmp_path / "overrides.yaml"
    OmegaConf.save(OmegaConf.create(overrides), path)
    lines = path.read_text().splitlines()
    assert _plain_items(lines[:5]) == yaml.safe_load("\n".join(lines[:5])) == overrides[:5]
    assert (
        lines[5:] == ["- 'd={a: 1}'", "- 'z: y'"] and _plain_items(lines) is None
    )  # quoted: YAML reads them
    choices = {
        "model": "lstm",
        "data": "synth",
        "model/image": "resnet18",
        "hydra/callbacks": None,
        "n": "a: b",
    }
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, tmp_path / "hydra.yaml")
    assert _choices((tmp_path / "hydra.yaml").read_text()) == {"model": "lstm", "data": "synth", "n": "a: b"}
    del choices["n"]
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, tmp_path / "hydra.yaml")
    assert _choices((tmp_path / "hydra.yaml").read_text()) == {"model": "lstm", "data": "synth"}
