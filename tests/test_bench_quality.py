"""`perfusion bench quality`: its quick mode end to end (what CI keeps alive) and the claim check's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from perfusion_cli.bench.quality import QualityConfig, dominance, instance_names
from perfusion_cli.cli import app
from perfusion_cli.errors import PerfusionError


def test_dominance_reads_perfusion_at_the_baselines_alignment():
    perf = [{"alignment": 0.5, "fidelity": 0.8}, {"alignment": 0.9, "fidelity": 0.4}]   # a straight curve
    other = [{"alignment": 0.7, "fidelity": 0.55},   # perfusion there: 0.6 -> at or above
             {"alignment": 0.6, "fidelity": 0.75},   # perfusion 0.7 -> below
             {"alignment": 0.95, "fidelity": 0.1}]   # outside perfusion's range: not matched
    r = dominance(perf, other)
    assert (r["matched"], r["at_or_above"], r["points"]) == (2, 1, 3) and r["share"] == pytest.approx(0.5)
    assert dominance(perf, [])["share"] is None


def test_instance_sets():
    from perfusion_cli.toyworld import world as tw

    assert instance_names("reporting") == [i.name for i in tw.REPORTING_INSTANCES] and len(tw.REPORTING_INSTANCES) >= 6
    assert instance_names(("hatcat", "tealcat")) == ["hatcat", "tealcat"]
    with pytest.raises(PerfusionError, match="unknown instance"):
        instance_names("nosuch")
    full = QualityConfig()
    assert len(full.prompts) >= 8 and len(full.biases) >= 5 and full.methods[0] == "perfusion"


def test_quick_run_writes_report_plot_and_json(tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["bench", "quality", "--quick", "-o", str(out)])
    assert r.exit_code == 0, r.output
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["quality-quick.md", "quality-quick.json", "quality-quick.png"]
    report = json.loads(paths[1].read_text())
    assert report["config"]["instances"] == ["hatcat"] and report["config"]["quick"] is True
    res = report["results"]["hatcat"]
    assert set(res) == {"base model", "perfusion", "ti", "dreambooth", "lora", "custom-diffusion"}
    assert [p["knob"] for p in res["perfusion"]] == [0.5, 0.9] and [p["knob"] for p in res["lora"]] == [0.5, 1.0]
    assert [p["knob"] for p in res["ti"]] == [1, 2]                      # steps snapshots of one run
    for curve in res.values():
        for p in curve:
            assert 0 <= p["fidelity"] <= 1 and 0 <= p["alignment"] <= 1
    assert report["file_bytes"]["perfusion"] < report["file_bytes"]["lora"] < report["file_bytes"]["dreambooth"]
    assert set(report["claim_perfusion_at_or_above"]) == {"ti", "dreambooth", "lora", "custom-diffusion"}
    text = paths[0].read_text()
    assert "Quick mode" in text and "quality-quick.png" in text and "The paper's claim" in text
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(paths[2]))
    assert img.shape[2] == 3 and img.shape[0] > 300
    assert "Perfusion at or above ti" in r.stderr
    bad = CliRunner().invoke(app, ["bench", "quality", "--quick", "--methods", "perfusion,hyper", "-o", str(out)])
    assert bad.exit_code != 0 and "unknown method" in bad.stderr and "Traceback" not in bad.output


def test_pareto_counts_points_beaten_on_both_axes():
    from perfusion_cli.bench.quality import pareto

    perf = [{"alignment": 0.6, "fidelity": 0.6}, {"alignment": 0.7, "fidelity": 0.4}]
    other = [{"alignment": 0.65, "fidelity": 0.65},   # beats perfusion's first point
             {"alignment": 0.5, "fidelity": 0.3}]     # beaten by both of perfusion's
    r = pareto(perf, other)
    assert (r["other_beaten"], r["other_points"], r["perfusion_beaten"], r["perfusion_points"]) == (1, 2, 1, 2)
    assert pareto(perf, perf)["other_beaten"] == 0   # a point does not beat itself
