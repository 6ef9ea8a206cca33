"""`perfusion bench speed` at toy scale with minimal repeats: the report's structure and sanity, not speed.

No assertion here is about how fast anything is; only that every number is there, positive and finite,
that the sizes agree with the concept's bytes, and that the command writes its two files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from perfusion_cli.bench import SpeedConfig, SpeedResult, markdown, run_speed, write_reports
from perfusion_cli.bench.speed import CLIP_L_TEXT, SD15_UNET, SD_VAE
from perfusion_cli.cli import app
from perfusion_cli.errors import PerfusionError

MINIMAL = dict(scale="toy", device="cpu", threads=1, repeats=1, warmup=0, train_steps=1, render_steps=2, io_repeats=2,
               full=True, full_steps=3)
MINIMAL_ARGS = ["--scale", "toy", "--device", "cpu", "--threads", "1", "--repeats", "1", "--warmup", "0", "--train-steps", "1",
                "--render-steps", "2", "--io-repeats", "2"]
STAGES = ["model", "training", "low-memory training", "full concept", "rendering", "concept file", "apply/remove"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One minimal toy run, shared by the tests of this module: (result, progress calls, events)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERFUSION_HOME", str(tmp_path_factory.mktemp("bench-home")))
        calls, events = [], []
        threads = torch.get_num_threads()
        result = run_speed(SpeedConfig(**MINIMAL), progress=lambda *a: calls.append(a), on_event=events.append)
        assert torch.get_num_threads() == threads, "run_speed must leave torch's thread count as it found it"
    return result, calls, events


def timing_ok(t: dict, n: int | None = None) -> None:
    assert t["n"] >= 1 and len(t["samples_s"]) == t["n"]
    if n is not None:
        assert t["n"] == n
    assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] and math.isfinite(t["max_s"])


def test_result_structure_and_sanity(bench):
    result, _, _ = bench
    assert isinstance(result, SpeedResult)
    assert (result.scale, result.device, result.device_label, result.random_weights) == ("toy", "cpu", "cpu", False)
    assert result.model == "toyworld" and result.dtype == "float32"
    m = result.machine
    assert m["cpu"] and m["cpu_cores"] >= 1 and m["torch"] == torch.__version__ and m["date"]

    tr = result.training
    timing_ok(tr["step"], 1)
    timing_ok(tr["floor"], 1)
    assert tr["batch"] == 4 and tr["resolution"] == 64
    assert math.isfinite(tr["ratio"]) and tr["ratio"] > 0
    assert tr["ratio"] == pytest.approx(tr["step"]["median_s"] / tr["floor"]["median_s"])
    fc = tr["full_concept"]
    assert (fc["steps"], fc["batch"], fc["micro_steps"]) == (400, 16, 1600)
    assert fc["projected_s"] >= 1600 * tr["step"]["median_s"] > 0 and fc["floor_projected_s"] > 0
    for side in ("step", "floor"):
        assert tr["peak_memory"][side]["peak_bytes"] > 0
    # --low-memory: the profile's own micro-batch (toyworld: 4) with gradient checkpointing
    lm = tr["low_memory"]
    assert lm["batch"] == 4 and lm["peak_memory"]["peak_bytes"] > 0
    timing_ok(lm["step"], 1)
    assert lm["goal_bytes"] is None and lm["meets_goal"] is None  # the 8 GiB goal is a GPU's
    # a full concept trained for real (3 steps here), at the batch `perfusion train` picks on this device
    fm = fc["measured"]
    assert (fm["steps"], fm["batch_size"], fm["grad_accum"]) == (3, 4, 1)
    assert fm["wall_s"] > 0 and math.isfinite(fm["final_loss"]) and fm["goal_s"] is None

    rd = result.rendering
    assert (rd["size"], rd["steps"], rd["cfg"], rd["sampler"]) == (64, 2, 4.0, "ddim")
    assert set(rd["variants"]) >= {"plain", "1 concept", "3 concepts"}
    assert rd["variants"]["plain"]["ratio"] == pytest.approx(1.0)
    for label, v in rd["variants"].items():
        timing_ok(v["per_image"], 1)
        assert math.isfinite(v["ratio"]) and v["ratio"] > 0, label
        assert v["peak_memory"]["peak_bytes"] > 0
    # the concepts are really applied: the image differs from the plain one of the same seed
    assert rd["variants"]["1 concept"]["pixel_change_vs_plain"] > 0
    assert rd["variants"]["3 concepts"]["pixel_change_vs_plain"] > 0
    assert "benchcat" in rd["prompts"]["1 concept"] and "benchcat" not in rd["prompts"]["plain"]

    cf = result.concept_file
    assert cf["size_bytes"] == cf["bytes_from_to_bytes"] > 0           # the file on disk is the concept's bytes
    assert cf["size_bytes"] > 2 * cf["tensor_values"]                  # fp16 values plus the header
    assert abs((cf["size_bytes_fp32"] - cf["size_bytes"]) - 2 * cf["tensor_values"]) <= 16
    assert cf["layers"] == 11 and cf["loaded_concepts"] == 1
    timing_ok(cf["load"], 2)

    ap = result.apply
    for label in ("1 concept", "3 concepts"):
        for k in ("patch_apply", "patch_remove", "applied", "applied_remove"):
            timing_ok(ap[label][k], 2)
    assert ap["hooks_left"] == 0, "the benchmark must leave the pipeline as it found it"

    assert result.settings["repeats"] == 1 and result.total_s > 0
    assert "--scale toy" in result.command and "--repeats 1" in result.command
    json.dumps(result.to_dict())  # the JSON report is plain data


def test_progress_covers_every_stage(bench):
    _, calls, events = bench
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == STAGES
    for stage in STAGES:
        last = [c for c in calls if c[0] == stage][-1]
        assert last[1] == last[2] > 0, (stage, last)
    assert not any(e.startswith("warning") for e in events)


def test_markdown_says_what_where_and_how(bench, tmp_path):
    result, _, _ = bench
    text = markdown(result)
    for phrase in ("## What was measured", "## Machine", "## Training", "## Rendering", "## Concept file",
                   "## Apply and remove", "## Reproduce", result.command, result.machine["cpu"], "floor step",
                   "**Measured**: one full concept", "**Low memory**", "--full-steps 3"):
        assert phrase in text, phrase
    assert "Random weights" not in text  # only the sd15 scale is random
    md, js = write_reports(result, tmp_path / "reports")
    assert md.name == "speed-toy-cpu.md" and js.name == "speed-toy-cpu.json"
    assert md.read_text() == text
    assert json.loads(js.read_text())["training"]["ratio"] == pytest.approx(result.training["ratio"])
    assert [p.name for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")] == []  # no temp files left
    sd = result.to_dict()
    sd["random_weights"] = True
    assert "Random weights" in markdown(sd)


def test_cli_writes_both_reports(tmp_path):
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench", "speed", *MINIMAL_ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    paths = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in paths] == ["speed-toy-cpu.md", "speed-toy-cpu.json"]
    assert all(p.is_file() for p in paths)
    report = json.loads(paths[1].read_text())
    assert report["scale"] == "toy" and report["training"]["step"]["median_s"] > 0
    assert "perfusion bench speed --scale toy" in paths[0].read_text()
    assert "floor" in r.stderr  # the one-line summary goes to stderr


def test_cli_json_prints_one_document(bench, tmp_path, monkeypatch):
    import perfusion_cli.bench as bench_pkg

    result, _, _ = bench
    monkeypatch.setattr(bench_pkg, "run_speed", lambda config, progress=None, on_event=None: result)
    r = CliRunner().invoke(app, ["bench", "speed", "--scale", "toy", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert Path(doc["written"]["markdown"]).is_file() and Path(doc["written"]["json"]).is_file()
    assert doc["concept_file"]["size_bytes"] == result.concept_file["size_bytes"]


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(PerfusionError, match="scale"):
        run_speed(SpeedConfig(scale="sd99", device="cpu"))
    with pytest.raises(PerfusionError, match="--repeats"):
        run_speed(SpeedConfig(scale="toy", device="cpu", repeats=0))
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench", "speed", "--scale", "sdxxl", "--out", str(out)])
    assert r.exit_code != 0 and "Traceback" not in r.output and "scale" in r.stderr
    assert r.stdout == "" and not out.exists()


def test_sd15_scale_is_sd15s_architecture():
    """The sd15 scale's configurations give SD 1.5's parameter counts (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from perfusion_cli import patch as P

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480  # CLIP ViT-L/14's text tower at CLIP's vocabulary
    widths = P.layer_widths(unet)
    assert len(widths) == 16 and {w for _, w in widths} == {320, 640, 1280}


def test_channels_last_floor_is_timed_both_ways(tmp_path, monkeypatch):
    """The bench times the floor step in the memory layout the product does not use (NCHW by default; here the
    UNet is forced channels-last, so the other layout is NCHW), and says which was faster."""
    from perfusion_cli import models
    from perfusion_cli.bench import speed

    monkeypatch.setenv("PERFUSION_HOME", str(tmp_path))
    real_load = speed._load

    def load_channels_last(*a, **k):
        base = real_load(*a, **k)
        assert not models.is_channels_last(base.pipe)   # the default is NCHW
        models.use_channels_last(base.pipe)
        assert models.is_channels_last(base.pipe)
        return base

    monkeypatch.setattr(speed, "_load", load_channels_last)
    cfg = dict(MINIMAL, full=False, render_steps=1, repeats=2, train_steps=2)
    result = run_speed(SpeedConfig(**cfg))
    tr = result.to_dict()["training"]
    assert tr["channels_last"] is True
    assert tr["floor_other_layout"]["n"] == 4 and tr["floor_other_layout"]["median_s"] > 0
    md = markdown(result)
    assert "both steps ran with the UNet in channels-last layout" in md and "The same floor step in NCHW" in md
    # the layout changes no value: the same floor-step loss either way
    base = real_load("toy", "cpu", "fp32", 0)
    floor = speed.floor_step(base, ["a cat"], 2, seed=0)
    a = floor()
    floor = speed.floor_step(base, ["a cat"], 2, seed=0)
    models.use_channels_last(base.pipe)
    b = floor()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_training_is_timed_against_a_compiled_floor(tmp_path, monkeypatch):
    """--compile MODE: the compiled rounds, the compile cost, the full concept with --compile, and the report's
    section. torch.compile with the aot_eager backend (tracing without code generation: seconds on a CPU)."""
    import torch._dynamo as dynamo
    from perfusion_cli import training

    modes = []

    def aot_eager(unet, mode):
        modes.append(mode)
        return torch.compile(unet, backend="aot_eager", dynamic=False)

    monkeypatch.setenv("PERFUSION_HOME", str(tmp_path))
    monkeypatch.setattr(training, "compiled_unet", aot_eager)
    cfg = dict(MINIMAL, render_steps=1, repeats=2, train_steps=2, full_steps=2, compile="default")
    dynamo.reset()
    calls = []
    try:
        result = run_speed(SpeedConfig(**cfg), progress=lambda *a: calls.append(a))
    finally:
        dynamo.reset()
    cm = result.to_dict()["training"]["compiled"]
    # one compiled UNet per trainer (2 rounds + the full concept) and one for the floor, all in mode "default"
    assert modes == ["default"] * 4
    timing_ok(cm["step"], 4)
    timing_ok(cm["floor"], 4)
    assert cm["ratio"] == pytest.approx(cm["step"]["median_s"] / cm["floor"]["median_s"])
    assert cm["floor_speedup_over_eager"] > 0
    assert len(cm["first_call_s"]["train"]) == len(cm["first_call_s"]["floor"]) == 2
    # tracing happens in round 1 only: its first calls are the slow ones
    assert cm["compile_s"]["train"] > 0 and cm["compile_s"]["floor"] > 0
    assert cm["full_concept"]["steps"] == 2 and cm["full_concept"]["wall_s"] > 0
    assert [c for c in calls if c[0].startswith("compiled training")][-1][1:] == (12, 12)
    md = markdown(result)
    assert "### Compiled (`perfusion train --compile`, torch.compile mode `default`)" in md
    assert "--compile default" in result.command
    with pytest.raises(PerfusionError, match="--compile"):
        run_speed(SpeedConfig(scale="toy", device="cpu", compile="fastest"))
    # `--compile auto` times what `train --compile` would use on that device
    assert SpeedConfig(scale="toy", compile="auto").resolved(torch.device("cpu")).compile == "default"
    assert SpeedConfig(scale="sd15", compile="auto").resolved(torch.device("cuda")).compile == "reduce-overhead"


def test_cuda_graph_report_warns_that_its_memory_column_leaves_the_pool_out():
    """The compiled section under a CUDA-graph mode tells the reader not to read memory from it."""
    from perfusion_cli.bench.speed import _compiled_section

    timing = {"median_s": 0.1, "min_s": 0.1, "max_s": 0.1, "n": 1}
    cm = {"mode": "reduce-overhead", "step": timing, "floor": timing, "ratio": 1.0, "ratio_paired": 1.0,
          "meets_goal": True, "floor_speedup_over_eager": 1.3, "compile_s": {"train": 1.0, "floor": 1.0},
          "peak_memory": {"step": {"peak_bytes": 1, "delta_bytes": 1, "reserved_bytes": 1},
                          "floor": {"peak_bytes": 1, "delta_bytes": 1, "reserved_bytes": 1}},
          "full_concept_projected_s": 40.0}
    for mode, cuda, warned in (("reduce-overhead", True, True), ("default", True, False),
                               ("reduce-overhead", False, False)):
        lines: list[str] = []
        _compiled_section(lines.append, {**cm, "mode": mode}, cuda, "peak memory", lambda b: "meets" if b else "misses")
        assert ("private memory pool" in "\n".join(lines)) is warned, (mode, cuda)


def test_a_failing_compile_is_reported_not_fatal(tmp_path, monkeypatch):
    """A machine whose torch.compile toolchain fails (no C compiler, no triton) still gets every other number."""
    from perfusion_cli import training

    def broken(unet, mode):
        raise RuntimeError("no working C++ compiler found\nmore detail")

    monkeypatch.setenv("PERFUSION_HOME", str(tmp_path))
    monkeypatch.setattr(training, "compiled_unet", broken)
    events = []
    result = run_speed(SpeedConfig(**dict(MINIMAL, full=False, render_steps=1, compile="default")),
                       on_event=events.append)
    cm = result.training["compiled"]
    assert cm == {"mode": "default", "error": "RuntimeError: no working C++ compiler found"}
    assert any("compiled training failed" in e for e in events)
    assert result.rendering["variants"]["1 concept"]["per_image"]["median_s"] > 0
    assert "**Failed** on this machine: `RuntimeError: no working C++ compiler found`" in markdown(result)


def test_training_is_timed_in_the_training_dtype_and_rendering_in_the_render_dtype(tmp_path, monkeypatch):
    """On a CUDA GPU `perfusion train` runs in bf16 while `render` runs in fp16: the benchmark times each in its own
    dtype (faked here on a CPU: the training dtype made bf16) and says so in the report."""
    from perfusion_cli import models

    seen = {}
    real_pick = models.pick_dtype
    monkeypatch.setattr(models, "pick_dtype", lambda d, dev, training=False:
                        torch.bfloat16 if training else real_pick(d, dev))
    import perfusion_cli.bench.speed as speed

    real_render = speed._bench_render

    def render(base, *a, **k):
        seen["render"] = (base.dtype, base.pipe.unet.dtype)
        return real_render(base, *a, **k)

    monkeypatch.setattr(speed, "_bench_render", render)
    monkeypatch.setenv("PERFUSION_HOME", str(tmp_path))
    result = run_speed(SpeedConfig(**dict(MINIMAL, full=False, low_memory=False, render_steps=1)))
    tr = result.to_dict()["training"]
    assert tr["dtype"] == "bfloat16" and tr["autocast"] is None
    assert result.dtype == "float32" and seen["render"] == (torch.float32, torch.float32)
    assert "float32, training in bfloat16, no autocast" in markdown(result)
