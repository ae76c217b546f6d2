"""The benchmark scripts stay runnable (tiny sizes; the figures themselves are not checked here)."""

from __future__ import annotations

import json

from ahn.benchmarks import capacity, distill_step, efficiency, kernels


def test_kernels_benchmark_prints_its_table(capsys):
    kernels.main(["--lengths", "64", "--repeats", "1", "--heads", "2", "--head-dim", "8"])
    out = capsys.readouterr().out
    for rule in kernels.RULES:  # every rule, the newer ones included
        assert f"{rule:<21}{64:>7} fwd+bwd" in out
        assert f"\n{rule:<21}" in out.split("decode step")[1]


def test_capacity_study_runs_every_cell_once_and_resumes(tmp_path, capsys):
    """Tiny settings (2 steps): the cells, the summary files, the sizes from the real cache, and a rerun that
    reuses every finished cell."""
    args = ["--memories", "kda", "deltanet", "--pairs", "2", "3", "--steps", "2", "--eval-examples", "4",
            "--batch-size", "4", "--out", str(tmp_path)]
    capacity.main(args)
    data = json.loads((tmp_path / capacity.SUMMARY_NAME).read_text())
    cells = {(c["memory"], c["pairs"]): c for c in data["cells"]}
    assert set(cells) == {("kda", 2), ("kda", 3), ("deltanet", 2), ("deltanet", 3)}
    assert data["settings"]["buffer_slots"] == 0 and data["settings"]["readout"] == "add"  # the memory alone
    # Same state size (H D x D float32 per layer), more cached gate bytes for KDA (its decay code).
    assert cells[("kda", 2)]["state_bytes"] == cells[("deltanet", 2)]["state_bytes"] > 0
    assert cells[("kda", 2)]["gate_bytes_per_window_token"] == 5 * cells[("deltanet", 2)]["gate_bytes_per_window_token"]
    # The trained parameters, counted from the adapter file: the model's own count of its memory weights.
    from ahn import AHNModel
    from ahn.demo.teacher import load_teacher

    for (mem, pairs), cell in cells.items():
        model = AHNModel.from_pretrained(load_teacher(), str(tmp_path / f"{mem}-pairs{pairs}" / f"adapter-{mem}"))
        assert cell["memory_params"] == sum(p.numel() for p in model.memory_parameters()) > 0
    table = (tmp_path / "capacity.md").read_text()
    assert f"| {cells[('kda', 2)]['memory_params']:,} |" in table
    assert "| kda |" in table and "| 2 pairs | 3 pairs |" in table
    assert (tmp_path / "capacity.png").stat().st_size > 0
    capsys.readouterr()
    capacity.main(args)
    assert "0 runs to do, 4 reused" in capsys.readouterr().out


def test_efficiency_benchmark_prints_ratios_and_plots(capsys, tmp_path):
    png = tmp_path / "eff.png"
    efficiency.main(["--prefill", "300", "--decode-at", "200", "300", "--steps", "2", "--window", "64", "--sinks", "4",
                     "--hidden", "32", "--block", "128", "--plot", str(png), "--modes", "ahn", "salient", "window", "full",
                     "--buffer", "8"])
    out = capsys.readouterr().out
    assert "ratios to 'full'" in out and "ahn     decode      300" in out and "salient decode      300" in out
    assert png.stat().st_size > 0


def test_distill_step_benchmark_times_both_modes(capsys):
    """Both modes' steps are timed through the real trainer (the recommended one with its salience loss)."""
    distill_step.main(["--seq-len", "96", "--window", "16", "--sinks", "2", "--batch", "2", "--steps", "1", "--warmup", "0",
                       "--buffer", "4"])
    out = capsys.readouterr().out
    assert "step 1/1 paper" in out and "step 1/1 recommended" in out and "recommended / paper: x" in out
