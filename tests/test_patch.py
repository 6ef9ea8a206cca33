"""Edits on real diffusers UNets: the hooks compute PERFUSION.md §2/§8, and removal is exact."""

from __future__ import annotations

import torch
import pytest

from perfusion_cli import patch as P
from perfusion_cli.edit import ConceptTensors, inverse_covariance
from perfusion_cli.text import EmbeddingOverride, encode, rewrite, slots_for, text_stack, written_as
from tiny_pipelines import TEXT_WIDTH, tiny_pipeline


def random_concept(unet, d: int, seed: int, beta=0.7, tau=0.15) -> ConceptTensors:
    g = torch.Generator().manual_seed(seed)
    widths = P.layer_widths(unet)
    return ConceptTensors(
        i_star=torch.randn(d, generator=g),
        key_targets={n: torch.randn(w, generator=g) for n, w in widths},
        value_targets={n: torch.randn(w, generator=g) for n, w in widths},
        beta=beta, tau=tau,
    )


def random_cov(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return X.T @ X / (4 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


def unet_out(pipe, ehs, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    kw = {}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ehs, **kw).sample


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_apply_then_remove_is_bit_identical(kind):
    """Installing and removing edits leaves the pipeline bit-identical (outputs, state dict, hooks)."""
    pipe = tiny_pipeline(kind)
    d = TEXT_WIDTH[kind]
    ehs = torch.randn(2, 12, d, generator=torch.Generator().manual_seed(1))
    before = unet_out(pipe, ehs)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    concept = random_concept(pipe.unet, d, 2)
    # make the concept fire on token 3 so the edit is visible
    ehs[:, 3] = concept.i_star
    before = unet_out(pipe, ehs)
    patch = P.apply(pipe.unet, [concept], inverse_covariance(random_cov(d)))
    during = unet_out(pipe, ehs)
    assert not torch.allclose(during, before), "the edit must change the output"
    patch.remove()
    after = unet_out(pipe, ehs)
    assert torch.equal(after, before)
    assert state.keys() == pipe.unet.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in pipe.unet.state_dict().items())
    for m in pipe.unet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_hooked_projection_matches_closed_form():
    """to_v with the hook = W e − s(e)·W i* + σ((s(e)−β)/τ)·o*, at every token (§2)."""
    pipe = tiny_pipeline("sd1")
    d = TEXT_WIDTH["sd1"]
    C = random_cov(d, 3)
    Ci = torch.linalg.inv(C)
    concept = random_concept(pipe.unet, d, 4, beta=0.6, tau=0.2)
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    e = torch.randn(1, 7, d, dtype=torch.float64)
    e[0, 2] = concept.i_star.double()
    i = concept.i_star.double()
    E = i @ Ci @ i
    s = (e @ Ci @ i) / E                                            # (1, 7)
    gate = torch.sigmoid((s - 0.6) / 0.2)
    for proj, o in ((attn.to_v, concept.value_targets[name]), (attn.to_k, concept.key_targets[name])):
        W = proj.weight.double()
        expected = e @ W.T - s[..., None] * (W @ i) + gate[..., None] * o.double()
        with P.apply(pipe.unet, [concept], inverse_covariance(C, ridge=0.0)):
            got = proj(e.float())
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.isclose(s[0, 2], torch.tensor(1.0, dtype=torch.float64))


def test_linear_gate_in_a_real_layer_is_rome():
    """apply(linear_gates=[True]): to_k/to_v become ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/E, built explicitly."""
    pipe = tiny_pipeline("sd1")
    d = TEXT_WIDTH["sd1"]
    C = random_cov(d, 8)
    Ci = torch.linalg.inv(C)
    concept = random_concept(pipe.unet, d, 9)
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    e = torch.randn(6, d, dtype=torch.float64)
    i = concept.i_star.double()
    for proj, o in ((attn.to_v, concept.value_targets[name]), (attn.to_k, concept.key_targets[name])):
        W = proj.weight.double()
        W_rome = W + torch.outer(o.double() - W @ i, Ci @ i) / (i @ Ci @ i)
        with P.apply(pipe.unet, [concept], inverse_covariance(C, ridge=0.0), linear_gates=[True]):
            got = proj(e.float())
        torch.testing.assert_close(got.double(), e @ W_rome.T, rtol=1e-4, atol=1e-4)
        with P.apply(pipe.unet, [concept], inverse_covariance(C, ridge=0.0), linear_gates=[False]):
            assert not torch.allclose(proj(e.float()).double(), e @ W_rome.T, atol=1e-2)


def test_two_concepts_exact_each_with_own_gate():
    """Two concepts, exact form: h = W e⊥ + Σ σ((s_c − β_c)/τ_c) o*_c (§8), checked in a real layer."""
    pipe = tiny_pipeline("sd1")
    d = TEXT_WIDTH["sd1"]
    C = random_cov(d, 5)
    Ci = torch.linalg.inv(C)
    a, b = random_concept(pipe.unet, d, 6, 0.5, 0.1), random_concept(pipe.unet, d, 7, 0.8, 0.3)
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    e = torch.randn(5, d, dtype=torch.float64)
    I = torch.stack([a.i_star, b.i_star]).double()                 # (2, d)
    G = I @ Ci @ I.T
    e_perp = e - (e @ Ci @ I.T) @ torch.linalg.inv(G) @ I          # remove span{i*} in the C⁻¹ metric
    W = attn.to_v.weight.double()
    expected = e_perp @ W.T
    for c, beta, tau in ((a, 0.5, 0.1), (b, 0.8, 0.3)):
        i = c.i_star.double()
        s = (e @ Ci @ i) / (i @ Ci @ i)
        expected = expected + torch.sigmoid((s - beta) / tau)[:, None] * c.value_targets[name].double()
    with P.apply(pipe.unet, [a, b], inverse_covariance(C, ridge=0.0), exact=True):
        got = attn.to_v(e.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_layer_check_refuses_other_unet():
    """A concept made for another UNet's layers is refused with the layer named."""
    sd1, sdxl = tiny_pipeline("sd1"), tiny_pipeline("sdxl")
    concept = random_concept(sd1.unet, TEXT_WIDTH["sd1"], 0)
    with pytest.raises(ValueError, match="layer|layers"):
        P.apply(sdxl.unet, [concept], torch.eye(TEXT_WIDTH["sdxl"], dtype=torch.float64))


def test_global_lock_feeds_keys_the_supercategory_prompt():
    """With a KeySwap, to_k computes W_K·e_super (no K edit) and to_v reads the concept encoding (§4)."""
    pipe = tiny_pipeline("sd1")
    d = TEXT_WIDTH["sd1"]
    concept = random_concept(pipe.unet, d, 8)
    g = torch.Generator().manual_seed(9)
    e_concept, e_super, other = (torch.randn(12, d, generator=g) for _ in range(3))
    seen = {}
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    hk = attn.to_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o.clone()))
    hv = attn.to_v.register_forward_hook(lambda m, a, o: seen.__setitem__("v", a[0].clone()))
    try:
        with P.apply(pipe.unet, [concept], torch.eye(d, dtype=torch.float64)) as patch:
            patch.key_swaps.append(P.KeySwap(e_concept, e_super))
            unet_out(pipe, torch.stack([other, e_concept]))        # CFG-like batch: [uncond, cond]
            k_edit = patch.edits[name][0]
    finally:
        hk.remove()
        hv.remove()
    W = attn.to_k.weight
    torch.testing.assert_close(seen["k"][1], e_super @ W.T)                          # K: supercategory prompt
    torch.testing.assert_close(seen["k"][0], other @ W.T + k_edit.delta(other))      # other rows: as usual
    torch.testing.assert_close(seen["v"][1], e_concept)                              # V: the concept prompt


def test_kv_cache_reuses_outputs_and_is_exact():
    """With cache=True each projection runs once per encoder_hidden_states tensor; results are unchanged."""
    pipe = tiny_pipeline("sd1")
    d = TEXT_WIDTH["sd1"]
    concept = random_concept(pipe.unet, d, 10)
    ehs = torch.randn(2, 12, d, generator=torch.Generator().manual_seed(11))
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    calls = []
    cls_forward = type(attn.to_v).forward
    attn.to_v.forward = lambda e: (calls.append(1), cls_forward(attn.to_v, e))[1]   # counts real projections
    try:
        with P.apply(pipe.unet, [concept], torch.eye(d, dtype=torch.float64)):
            uncached = [unet_out(pipe, ehs, seed=s) for s in (0, 1)]
        n_uncached, calls[:] = len(calls), []
        with P.apply(pipe.unet, [concept], torch.eye(d, dtype=torch.float64), cache=True) as patch:
            cached = [unet_out(pipe, ehs, seed=s) for s in (0, 1)]
            assert len(calls) == 1                                   # the second step reused the first's
            assert len(patch._memo) == 2 * len(P.cross_attention_layers(pipe.unet))
            ehs.add_(0)                                             # in-place change: version bump
            recomputed = unet_out(pipe, ehs, seed=0)
            assert len(calls) == 2
        assert attn.to_v.__dict__["forward"] is not None            # the earlier instance forward is back
    finally:
        del attn.to_v.forward
    for a, b in zip(uncached, cached):
        assert torch.equal(a, b)
    assert torch.equal(recomputed, cached[0])
    assert n_uncached == 2
    assert "forward" not in attn.to_v.__dict__                      # wrappers gone after removal


def test_rewrite_is_whole_word_and_case_insensitive():
    assert rewrite("a MyCat and mycats, mycat.", {"mycat": "cat"}) == "a cat and mycats, cat."


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_slots_and_embedding_override(kind):
    """The concept's embedding replaces the supercategory token's at exactly the concept's positions."""
    pipe = tiny_pipeline(kind)
    prompt = "a mycat and a cat near mycat"
    tok = pipe.tokenizer
    (slot,) = slots_for(tok, prompt, {"mycat": "cat"})
    ids = slot.ids.tolist()
    (cat_id,) = tok("cat", add_special_tokens=False).input_ids
    cat_positions = [i for i, t in enumerate(ids) if t == cat_id]
    assert len(cat_positions) == 3                                  # 2 from the concept, 1 real "cat"
    assert slot.mask.nonzero().flatten().tolist() == [cat_positions[0], cat_positions[2]]

    captured = []
    emb = pipe.text_encoder.get_input_embeddings()
    vectors = [torch.full((enc.get_input_embeddings().embedding_dim,), 7.0)
               for _, enc in [(pipe.tokenizer, pipe.text_encoder)] + (
                   [(pipe.tokenizer_2, pipe.text_encoder_2)] if kind == "sdxl" else [])]
    with EmbeddingOverride(pipe) as ov:
        ov.set_concepts([vectors])
        ov.add_prompt(prompt, {"mycat": "cat"})
        h = emb.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
        try:
            with torch.no_grad():
                with_concept = encode(pipe, [rewrite(prompt, {"mycat": "cat"})]).embeds
        finally:
            h.remove()
    out = captured[0][0]
    assert torch.all(out[slot.mask] == 7.0)
    assert not torch.any(out[~slot.mask] == 7.0)
    with torch.no_grad():
        plain = encode(pipe, [rewrite(prompt, {"mycat": "cat"})]).embeds
    first = cat_positions[0]
    assert torch.equal(with_concept[0, :first], plain[0, :first])   # causal encoder: before is unchanged
    assert not torch.allclose(with_concept[0, first], plain[0, first])


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_a_kept_class_noun_stays_itself(kind):
    """A concept written with its class noun kept ("a [V] cat": DreamBooth's prompt form) gets its embedding at the
    first of its two words only; the class noun after it is the plain word, in every tokenizer."""
    pipe = tiny_pipeline(kind)
    prompt = "a mycat and a cat near mycat"
    words = {"mycat": written_as("cat", class_noun=True)}
    assert words["mycat"] == "cat cat" and written_as("cat") == "cat"
    assert rewrite(prompt, words) == "a cat cat and a cat near cat cat"
    stack = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if kind == "sdxl" else [])
    for tok, _ in stack:
        (slot,) = slots_for(tok, prompt, words)
        (cat_id,) = tok("cat", add_special_tokens=False).input_ids
        cats = [i for i, t in enumerate(slot.ids.tolist()) if t == cat_id]
        assert len(cats) == 5                          # [V] cat (2), the real cat, [V] cat (2)
        assert slot.mask.nonzero().flatten().tolist() == [cats[0], cats[3]]

    captured = []
    vectors = [torch.full((enc.get_input_embeddings().embedding_dim,), 7.0) for _, enc in stack]
    emb = pipe.text_encoder.get_input_embeddings()
    with EmbeddingOverride(pipe) as ov:
        ov.set_concepts([vectors])
        ov.add_prompt(prompt, words)
        h = emb.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
        try:
            with torch.no_grad():
                encode(pipe, [rewrite(prompt, words)])
        finally:
            h.remove()
    (slot,) = slots_for(pipe.tokenizer, prompt, words)
    out = captured[0][0]
    assert torch.all(out[slot.mask] == 7.0) and not torch.any(out[~slot.mask] == 7.0)
    (cat_id,) = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    with torch.no_grad():
        cat_row = emb(torch.tensor([cat_id]))[0]
    for i in (1 + slot.mask.nonzero().flatten()).tolist():   # the word after each [V]: the class noun itself
        torch.testing.assert_close(out[i], cat_row)


@pytest.mark.parametrize("kind, n, exact", [("sd1", 1, True), ("sd1", 2, True), ("sd1", 2, False), ("sdxl", 1, True)])
def test_stacked_edit_equals_per_layer_edits(kind, n, exact):
    """The training loop's StackedEdit (every layer's K and V edit as one matrix product) computes the same
    UNet output and the same gradients for o*_V and the encodings as the per-layer LayerEdits it replaces."""
    from perfusion_cli.edit import concept_inputs

    pipe = tiny_pipeline(kind)
    unet = pipe.unet
    d = TEXT_WIDTH[kind]
    C_inv = inverse_covariance(random_cov(d))
    concepts = [random_concept(unet, d, 10 + c) for c in range(n)]
    g = torch.Generator().manual_seed(4)
    ehs0 = torch.randn(2, 12, d, generator=g)
    for c, concept in enumerate(concepts):
        ehs0[:, 3 + c] = concept.i_star  # each concept fires somewhere
    inputs = concept_inputs(torch.stack([c.i_star for c in concepts]), C_inv, [0.7] * n, [0.15] * n, exact=exact)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    kw = {}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6)}

    def run(stacked: bool):
        values = [{k: v.clone().requires_grad_(True) for k, v in c.value_targets.items()} for c in concepts]
        keys = [c.key_targets for c in concepts]
        ehs = ehs0.clone().requires_grad_(True)
        patch = P.attach(unet)
        try:
            if stacked:
                W, slices = P.stack_weights(unet)
                patch.set_stacked(P.build_stacked(W, slices, inputs, keys, values))
                patch.prime_stacked(ehs)
            else:
                patch.edits.update(P.build_edits(unet, inputs, keys, values))
            out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=ehs, **kw).sample
            out.square().mean().backward()
        finally:
            patch.remove()
        return out.detach(), ehs.grad, [{k: v.grad for k, v in vs.items()} for vs in values]

    ref_out, ref_e, ref_v = run(False)
    out, e_grad, v_grads = run(True)
    assert not torch.allclose(ref_out, unet_out(pipe, ehs0)), "the edit must act"
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e_grad, ref_e, rtol=1e-4, atol=1e-6)
    for got, want in zip(v_grads, ref_v):
        assert got.keys() == want.keys()
        for k in want:
            assert want[k].abs().sum() > 0
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)


def test_stacked_edit_is_primed_per_input_and_dropped_on_removal():
    pipe = tiny_pipeline("sd1")
    unet, d = pipe.unet, TEXT_WIDTH["sd1"]
    concept = random_concept(unet, d, 3)
    from perfusion_cli.edit import concept_inputs

    inputs = concept_inputs(concept.i_star[None], inverse_covariance(random_cov(d)), [0.7], [0.15])
    W, slices = P.stack_weights(unet)
    assert W.shape == (sum(b - a for a, b in slices.values()), d) and W.dtype == torch.float32
    assert len(slices) == 2 * len(P.cross_attention_layers(unet))
    patch = P.attach(unet)
    stacked = P.build_stacked(W, slices, inputs, [concept.key_targets], [concept.value_targets])
    patch.set_stacked(stacked)
    ehs = torch.randn(2, 12, d)
    ehs[:, 3] = concept.i_star
    with pytest.raises(RuntimeError, match="prime_stacked"):   # never silently unedited
        unet_out(pipe, ehs)
    patch.prime_stacked(ehs)
    first = unet_out(pipe, ehs)
    ehs2 = ehs.clone()
    ehs2[:, 5] = concept.i_star
    patch.prime_stacked(ehs2)  # new encodings, new deltas
    second = unet_out(pipe, ehs2)
    assert not torch.allclose(first, second)
    with pytest.raises(RuntimeError, match="primed for encodings of shape"):
        unet_out(pipe, torch.randn(2, 7, d))  # not the primed encodings: an error, not a wrong edit
    patch.set_stacked(None)
    assert patch._primed is None
    with P.attach(unet) as per_layer:  # the same numbers as per-layer LayerEdits
        per_layer.edits.update(P.build_edits(unet, inputs, [concept.key_targets], [concept.value_targets]))
        torch.testing.assert_close(unet_out(pipe, ehs2), second, rtol=1e-4, atol=1e-5)
    patch.set_stacked(stacked)
    patch.prime_stacked(ehs)
    patch.remove()
    assert patch.stacked is None and patch._primed is None
    plain = unet_out(pipe, ehs)
    assert not torch.allclose(plain, first)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_word_scope_edits_only_the_concept_tokens(kind):
    """Gate.scope "word" (PERFUSION.md §11c) through a real pipeline call with CFG: in the prompt's row, to_v's
    output is W e + delta(e) at the concept word's token and W e at every other token; the negative prompt's row is
    W e throughout. With the paper's scope ("prompt") every token of both rows gets delta(e)."""
    from perfusion_cli.concept import Concept
    from perfusion_cli.rendering import Applied, Gate

    pipe = tiny_pipeline(kind)
    d = TEXT_WIDTH[kind]
    tensors = random_concept(pipe.unet, d, 12, beta=0.0, tau=0.5)      # β 0: the gate is open on most tokens
    concept = Concept(name="mycat", supercategory="cat", tensors=tensors,
                      embeddings=[torch.randn(enc.get_input_embeddings().weight.shape[1],
                                              generator=torch.Generator().manual_seed(13))
                                  for _, enc in text_stack(pipe)])
    C = random_cov(d)
    name, attn = next(iter(P.cross_attention_layers(pipe.unet).items()))
    seen = []
    hv = attn.to_v.register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), o.clone())))
    ids = pipe.tokenizer("a cat on grass").input_ids
    at = ids.index(pipe.tokenizer("cat", add_special_tokens=False).input_ids[0])
    results = {}
    try:
        for scope in ("prompt", "word"):
            seen.clear()
            with Applied(pipe, [concept], C, gates={"mycat": Gate(0.0, 0.5, scope=scope)}) as ap, torch.no_grad():
                ap(["a mycat on grass"], num_inference_steps=1, height=16, width=16, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="np")
                edit_v = ap.patch.edits[name][1]
            e, out = seen[0]                     # the first (cached) call: rows [negative, prompt]
            results[scope] = (e, out, edit_v)
    finally:
        hv.remove()
    W = attn.to_v.weight
    e, out, edit_v = results["word"]
    plain = e @ W.T
    full = plain + edit_v.delta(e)
    torch.testing.assert_close(out[0], plain[0])                           # negative prompt: untouched
    torch.testing.assert_close(out[1, at], full[1, at])                    # the concept's token: edited
    others = [t for t in range(e.shape[1]) if t != at]
    torch.testing.assert_close(out[1, others], plain[1, others])           # every other token: untouched
    assert (full[1, others] - plain[1, others]).abs().max() > 1e-3         # (where the paper's edit acts)
    e, out, edit_v = results["prompt"]
    torch.testing.assert_close(out, e @ W.T + edit_v.delta(e))


def test_word_scope_training_differs_and_is_recorded(tmp_path):
    """TrainConfig.gate_scope "word" trains through the scoped edit: o*_V learns something else than with the
    paper's scope from the same seed, and the concept records the scope it was trained with."""
    from perfusion_cli.covariance import estimate
    from perfusion_cli.images import PhotoSet
    from perfusion_cli.training import Trainer, TrainConfig
    from perfusion_cli import models
    from tiny_pipelines import IMAGE_SIZE

    pipe = tiny_pipeline("sd1")
    C = estimate(pipe, ["a cat on grass", "a red car", "a dog in the snow", "two blue boxes"] * 6)
    photos = PhotoSet(pixels=torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                      paths=[tmp_path / "a.png", tmp_path / "b.png"])
    base = models.BaseModel(pipe=pipe, id="tiny", profile=models.generic_profile(pipe), device=torch.device("cpu"),
                            dtype=torch.float32)
    got = {}
    for scope in ("prompt", "word"):
        cfg = TrainConfig(steps=3, batch_size=2, grad_accum=1, checkpoint_every=0, templates=["a photo of a {} on grass"],
                          gate_scope=scope)
        got[scope] = Trainer(base, "mycat", "cat", inverse_covariance(C), cfg).fit(photos)
    name = next(iter(got["word"].tensors.value_targets))
    assert got["word"].training["gate_scope"] == "word" and got["prompt"].training["gate_scope"] == "prompt"
    assert not torch.allclose(got["word"].tensors.value_targets[name], got["prompt"].tensors.value_targets[name])
