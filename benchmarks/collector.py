"""Collector benchmark: collect_sweep over 10 000 synthetic run directories (target <= 2 s).

    .venv/bin/python benchmarks/collector.py                   # full run (make bench), recorded
    .venv/bin/python benchmarks/collector.py --quick           # 1000 runs, 2 repeats, not recorded
    .venv/bin/python benchmarks/collector.py --runs 20000 --seeds 10 --repeats 7

In a temporary directory: ``--runs`` run directories (``--runs / --seeds`` groups × ``--seeds`` seeds),
each with a real resolved config.yaml (composed from configs/train.yaml) and a results.json in
run.py's format (classifier metrics on dev and test, scored once by the real code, then varied per
run), in two layouts: a sweep (sweep.json lists the jobs and their groups) and a directory of runs
made by hand (no sweep.json; .hydra/ records as Hydra writes them; grouped by config text). Timed:
the whole collect_sweep call (read, group, mean ± std, table.md/csv/tex and the chart), the same
from a new process (launcher/collect.py, imports included), and the floor: reading and
json-parsing every results.json, nothing else. Each figure is the median of ``--repeats`` timed
runs after a warm-up; all run against a warm page cache. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from report import ROOT, machine_info, record

from memetrain.cli import CONFIG_DIR
from memetrain.eval.protocols import Outputs, score_splits
from memetrain.sweep.collect import collect_sweep

TARGET_SECONDS = 2.0
MODELS = ("lstm", "resnet18", "fusion_concat", "fusion_cross")
FRACTIONS = (0.05, 0.1, 0.3, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="run directories per layout")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per group (runs / seeds groups)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 runs, 2 repeats")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md even with --quick")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.repeats = min(args.runs, 1000), 2
    return args


# synthetic runs ------------------------------------------------------------------------------


def template_protocols(rng: np.random.Generator, n: int = 500) -> dict:
    """A classifier entry of results.json on dev and test, scored by the real code."""
    outputs, scores = {}, {}
    for split in ("dev", "test"):
        labels = rng.integers(0, 2, n)
        outputs[split] = Outputs([f"m{i}" for i in range(n)], labels[:, None], np.zeros((n, 1)), None)
        scores[split] = np.clip(0.3 * labels + 0.7 * rng.random(n), 0, 1)
    return {"classifier": score_splits(scores, outputs, 0, "dev", 1.0)}


def base_configs() -> dict[str, tuple[str, str, dict]]:
    """Per model choice: the resolved config.yaml text (seed 0), hydra.yaml text, and results' model."""
    out = {}
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        for model in MODELS:
            cfg = compose("train", overrides=[f"model={model}"], return_hydra_config=True)
            hydra_yaml = OmegaConf.to_yaml({"hydra": cfg.hydra})
            with open_dict(cfg):
                del cfg["hydra"]
            out[model] = (OmegaConf.to_yaml(cfg, resolve=True), hydra_yaml, OmegaConf.to_container(cfg.model))
    return out


def group_settings(index: int) -> dict:
    """The grid values of group ``index``: model × label fraction × learning rate (all distinct)."""
    return {
        "model": MODELS[index % len(MODELS)],
        "data.label_fraction": FRACTIONS[index // len(MODELS) % len(FRACTIONS)],
        "trainer.lr": round(1e-4 * (1 + index // (len(MODELS) * len(FRACTIONS))), 6),
    }


def write_runs(root: Path, runs: int, seeds: int, hand_made: bool) -> Path:
    """``runs`` run directories under ``root``; a sweep.json unless ``hand_made``."""
    rng = np.random.default_rng(0)
    protocols = template_protocols(rng)
    bases = base_configs()
    root.mkdir(parents=True)
    jobs = []
    for index in range(runs):
        group, seed = group_settings(index // seeds), index % seeds
        config, hydra_yaml, model = bases[group["model"]]
        config = config.replace("label_fraction: 1.0", f"label_fraction: {group['data.label_fraction']}", 1)
        config = config.replace("\n  lr: 0.001\n", f"\n  lr: {group['trainer.lr']}\n", 1)
        config = config.replace("\nseed: 0\n", f"\nseed: {seed}\n", 1)
        overrides = [f"{k}={v}" for k, v in group.items()] + [f"seed={seed}"]
        name = f"job{index:05d}"
        run_dir = root / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(config)
        test = protocols["classifier"]["splits"]["test"]
        test.update(auroc=float(rng.uniform(0.4, 0.9)), accuracy=float(rng.uniform(0.4, 0.9)))
        results = {
            "method": "supervised",
            "model": model,
            "data": {
                "shards": "shards/synth",
                "source": "synth",
                "label_fraction": group["data.label_fraction"],
            },
            "seed": seed,
            "steps": 600,
            "skipped_steps": 0,
            "world_size": 1,
            "protocols": protocols,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if hand_made:
            (run_dir / ".hydra").mkdir()
            (run_dir / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
            (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        else:
            log = str(root / "logs" / f"{name}.log")
            jobs.append(
                {
                    "name": name,
                    "overrides": overrides,
                    "group": group,
                    "seed": seed,
                    "status": "done",
                    "log": log,
                }
            )
    if not hand_made:
        (root / "sweep.json").write_text(json.dumps({"jobs": jobs}, indent=1))
    return root


# timing ------------------------------------------------------------------------------------


def read_floor(root: Path) -> int:
    """Read and json-parse every results.json under ``root`` (what any collector has to do)."""
    count = 0
    for run_dir in root.iterdir():
        path = run_dir / "results.json"
        if path.exists():
            json.loads(path.read_bytes())
            count += 1
    return count


def new_process(root: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "collect.py"), str(root)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )


def seconds(function, *args, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (this process and its children) of ``repeats`` calls after a warm-up.

    CPU seconds are what the call costs with a core to itself; on a shared machine the wall
    seconds also hold the waits for one."""
    function(*args)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        function(*args)
        wall.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
    return wall, cpu


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def row(name: str, times: tuple[list[float], list[float]], ratio: str = "", target: str = "") -> str:
    wall, cpu = times
    spread = f"{min(wall):.2f}–{max(wall):.2f}" if len(wall) > 1 else "–"
    return f"| {name} | {statistics.median(wall):.2f} s | {spread} | {statistics.median(cpu):.2f} s | {ratio} | {target} |"


def target(times: tuple[list[float], list[float]]) -> str:
    value = statistics.median(times[0])
    return f"<= {TARGET_SECONDS:g} s ({'met' if value <= TARGET_SECONDS else 'not yet'}: {value / TARGET_SECONDS:.2f}x)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info(numpy=np.__version__, matplotlib=matplotlib.__version__)
    print(f"machine: {info}", flush=True)
    groups = -(-args.runs // args.seeds)
    with tempfile.TemporaryDirectory(prefix="memetrain-bench-") as tmp:
        start = time.perf_counter()
        sweep = write_runs(Path(tmp) / "sweep", args.runs, args.seeds, hand_made=False)
        hand = write_runs(Path(tmp) / "hand", args.runs, args.seeds, hand_made=True)
        print(f"wrote 2 x {args.runs} run directories in {time.perf_counter() - start:.0f} s", flush=True)
        floor = seconds(read_floor, sweep, repeats=args.repeats)
        timed = {
            "sweep": seconds(collect_sweep, sweep, repeats=args.repeats),
            "hand": seconds(collect_sweep, hand, repeats=args.repeats),
            "process": seconds(new_process, sweep, repeats=max(1, args.repeats // 2)),
        }
        for layout in (sweep, hand):  # every group became one row of --seeds runs
            rows = (layout / "table.csv").read_text().splitlines()[1:]
            assert len(rows) == groups, f"{layout.name}: {len(rows)} rows collected, {groups} expected"

    def vs_floor(times: tuple[list[float], list[float]]) -> str:
        return f"{statistics.median(times[0]) / statistics.median(floor[0]):.1f}x the floor"

    runs = f"{args.runs} runs ({groups} rows x {args.seeds} seeds)"
    table = "\n".join(
        [
            "| benchmark | median (wall) | spread (min–max) | CPU (median) | ratio (wall) | target (wall) |",
            "|---|---|---|---|---|---|",
            row(
                f"collect_sweep, sweep.json layout, {runs}",
                timed["sweep"],
                vs_floor(timed["sweep"]),
                target(timed["sweep"]),
            ),
            row(
                f"collect_sweep, hand-made layout (no sweep.json), {runs}",
                timed["hand"],
                vs_floor(timed["hand"]),
                target(timed["hand"]),
            ),
            row(
                "launcher/collect.py in a new process, sweep.json layout",
                timed["process"],
                vs_floor(timed["process"]),
            ),
            row(f"floor: read + json.loads of {args.runs} results.json, nothing else", floor),
        ]
    ) + (
        f"\n\nEach collect_sweep call writes table.md, table.csv, table.tex and table.png (the chart shows "
        f"the first 40 rows); {args.repeats} timed runs after a warm-up, warm page cache"
    )
    print(f"\n{table}\n")
    if not args.quick or args.record:
        record("Collector", info, table)


if __name__ == "__main__":
    main()
