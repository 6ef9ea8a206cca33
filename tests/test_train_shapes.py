"""Train and render through tiny random pipelines of every supported shape (SD 1.x, SD 2.x, SDXL)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from perfusion_cli import models
from perfusion_cli import patch as P
from perfusion_cli.concept import ConceptSet, load, to_bytes
from perfusion_cli.edit import inverse_covariance
from perfusion_cli.images import PhotoSet
from perfusion_cli.rendering import Applied
from perfusion_cli.training import Trainer, TrainConfig
from perfusion_cli.covariance import estimate
from perfusion_cli.errors import PerfusionError
from tiny_pipelines import IMAGE_SIZE, TEXT_WIDTH, tiny_pipeline

PROMPTS = ["a cat on grass", "a red car", "a dog in the snow at night", "two blue boxes", "a house", "a tree"] * 4


def base_of(pipe) -> models.BaseModel:
    return models.BaseModel(pipe=pipe, id="tiny", profile=models.generic_profile(pipe),
                            device=torch.device("cpu"), dtype=torch.float32)


def photo_set(n=4) -> PhotoSet:
    g = torch.Generator().manual_seed(0)
    return PhotoSet(pixels=torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1,
                    paths=[Path(f"p{i}.png") for i in range(n)])


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_train_and_render_every_shape(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    base = base_of(pipe)
    assert base.resolution == IMAGE_SIZE
    C = estimate(pipe, PROMPTS)
    assert C.shape == (TEXT_WIDTH[kind],) * 2
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=2, checkpoint_every=0, templates=["a photo of a {}", "a {}"])
    trainer = Trainer(base, "mycat", "cat", inverse_covariance(C), cfg)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    losses = []
    concept = trainer.fit(photo_set(), progress=lambda p: losses.append(p.loss), workdir=tmp_path)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    # what was trained moved, what is locked did not, the base model is untouched (§5)
    widths = dict(P.layer_widths(pipe.unet))
    assert set(concept.tensors.value_targets) == set(widths)
    for name, attn in P.cross_attention_layers(pipe.unet).items():
        assert concept.tensors.value_targets[name].shape == (widths[name],)
    n_enc = 2 if kind == "sdxl" else 1
    assert len(concept.embeddings) == n_enc
    (super_id,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    assert not torch.allclose(concept.embeddings[0], pipe.text_encoder.get_input_embeddings().weight[super_id])
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(text_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    for m in pipe.unet.modules():
        assert not m._forward_hooks, "training must remove its hooks"

    # o*_K = W_K i_super stays locked while o*_V trains
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    k = concept.tensors.key_targets[name]
    assert k.shape == (widths[name],)

    # file round trip, then render through the real pipeline with the concept in the prompt
    cs = ConceptSet(name="mycat", concepts=[concept], base_model={"id": "tiny", "fingerprint": "x", "family": kind},
                    covariance={"fingerprint": "y", "source": "test"})
    f = tmp_path / "mycat.safetensors"
    f.write_bytes(to_bytes(cs, torch.float32))
    loaded = load(f).concepts[0]
    torch.testing.assert_close(loaded.tensors.value_targets[name], concept.tensors.value_targets[name])
    with Applied(pipe, [loaded], C) as applied, torch.no_grad():
        out = applied(["a mycat on grass"], num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and out.std() > 1e-3
    with Applied(pipe, [loaded], C, global_lock=True) as applied, torch.no_grad():
        locked = applied(["a mycat on grass"], num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    assert locked.shape == out.shape and not (locked == out).all(), "global locking changes the keys"


def test_key_targets_are_locked_and_value_targets_train(tmp_path):
    """o*_K = W_K·i_super exactly and never trains; o*_V starts at W_V·i_super and moves (§4, §5)."""
    pipe = tiny_pipeline("sd1")
    C = estimate(pipe, PROMPTS)
    cfg = TrainConfig(steps=2, batch_size=2, grad_accum=1, checkpoint_every=0, templates=["a photo of a {}"])
    trainer = Trainer(base_of(pipe), "mycat", "cat", inverse_covariance(C), cfg)
    concept = trainer.fit(photo_set(), workdir=tmp_path)
    # i_super, independently: the encoding of "a photo of a cat" at the word "cat"
    with torch.no_grad():
        e = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0][0]
    ids = pipe.tokenizer("a photo of a cat").input_ids
    (cat,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    i_super = e[ids.index(cat)]
    for name, attn in P.cross_attention_layers(pipe.unet).items():
        torch.testing.assert_close(concept.tensors.key_targets[name], attn.to_k.weight @ i_super, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(concept.tensors.value_targets[name], attn.to_v.weight @ i_super, atol=1e-4)


def test_class_noun_keeps_the_word_after_the_concept_and_the_same_lock(tmp_path):
    """TrainConfig.class_noun (§11d, not the paper's): the model reads "a photo of a <mycat> cat". The keys still
    lock to i_super, the encoding of "cat" in "a photo of a cat" (the causal encoder's encoding at the concept's
    position does not see the words after it); the concept renders the way it was trained; resuming with the
    other setting is refused."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = dict(steps=2, batch_size=2, grad_accum=1, templates=["a photo of a {}"], checkpoint_every=1)
    concept = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(class_noun=True, **cfg)).fit(
        photo_set(), workdir=tmp_path / "a")
    assert concept.training["class_noun"] is True and concept.written_as == "cat cat"
    with torch.no_grad():
        e = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0][0]
    ids = pipe.tokenizer("a photo of a cat").input_ids
    i_super = e[ids.index(pipe.tokenizer("cat", add_special_tokens=False).input_ids[0])]
    for name, attn in P.cross_attention_layers(pipe.unet).items():
        torch.testing.assert_close(concept.tensors.key_targets[name], attn.to_k.weight @ i_super, rtol=1e-4, atol=1e-5)
    with Applied(pipe, [concept], C=None, C_inv=C) as applied:
        assert applied.prepare(["a mycat on grass"]) == ["a cat cat on grass"]
    plain = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(**cfg)).fit(photo_set(), workdir=tmp_path / "b")
    assert plain.written_as == "cat" and not torch.allclose(plain.tensors.i_star, concept.tensors.i_star)
    with pytest.raises(PerfusionError, match="class_noun"):
        Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(**{**cfg, "steps": 3})).fit(
            photo_set(), workdir=tmp_path / "a", resume=True)


def test_limit_norms_projects_onto_the_ball():
    """limit_norms scales a vector outside the ball back onto it, keeping its direction, and leaves one inside."""
    from perfusion_cli.training import limit_norms

    outside, inside = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    limit_norms([outside, inside], [2.5, 2.5])
    torch.testing.assert_close(outside, torch.tensor([1.5, 2.0]))    # |(3, 4)| = 5 → radius 2.5
    torch.testing.assert_close(inside, torch.tensor([0.3, 0.4]))


def test_embedding_max_ratio_holds_the_learned_embedding(tmp_path):
    """With a learning rate that would inflate it, the learned embedding ends exactly at the limit: limit × the
    median norm of the token-embedding table's rows (computed here independently)."""
    pipe = tiny_pipeline("sd1")
    C = estimate(pipe, PROMPTS)
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=1, checkpoint_every=0, templates=["a photo of a {}"],
                      lr_embedding=0.5, embedding_max_ratio=1.5)
    concept = Trainer(base_of(pipe), "mycat", "cat", inverse_covariance(C), cfg).fit(photo_set(), workdir=tmp_path)
    word = pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=1).median()
    assert float(concept.embeddings[0].norm() / word) == pytest.approx(1.5, rel=1e-4)
    assert concept.training["embedding_norm_ratio"] == pytest.approx(1.5, abs=1e-3)
    free = Trainer(base_of(pipe), "mycat", "cat", inverse_covariance(C),
                   TrainConfig(**{**cfg.__dict__, "embedding_max_ratio": None})).fit(photo_set(), workdir=tmp_path / "f")
    assert float(free.embeddings[0].norm() / word) > 1.5   # without the limit it grows past it
    from perfusion_cli.training import check_config

    with pytest.raises(PerfusionError, match="embedding_max_ratio must be a positive"):
        check_config(TrainConfig(embedding_max_ratio=0.0))


def test_lock_keys_false_trains_key_targets(tmp_path):
    """TrainConfig.lock_keys (§4): True keeps o*_K at W_K·i_super (computed here independently); False, the
    paper's ablation, starts o*_K there and trains it, and the concept carries the trained o*_K."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = dict(steps=3, batch_size=2, grad_accum=1, checkpoint_every=0, templates=["a photo of a {}"], seed=1)
    with torch.no_grad():
        e = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0][0]
    (cat,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    i_super = e[pipe.tokenizer("a photo of a cat").input_ids.index(cat)]
    locked = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(**cfg)).fit(photo_set())
    free = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(lock_keys=False, **cfg)).fit(photo_set())
    assert free.training["lock_keys"] is False and locked.training["lock_keys"] is True
    for name, attn in P.cross_attention_layers(pipe.unet).items():
        start = attn.to_k.weight @ i_super
        torch.testing.assert_close(locked.tensors.key_targets[name], start, rtol=1e-4, atol=1e-5)
        moved = (free.tensors.key_targets[name] - start).abs().max()
        assert moved > 1e-3, f"o*_K of {name} did not train ({moved})"


def test_resume_with_unlocked_keys_and_a_changed_lock(tmp_path):
    """Checkpoints keep the trained o*_K and its optimiser state: an interrupted lock_keys=False run resumes to
    the uninterrupted result; resuming it with keys locked is refused (one error, not a silent mix)."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = dict(batch_size=2, grad_accum=1, templates=["a photo of a {}"], checkpoint_every=2, seed=3, lock_keys=False)
    full = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=4, **cfg)).fit(photo_set(), workdir=tmp_path / "a")
    Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=2, **cfg)).fit(photo_set(), workdir=tmp_path / "b")
    resumed = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=4, **cfg)).fit(
        photo_set(), workdir=tmp_path / "b", resume=True)
    for name in full.tensors.key_targets:
        torch.testing.assert_close(resumed.tensors.key_targets[name], full.tensors.key_targets[name],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(resumed.tensors.value_targets[name], full.tensors.value_targets[name],
                                   rtol=1e-4, atol=1e-5)
    from perfusion_cli.errors import PerfusionError

    with pytest.raises(PerfusionError, match="lock_keys=False"):
        Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=6, **{**cfg, "lock_keys": True})).fit(
            photo_set(), workdir=tmp_path / "b", resume=True)


def test_resume_continues_from_checkpoint(tmp_path):
    """--resume: a run stopped after a checkpoint continues to the same result as an uninterrupted run."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = dict(batch_size=2, grad_accum=1, templates=["a photo of a {}"], checkpoint_every=2, seed=3)
    full = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=4, **cfg)).fit(photo_set(), workdir=tmp_path / "a")
    Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=2, **cfg)).fit(photo_set(), workdir=tmp_path / "b")
    assert (tmp_path / "b" / "checkpoint.safetensors").is_file()
    resumed = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(steps=4, **cfg)).fit(
        photo_set(), workdir=tmp_path / "b", resume=True)
    for name in full.tensors.value_targets:
        torch.testing.assert_close(resumed.tensors.value_targets[name], full.tensors.value_targets[name],
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed.embeddings[0], full.embeddings[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed.tensors.i_star, full.tensors.i_star, rtol=1e-4, atol=1e-5)


def test_attention_mask_is_soft_and_per_image(tmp_path):
    """--mask attention: one soft mask per photo in [0, 1] from the model's own cross-attention."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=1, templates=["a photo of a {}"], mask="attention",
                      checkpoint_every=0)
    trainer = Trainer(base_of(pipe), "mycat", "cat", C, cfg)
    trainer.fit(photo_set(3), workdir=tmp_path)
    m = trainer.masks
    assert m is not None and m.shape[0] == 6                        # 3 photos and their mirror images
    torch.testing.assert_close(m.mean(dim=(1, 2)), torch.ones(6))   # normalised per image (§11)
    assert (m > 0).all() and m.std() > 0


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """--low-memory recomputes activations; the trained tensors match a normal run, and it is switched off after."""
    pipe = tiny_pipeline("sd1")
    C = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = dict(steps=2, batch_size=2, grad_accum=1, templates=["a photo of a {}"], checkpoint_every=0, seed=4)
    plain = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(**cfg)).fit(photo_set(), workdir=tmp_path / "a")
    during = []
    low = Trainer(base_of(pipe), "mycat", "cat", C, TrainConfig(gradient_checkpointing=True, **cfg)).fit(
        photo_set(), workdir=tmp_path / "b",
        progress=lambda p: during.append(any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())))
    assert during == [True, True]
    for name in plain.tensors.value_targets:
        torch.testing.assert_close(low.tensors.value_targets[name], plain.tensors.value_targets[name],
                                   rtol=1e-4, atol=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_compiled_training_is_one_graph_and_learns_what_eager_learns(kind, monkeypatch):
    """TrainConfig.compile: the UNet with Perfusion's wrappers traces to one graph (no graph break, which would
    run parts eagerly), is not recompiled from step to step or by the next Trainer, and trains the same
    concept as eager mode. torch's aot_eager backend: dynamo and autograd tracing without code generation
    (inductor's kernels are torch's to test; bench speed --compile measures them on a GPU)."""
    import torch._dynamo as dynamo
    from perfusion_cli import training

    monkeypatch.setattr(training, "compiled_unet",
                        lambda unet, mode: torch.compile(unet, backend="aot_eager", dynamic=False))
    pipe = tiny_pipeline(kind)
    base = base_of(pipe)
    C_inv = inverse_covariance(estimate(pipe, PROMPTS))

    def fit(compile_: bool):
        cfg = TrainConfig(steps=3, batch_size=2, grad_accum=2, checkpoint_every=0,
                          templates=["a photo of a {}", "a {}"], compile=compile_)
        return Trainer(base, "mycat", "cat", C_inv, cfg).fit(photo_set())

    dynamo.reset()
    dynamo.utils.counters.clear()
    try:
        eager, compiled, again = fit(False), fit(True), fit(True)
        stats = dynamo.utils.counters["stats"]
        assert stats["unique_graphs"] == 1 and not dynamo.utils.counters["graph_break"]
    finally:
        dynamo.reset()
    for got in (compiled, again):
        for n, v in eager.tensors.value_targets.items():
            torch.testing.assert_close(got.tensors.value_targets[n], v, rtol=1e-4, atol=1e-5)
        for a, b in zip(got.embeddings, eager.embeddings):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(PerfusionError, match="compile-mode 'fastest'"):
        Trainer(base, "mycat", "cat", C_inv, TrainConfig(compile=True, compile_mode="fastest"))


def test_compile_mode_auto_is_cuda_graphs_on_a_cuda_device_only():
    """`auto` stands for reduce-overhead (CUDA graphs) on CUDA without gradient checkpointing, inductor's default
    elsewhere; a named mode passes through unchanged."""
    from perfusion_cli.training import COMPILE_MODES, resolve_compile_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile_mode("auto", cuda) == "reduce-overhead"
    assert resolve_compile_mode("auto", cuda, gradient_checkpointing=True) == "default"
    assert resolve_compile_mode("auto", cpu) == "default"
    assert resolve_compile_mode("auto", torch.device("mps")) == "default"
    for mode in COMPILE_MODES[1:]:
        assert resolve_compile_mode(mode, cuda) == mode == resolve_compile_mode(mode, cpu)


@pytest.mark.parametrize("mode, marks", [("reduce-overhead", 6), ("max-autotune", 6), ("default", 0), ("auto", 0)])
def test_cuda_graph_modes_mark_every_micro_step(mode, marks, monkeypatch):
    """With a CUDA-graph mode, Trainer.fit tells cudagraph trees where each micro-step begins (3 steps × 2
    accumulations here), so a replay may reuse the last step's output memory; other modes (and `auto` on a CPU,
    which is inductor's default) never call it. The compiled UNet gets the resolved mode."""
    from perfusion_cli import training

    got_modes, calls = [], []
    monkeypatch.setattr(training, "compiled_unet",
                        lambda unet, m: got_modes.append(m) or torch.compile(unet, backend="aot_eager", dynamic=False))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    pipe = tiny_pipeline("sd1")
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=2, checkpoint_every=0, templates=["a photo of a {}"],
                      compile=True, compile_mode=mode)
    Trainer(base_of(pipe), "mycat", "cat", inverse_covariance(estimate(pipe, PROMPTS)), cfg).fit(photo_set())
    assert len(calls) == marks
    assert got_modes == ["default" if mode == "auto" else mode]


def test_training_precision_rules(monkeypatch):
    """fp16 weights train under bf16 autocast on CUDA; bf16 and fp32 weights run natively; nothing autocasts on a
    CPU. `auto` trains in bf16 on a CUDA GPU that supports it (fp16 on one that does not), renders in fp16."""
    from perfusion_cli.training import training_autocast

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert training_autocast(cuda, torch.float16) == dict(device_type="cuda", dtype=torch.bfloat16, enabled=True)
    assert not training_autocast(cuda, torch.bfloat16)["enabled"]
    assert not training_autocast(cuda, torch.float32)["enabled"]
    assert not training_autocast(cpu, torch.float16)["enabled"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.pick_dtype("auto", cuda, training=True) == torch.bfloat16
    assert models.pick_dtype("auto", cuda) == torch.float16
    assert models.pick_dtype("fp16", cuda, training=True) == torch.float16
    assert models.pick_dtype("auto", cpu, training=True) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.pick_dtype("auto", cuda, training=True) == torch.float16


def test_bf16_model_trains_natively_with_fp32_trainable_tensors():
    """A bf16 frozen model (what `auto` trains in on a CUDA GPU) runs the whole step in bf16 with no autocast: it
    trains, the trainable tensors and the stored concept stay fp32, and it learns about what fp32 learns."""
    pipe = tiny_pipeline("sd1")
    C_inv = inverse_covariance(estimate(pipe, PROMPTS))
    cfg = TrainConfig(steps=4, batch_size=2, grad_accum=1, checkpoint_every=0, templates=["a photo of a {}"])
    ref = Trainer(base_of(pipe), "mycat", "cat", C_inv, cfg).fit(photo_set())
    still = dataclasses.replace(cfg, steps=1, lr_embedding=1e-12, lr_value=1e-12)   # the starting point
    init = Trainer(base_of(pipe), "mycat", "cat", C_inv, still).fit(photo_set())
    pipe.to(dtype=torch.bfloat16)
    base = models.BaseModel(pipe=pipe, id="tiny", profile=models.generic_profile(pipe), device=torch.device("cpu"),
                            dtype=torch.bfloat16)
    trainer = Trainer(base, "mycat", "cat", C_inv, cfg)
    assert not trainer.autocast["enabled"]
    got = trainer.fit(photo_set())
    assert pipe.unet.dtype == torch.bfloat16                     # the frozen model was not converted
    for n, v in got.tensors.value_targets.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        # bf16's 8-bit mantissa: the same steps land near fp32's (measured: within 8-16% of what fp32 learned)
        ref_v, v0 = ref.tensors.value_targets[n], init.tensors.value_targets[n]
        assert (ref_v - v0).norm() > 0.05 * v0.norm()          # 4 steps learn something to compare
        assert (v - ref_v).norm() <= 0.3 * (ref_v - v0).norm(), n
    for a, b, a0 in zip(got.embeddings, ref.embeddings, init.embeddings):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.3 * (b - a0).norm()
    assert math.isfinite(got.training["final_loss"])
