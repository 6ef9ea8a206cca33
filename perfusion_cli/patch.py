"""Put Perfusion edits onto a diffusers UNet and take them off again.

Every cross-attention block (diffusers: each `attn2`) has two projections from text encodings,
`to_k` and `to_v`. We never replace them: a forward hook adds edit.LayerEdit.delta(e) to each
one's output, so the UNet's modules, parameters and state dict stay untouched and removing the
hooks restores the original pipeline bit for bit. Any bias of to_k/to_v (SD 2.x/SDXL variants) stays
outside the edit: the rank-1 edit acts on the linear part W e (PERFUSION.md §2, §11).

Global locking (§4, a render option): the K path sees the prompt with the supercategory word in
place of the concept, the V path the prompt with the concept. A pre-hook on the UNet maps each row of
`encoder_hidden_states` that is a known concept-prompt encoding to its supercategory twin; a
pre-hook on each to_k feeds that twin in, and the K edit is left off (the K path then *is* the
supercategory's).

Knows diffusers' module layout; knows nothing of files or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .edit import ConceptInputs, ConceptTensors, LayerEdit, concept_inputs, layer_edit


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Module path -> attention block, for every block whose K/V read the text encodings."""
    layers = {}
    for name, m in unet.named_modules():
        if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k") and hasattr(m, "to_v"):
            layers[name] = m
    return layers


def layer_widths(unet: nn.Module) -> list[tuple[str, int]]:
    """[(layer name, output width m)] in UNet order: what a concept for this UNet must cover."""
    return [(n, int(a.to_v.weight.shape[0])) for n, a in cross_attention_layers(unet).items()]


def projection_weight(proj: nn.Module) -> Tensor:
    """W of a to_k/to_v projection (a plain nn.Linear, or a wrapper exposing .weight / .base_layer)."""
    if hasattr(proj, "weight"):
        return proj.weight
    return proj.base_layer.weight


@dataclass
class KeySwap:
    """Global locking: rows of encoder_hidden_states equal to `concept` are keyed by `super_`."""

    concept: Tensor   # (L, d) encoding of a prompt with its concepts
    super_: Tensor    # (L, d) the same prompt with each concept replaced by its supercategory word


@dataclass
class Patch:
    """The hooks of one application of edits; `remove()` restores the UNet exactly."""

    unet: nn.Module
    edits: dict[str, tuple[LayerEdit | None, LayerEdit]] = field(default_factory=dict)  # layer -> (K, V)
    key_swaps: list[KeySwap] = field(default_factory=list)
    handles: list = field(default_factory=list)
    _key_context: Tensor | None = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.edits.clear()
        self._key_context = None

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- global locking -------------------------------------------------------------------
    def _find_key_context(self, ehs: Tensor) -> Tensor | None:
        if not self.key_swaps:
            return None
        out, hit = ehs.clone(), False
        for swap in self.key_swaps:
            c = swap.concept.to(ehs.device, ehs.dtype)
            if c.shape != ehs.shape[1:]:
                continue
            tol = 1e-3 * float(c.abs().max()) + 1e-6
            rows = (ehs - c).abs().flatten(1).amax(1) <= tol
            if rows.any():
                out[rows] = swap.super_.to(ehs.device, ehs.dtype)
                hit = True
        return out if hit else None


def attach(unet: nn.Module) -> Patch:
    """Install the (initially empty) hooks. Edits are set in `patch.edits` by `apply` or a trainer."""
    patch = Patch(unet)

    def unet_pre(module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        patch._key_context = patch._find_key_context(ehs) if ehs is not None else None

    patch.handles.append(unet.register_forward_pre_hook(unet_pre, with_kwargs=True))

    for name, attn in cross_attention_layers(unet).items():

        def k_pre(module, args, name=name):
            kc = patch._key_context
            if kc is not None and args and args[0].shape == kc.shape:
                return (kc.to(args[0].dtype),) + tuple(args[1:])
            return None

        def k_post(module, args, output, name=name):
            edit = patch.edits.get(name, (None, None))[0]
            if edit is None or patch._key_context is not None:
                return output
            return output + edit.delta(args[0])

        def v_post(module, args, output, name=name):
            edit = patch.edits.get(name, (None, None))[1]
            return output if edit is None else output + edit.delta(args[0])

        patch.handles.append(attn.to_k.register_forward_pre_hook(k_pre))
        patch.handles.append(attn.to_k.register_forward_hook(k_post))
        patch.handles.append(attn.to_v.register_forward_hook(v_post))
    return patch


def build_edits(
    unet: nn.Module,
    inputs: ConceptInputs,
    key_targets: list[dict[str, Tensor]],
    value_targets: list[dict[str, Tensor]],
) -> dict[str, tuple[LayerEdit, LayerEdit]]:
    """LayerEdits for every cross-attention layer: concept c's o* in layer l is targets[c][l]."""
    edits = {}
    for name, attn in cross_attention_layers(unet).items():
        dev = projection_weight(attn.to_v).device
        ok = torch.stack([t[name].to(dev) for t in key_targets])    # (n, m)
        ov = torch.stack([t[name].to(dev) for t in value_targets])  # (n, m)
        edits[name] = (
            layer_edit(projection_weight(attn.to_k), inputs, ok),
            layer_edit(projection_weight(attn.to_v), inputs, ov),
        )
    return edits


def check_layers(unet: nn.Module, concept: ConceptTensors, label: str) -> None:
    """Raise ValueError naming the first layer of `concept` that this UNet does not have as stored."""
    have = dict(layer_widths(unet))
    for name, t in concept.value_targets.items():
        if have.get(name) != t.numel():
            raise ValueError(
                f"concept {label!r} edits layer {name} (width {t.numel()}) which this UNet "
                f"{'lacks' if name not in have else f'has with width {have[name]}'}"
            )
    if len(have) != len(concept.value_targets):
        raise ValueError(f"concept {label!r} covers {len(concept.value_targets)} layers, this UNet has {len(have)}")


def apply(
    unet: nn.Module,
    concepts: list[ConceptTensors],
    C_inv: Tensor,
    exact: bool = True,
    betas: list[float] | None = None,
    taus: list[float] | None = None,
    labels: list[str] | None = None,
) -> Patch:
    """Apply one or several concepts to a UNet (§2, §8); each keeps its own β, τ.

    `betas`/`taus` override the concepts' stored defaults. Returns a Patch; `patch.remove()` (or a
    `with` block) takes the edits off again.
    """
    labels = labels or [f"#{i}" for i in range(len(concepts))]
    for c, label in zip(concepts, labels):
        check_layers(unet, c, label)
    dev = next(unet.parameters()).device
    betas = betas if betas is not None else [c.beta for c in concepts]
    taus = taus if taus is not None else [c.tau for c in concepts]
    i_stars = torch.stack([c.i_star.to(dev) for c in concepts])
    inputs = concept_inputs(i_stars, C_inv, betas, taus, exact=exact)
    patch = attach(unet)
    patch.edits.update(build_edits(
        unet, inputs, [c.key_targets for c in concepts], [c.value_targets for c in concepts]
    ))
    return patch
