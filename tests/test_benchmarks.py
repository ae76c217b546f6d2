"""The benchmark scripts stay runnable (tiny sizes; the figures themselves are not checked here)."""

from __future__ import annotations

from ahn.benchmarks import efficiency, kernels


def test_kernels_benchmark_prints_its_table(capsys):
    kernels.main(["--lengths", "64", "--repeats", "1", "--heads", "2", "--head-dim", "8"])
    out = capsys.readouterr().out
    for rule in ("gated_delta_rule", "delta_rule", "ssd"):
        assert f"{rule:<17}{64:>7} fwd+bwd" in out


def test_efficiency_benchmark_prints_ratios_and_plots(capsys, tmp_path):
    png = tmp_path / "eff.png"
    efficiency.main(["--prefill", "300", "--decode-at", "200", "300", "--steps", "2", "--window", "64", "--sinks", "4",
                     "--hidden", "32", "--block", "128", "--plot", str(png), "--modes", "ahn", "salient", "window", "full",
                     "--buffer", "8"])
    out = capsys.readouterr().out
    assert "ratios to 'full'" in out and "ahn     decode      300" in out and "salient decode      300" in out
    assert png.stat().st_size > 0
