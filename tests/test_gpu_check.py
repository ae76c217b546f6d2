"""gpu_check (``make gpu-check``): its --dry-run runs every section's code at tiny sizes on CPU, so the
GPU check cannot rot between the days a GPU is lent; the figures themselves are the GPU's to produce."""

from __future__ import annotations

import json
import time

import pytest

from ahn.benchmarks import gpu_check
from ahn.kernels._triton import interpreting

from ahn.benchmarks.kernels import NEW_RULES, RULES

TRITON_RULES = [rule for rule in RULES if rule not in NEW_RULES]
# The dry run's flex_attention runs uncompiled on CPU, as meant (torch warns that it materialises the scores).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def load(out):
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_dry_run_writes_every_section(tmp_path):
    # A budget far above the dry run's seconds: no case is skipped for time on a slow machine.
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "3600"]) == 0
    data, md = load(tmp_path)
    assert data["dry_run"] is True and data["status"] == "pass" and data["dtype"] == "bfloat16"
    sections = {s["name"]: s for s in data["sections"]}
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, sec in sections.items():
        assert sec["status"] == "pass" and sec["rows"] and sec["config"]["device"] == "cpu", name
        assert not any("skipped" in row or "error" in row for row in sec["rows"]), name
        assert f"## {name}: {sec['title']}" in md
    sizes = gpu_check.DRY_SIZES

    # The cuda-marked tests were collected (and skipped: no CUDA here), one row each.
    tests = sections["cuda_tests"]["rows"]
    names = {row["test"].split("::")[1].split("[")[0] for row in tests}
    assert {"test_fla_matches_torch_on_cuda", "test_triton_bfloat16_at_real_sizes_on_cuda",
            "test_fused_step_bfloat16_on_cuda"} <= names
    assert all(row["outcome"] == "skipped" for row in tests)

    # Every kernel case: torch timed; ahn's Triton kernels (interpreted) within tolerance; fla left out.
    kernels = sections["kernels"]
    cases = {(r["T"], r["shape"], r["rule"], r["direction"]) for r in kernels["rows"]}
    assert cases == {(T, shape, rule, d) for T in sizes.kernel_lengths for shape in gpu_check.KERNEL_SHAPES
                     for rule in RULES for d in ("fwd", "fwd+bwd")}
    for row in kernels["rows"]:
        assert row["torch_s"] > 0 and row["ok"] is True and "fla_s" not in row
        fused = interpreting() and row["rule"] in TRITON_RULES
        assert ("triton_err" in row) == fused, row
        if fused:
            assert row["triton_err"] <= gpu_check.TOL
            assert row["direction"] == "fwd" or row["triton_grad_err"] <= gpu_check.TOL_GRAD
    assert any("fla needs CUDA" in note for note in kernels["notes"])

    steps = sections["decode_step"]["rows"]
    assert len(steps) == len(gpu_check.KERNEL_SHAPES) * len(sizes.decode_batches) * len(RULES)
    assert all(row["torch_ms"] > 0 for row in steps)
    for row in steps:  # the fused step where ahn has one; the newer rules' rows hold torch alone
        fused = interpreting() and row["rule"] in TRITON_RULES
        assert ("state_err" in row) == fused and (not fused or row["state_err"] <= gpu_check.TOL_STEP_STATE)

    # Attention: flex's output and lse against the explicit softmax, the Triton mass (interpreted) against torch;
    # no flex backward on CPU.
    attn = sections["attention"]
    assert [(r["block"], r["window"]) for r in attn["rows"]] == [tuple(c) for c in sizes.attention_cases]
    for row in attn["rows"]:
        assert row["flex_s"] > 0 and row["explicit_s"] > 0 and "grad_err" not in row
        assert max(row["out_err"], row["lse_err"]) <= gpu_check.TOL
        assert ("mass_err" in row) == interpreting() and row.get("mass_err", 0) <= gpu_check.TOL
    assert any("no flex_attention backward on CPU" in note for note in attn["notes"])

    # End to end: every (length, mode), and the logits checks of docs/design.md's invariants 1 and 2.
    e2e = {(r["n"], r["mode"]): r for r in sections["end_to_end"]["rows"]}
    assert set(e2e) == {(n, mode) for n in sizes.e2e_lengths for mode in gpu_check.E2E_MODES}
    assert all(r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["cache_MiB"] > 0 for r in e2e.values())
    short, long = sizes.e2e_lengths
    assert short <= sizes.sinks + sizes.window < long
    assert e2e[short, "window"]["vs_full"] <= gpu_check.TOL and "vs_full" not in e2e[long, "window"]
    assert all(e2e[n, "ahn"]["vs_window"] <= gpu_check.TOL for n in sizes.e2e_lengths)
    # The recommended configuration (on the GPU's attention forms: flex, the interpreted mass kernel) equals sinks +
    # window while nothing has left the window; its ratios against the paper's mechanism are written.
    assert e2e[short, "salient"]["vs_window"] <= gpu_check.TOL and "vs_window" not in e2e[long, "salient"]
    assert all("prefill_x_ahn" in e2e[n, "salient"] and "decode_x_ahn" in e2e[n, "salient"] for n in sizes.e2e_lengths)
    assert any("AHN_ATTENTION_LSE" in note for note in sections["end_to_end"]["notes"])
    assert e2e[long, "ahn"]["cache_MiB"] < e2e[long, "salient"]["cache_MiB"]  # + the buffer's slots and scores
    # The memory's state is a fixed size; the full cache grows with n.
    assert e2e[short, "ahn"]["cache_MiB"] == e2e[long, "ahn"]["cache_MiB"] < e2e[long, "full"]["cache_MiB"]
    assert f"| {long} | ahn |" in md and "| n | mode | prefill_s |" in md


def test_a_section_that_raises_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(run, sec):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(gpu_check.SECTIONS, "kernels", ("a broken section", broken))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "kernels", "decode_step"]) == 1
    data, md = load(tmp_path)
    assert data["status"] == "fail"
    assert [(s["name"], s["status"]) for s in data["sections"]] == [("kernels", "error"), ("decode_step", "pass")]
    assert "RuntimeError: kernel exploded" in data["sections"][0]["error"]
    assert "kernel exploded" in md and "status **fail**" in md


def test_a_case_predicted_to_overrun_its_section_is_skipped():
    sec = gpu_check.Section("kernels", "title", deadline=time.monotonic() + 100)
    assert sec.fits("gdr", 4096) is None  # nothing known yet: run it
    sec.ran("gdr", 4096, 10.0)
    assert sec.fits("gdr", 16384) is None  # predicted 40 s
    assert sec.fits("gdr", 65536).startswith("time budget: predicted 160 s")
    assert sec.fits("full", 65536, 2.0) is None  # another key: its own history


def test_non_finite_figures_are_written_as_strings():
    assert gpu_check.finite({"rows": [{"err": float("nan"), "s": 0.5}], "t": (float("inf"),)}) == \
        {"rows": [{"err": "nan", "s": 0.5}], "t": ["inf"]}


def test_without_cuda_it_asks_for_a_gpu_or_a_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here.*--dry-run"):
        gpu_check.main(["--out", str(tmp_path)])
