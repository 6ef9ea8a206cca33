"""Data-parallel batch renders: each process takes its share; the images equal a single-process run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

PROMPTS = ["a mybox on grass", "a red ball on a beach", "a mybox in the snow"]


def run(args, env_extra=None, home=None):
    env = {**os.environ, "PERFUSION_HOME": str(home), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "perfusion_cli", "--quiet", "render", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture
def job(tmp_path, registry_with_concept, perfusion_home):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--prompts", str(prompts), "-n", "2", "--seed", "7", "--steps", "2", "--batch-size", "1"]
    single = tmp_path / "single"
    p = run([*common, "-o", str(single)], home=perfusion_home)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert len(out.split()) == 6
    return common, pixels(single), perfusion_home, tmp_path


def test_two_processes_split_the_work_and_match_a_single_run(job):
    common, expected, home, tmp_path = job
    multi = tmp_path / "multi"
    procs = [run([*common, "-o", str(multi)], {"WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)}, home)
             for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    per_rank = [o[0].split() for o in outs]
    assert [len(x) for x in per_rank] == [3, 3]                    # each process rendered its share
    got = pixels(multi)
    assert got.keys() == expected.keys()                           # same names: seeds and indices agree
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def test_several_processes_need_a_seed(tmp_path, registry_with_concept, perfusion_home):
    p = run(["a mybox", "--steps", "2", "-o", str(tmp_path / "o")], {"WORLD_SIZE": "2", "RANK": "0"}, perfusion_home)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "--seed" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_launch_two_cpu_processes(job):
    common, expected, home, tmp_path = job
    multi = tmp_path / "accel"
    env = {**os.environ, "PERFUSION_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "perfusion_cli", "--quiet", "render", *common, "-o", str(multi)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = pixels(multi)
    assert got.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name
