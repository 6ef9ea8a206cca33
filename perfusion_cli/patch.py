"""Put Perfusion edits onto a diffusers UNet and take them off again.

Every cross-attention block (diffusers: each `attn2`) has two projections from text encodings,
`to_k` and `to_v`. We never replace them: each gets an instance-level `forward` wrapper that adds
edit.LayerEdit.delta(e) to the projection's own output, so the UNet's modules, parameters and state
dict stay untouched and removing the wrappers restores the original pipeline bit for bit (an
instance-level forward that was there before, e.g. accelerate's offloading, is put back). Any bias of
to_k/to_v (SD 2.x/SDXL variants) stays outside the edit: the rank-1 edit acts on W e (§2, §11).

Global locking (§4, a render option): the K path sees the prompt with the supercategory word in
place of the concept, the V path the prompt with the concept. A pre-hook on the UNet maps each row of
`encoder_hidden_states` that is a known concept-prompt encoding to its supercategory twin; to_k reads
that twin, and the K edit is left off (the K path then *is* the supercategory's).

Token scope (a render and training option, PERFUSION.md §11c): concepts whose edit is confined to their own
word's tokens. The pre-hook maps each row of `encoder_hidden_states` that is a registered prompt encoding to that
prompt's (L, n) scope (1 at concept c's tokens); rows it does not know (the negative prompt) take `scope_default`
(1 for concepts the paper's way, 0 for scoped ones). The wrappers pass the batch's scope to the edit.

K/V cache (rendering): the text encodings are the same tensor at every denoising step, so with
`patch.cache = True` each projection's edited output is computed once per render and reused. The
cache holds a reference to its input (so its memory cannot be reused by another tensor) and checks
the tensor's identity and version counter; `clear_cache()` drops it.

Knows diffusers' module layout; knows nothing of files or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .edit import ConceptInputs, ConceptTensors, LayerEdit, StackedEdit, concept_inputs, layer_edit, stacked_edit


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
class TokenScope:
    """Scoped edits: rows of encoder_hidden_states equal to `encoding` get `scope`."""

    encoding: Tensor  # (L, d) encoding of a prompt with its concepts
    scope: Tensor     # (L, n) 1 where concept c's edit acts on that prompt's token, else 0


def matching_rows(ehs: Tensor, encoding: Tensor) -> Tensor:
    """(B,) bool: the rows of ehs (B, L, d) that are `encoding` (L, d), to a tolerance that survives the
    pipeline's copies and casts (it concatenates, repeats and may change the dtype of the encodings)."""
    c = encoding.to(ehs.device, ehs.dtype)
    if c.shape != ehs.shape[1:]:
        return torch.zeros(ehs.shape[0], dtype=torch.bool, device=ehs.device)
    tol = 1e-3 * float(c.abs().max()) + 1e-6
    return (ehs - c).abs().flatten(1).amax(1) <= tol


@dataclass
class Patch:
    """One application of edits (and/or the K/V cache); `remove()` restores the UNet exactly."""

    unet: nn.Module
    edits: dict[str, tuple[LayerEdit | None, LayerEdit]] = field(default_factory=dict)  # layer -> (K, V)
    key_swaps: list[KeySwap] = field(default_factory=list)
    cache: bool = False
    handles: list = field(default_factory=list)
    wrapped: list = field(default_factory=list)   # (projection, its previous instance-level forward)
    _key_context: tuple | None = None             # (key context, swapped rows) during a UNet call
    _key_memo: tuple | None = None                # (encoder_hidden_states, version, key context)
    _memo: dict = field(default_factory=dict)     # (layer, "k"|"v") -> (input, version, output)
    stacked: StackedEdit | None = None            # every projection's edit in one (training); see set_stacked
    _primed: dict | None = None                   # (layer, "k"|"v") -> that projection's delta; see prime_stacked
    scopes: list[TokenScope] = field(default_factory=list)
    scope_default: Tensor | None = None           # (n,) scope of unregistered rows; None: no concept is scoped
    _scope: Tensor | None = None                  # (B, L, n) the scope of the current UNet call
    _scope_memo: tuple | None = None              # (encoder_hidden_states, version, scope)

    def set_stacked(self, stacked: StackedEdit | None) -> None:
        """Edit every projection named in stacked.slices with one StackedEdit (instead of `edits`).
        Its deltas are computed by prime_stacked, before each UNet call."""
        self.stacked = stacked
        self._primed = None

    def prime_stacked(self, x: Tensor, scope: Tensor | None = None) -> None:
        """Compute every stacked projection's delta for the encodings `x` now, which the following UNet call(s)
        must pass as encoder_hidden_states (until the next prime or set_stacked). scope: (B, L, n) token scope
        (edit.scoped_delta), None for the paper's edit.

        All cross-attention layers read the same encodings, so delta_all is one computation split among them
        (one split: its backward is one concatenation). Done outside the UNet: a block that gradient
        checkpointing recomputes does the same operations both times, and inside the UNet a projection only
        looks its delta up in a dict, which torch.compile traces into one graph (an identity or version check
        of `x` there would break it)."""
        keys = list(self.stacked.slices)
        sizes = [self.stacked.slices[k][1] - self.stacked.slices[k][0] for k in keys]
        self._primed = dict(zip(keys, self.stacked.delta_all(x, scope).split(sizes, dim=-1)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        restore_forwards(self.wrapped)
        self.handles.clear()
        self.edits.clear()
        self.set_stacked(None)
        self.scopes.clear()
        self.scope_default = None
        self.clear_cache()

    def clear_cache(self) -> None:
        self._memo.clear()
        self._key_memo = None
        self._key_context = None
        self._scope_memo = None
        self._scope = None

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- global locking -------------------------------------------------------------------
    def _find_key_context(self, ehs: Tensor) -> Tensor | None:
        if not self.key_swaps:
            return None
        if self.cache and self._key_memo and self._key_memo[0] is ehs and self._key_memo[1] == ehs._version:
            return self._key_memo[2]
        out = ehs.clone()
        swapped = torch.zeros(ehs.shape[0], dtype=torch.bool, device=ehs.device)
        for swap in self.key_swaps:
            rows = matching_rows(ehs, swap.concept)
            if rows.any():
                out[rows] = swap.super_.to(ehs.device, ehs.dtype)
                swapped |= rows
        out = (out, swapped) if swapped.any() else None
        if self.cache:
            self._key_memo = (ehs, ehs._version, out)
        return out

    # -- token scope --------------------------------------------------------------------------
    def _find_scope(self, ehs: Tensor) -> Tensor | None:
        """(B, L, n) scope of this batch of encodings (the registered prompts' scopes, scope_default elsewhere)."""
        if self.scope_default is None:
            return None
        if self.cache and self._scope_memo and self._scope_memo[0] is ehs and self._scope_memo[1] == ehs._version:
            return self._scope_memo[2]
        d = self.scope_default.to(ehs.device, torch.float32)
        out = d.expand(ehs.shape[0], ehs.shape[1], d.shape[0]).clone()
        for ts in self.scopes:
            rows = matching_rows(ehs, ts.encoding)
            if rows.any():
                out[rows] = ts.scope.to(ehs.device, torch.float32)
        if self.cache:
            self._scope_memo = (ehs, ehs._version, out)
        return out

    # -- the edited projection ------------------------------------------------------------
    def _wrap(self, proj: nn.Module, name: str, which: str) -> None:
        inner = proj.forward                       # bound: the class's, or a wrapper already there
        slot = 0 if which == "k" else 1

        def forward(e: Tensor, *args, **kwargs) -> Tensor:
            x, keep = e, None
            if which == "k" and self._key_context is not None and e.shape == self._key_context[0].shape:
                # global locking: swapped rows read the supercategory prompt, with no K edit
                x, keep = self._key_context[0].to(e.dtype), ~self._key_context[1]
            if self.cache:
                hit = self._memo.get((name, which))
                if hit is not None and hit[0] is x and hit[1] == x._version:
                    return hit[2]
            out = inner(x, *args, **kwargs)
            delta = None
            primed = self._primed
            if primed is not None and (name, which) in primed:
                delta = primed[(name, which)]
                if delta.shape[:-1] != x.shape[:-1]:
                    raise RuntimeError(f"{name}.to_{which}: the stacked edit was primed for encodings of shape "
                                       f"{tuple(delta.shape[:-1])}, the UNet got {tuple(x.shape[:-1])}")
            elif self.stacked is not None and (name, which) in self.stacked.slices:
                raise RuntimeError("a stacked edit is set: call patch.prime_stacked(encoder_hidden_states) "
                                   "before the UNet")
            else:
                edit = self.edits.get(name, (None, None))[slot]
                if edit is not None:
                    scope = self._scope
                    if scope is not None and scope.shape[:2] != x.shape[:2]:
                        raise RuntimeError(f"{name}.to_{which}: the token scope is for encodings of shape "
                                           f"{tuple(scope.shape[:2])}, the projection got {tuple(x.shape[:2])}")
                    delta = edit.delta(x, scope)
            if delta is not None:
                out = out + (delta if keep is None else delta * keep.view(-1, *[1] * (delta.dim() - 1)))
            if self.cache:
                self._memo[(name, which)] = (x, x._version, out)
            return out

        install_forward(proj, forward, self.wrapped)


def install_forward(module: nn.Module, forward, undo: list) -> None:
    """Give one module instance its own forward (the class and other instances keep theirs), recording in
    `undo` what to put back: the way both Perfusion edits and baselines' weights go on without touching W."""
    undo.append((module, module.__dict__.get("forward")))
    module.forward = forward


def restore_forwards(undo: list) -> None:
    """Undo install_forward calls, last first, leaving each module as it was (no instance attribute left)."""
    for module, previous in reversed(undo):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    undo.clear()


def attach(unet: nn.Module, cache: bool = False) -> Patch:
    """Install the (initially empty) wrappers. Edits are set in `patch.edits` by `apply` or a trainer.

    cache=True memoises each projection's output on its input tensor: for rendering only (a trainer
    changes the edits every step)."""
    patch = Patch(unet, cache=cache)

    def unet_pre(module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        patch._key_context = patch._find_key_context(ehs) if ehs is not None else None
        patch._scope = patch._find_scope(ehs) if ehs is not None else None

    patch.handles.append(unet.register_forward_pre_hook(unet_pre, with_kwargs=True))
    for name, attn in cross_attention_layers(unet).items():
        patch._wrap(attn.to_k, name, "k")
        patch._wrap(attn.to_v, name, "v")
    return patch


def build_edits(
    unet: nn.Module,
    inputs: ConceptInputs,
    key_targets: list[dict[str, Tensor]],
    value_targets: list[dict[str, Tensor]],
    layers: dict[str, nn.Module] | None = None,
) -> dict[str, tuple[LayerEdit, LayerEdit]]:
    """LayerEdits for every cross-attention layer: concept c's o* in layer l is targets[c][l].
    `layers`: cross_attention_layers(unet), when the caller already has it (the training loop
    calls this every step; walking the UNet's ~1,000 modules costs a millisecond each time)."""
    edits = {}
    for name, attn in (layers if layers is not None else cross_attention_layers(unet)).items():
        dev = projection_weight(attn.to_v).device
        ok = torch.stack([t[name].to(dev) for t in key_targets])    # (n, m)
        ov = torch.stack([t[name].to(dev) for t in value_targets])  # (n, m)
        edits[name] = (
            layer_edit(projection_weight(attn.to_k), inputs, ok),
            layer_edit(projection_weight(attn.to_v), inputs, ov),
        )
    return edits


def stack_weights(unet: nn.Module, layers: dict[str, nn.Module] | None = None) -> tuple[Tensor, dict]:
    """Every cross-attention to_k / to_v weight stacked along the output axis, in float32, detached:
    (W (M, d), slices {(layer, "k"|"v"): (start, stop)}). Built once per training run."""
    layers = layers if layers is not None else cross_attention_layers(unet)
    parts, slices, at = [], {}, 0
    for name, attn in layers.items():
        for which, proj in (("k", attn.to_k), ("v", attn.to_v)):
            w = projection_weight(proj).detach().float()
            parts.append(w)
            slices[(name, which)] = (at, at + w.shape[0])
            at += w.shape[0]
    return torch.cat(parts), slices


def build_stacked(weights: Tensor, slices: dict, inputs: ConceptInputs, key_targets: list[dict[str, Tensor]],
                  value_targets: list[dict[str, Tensor]]) -> StackedEdit:
    """The StackedEdit of every projection in `slices` (concept c's o* in projection (l, k|v) is
    key_targets[c][l] / value_targets[c][l]): the same edit as build_edits, as one."""
    rows = []
    for keys, values in zip(key_targets, value_targets):
        rows.append(torch.cat([(keys if which == "k" else values)[name].to(weights.device)
                               for (name, which) in slices]))
    return stacked_edit(weights, inputs, torch.stack(rows), slices)


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
    cache: bool = False,
    linear_gates: list[bool] | None = None,
    scoped: list[bool] | None = None,
) -> Patch:
    """Apply one or several concepts to a UNet (§2, §8); each keeps its own β, τ.

    `betas`/`taus` override the concepts' stored defaults; `cache` memoises K/V across denoising
    steps; `linear_gates[c]` replaces concept c's gate by s(e), i.e. plain ROME (an ablation, §2); `scoped[c]`
    confines concept c's edit to the token scopes registered in `patch.scopes` (none yet: nowhere).
    Returns a Patch; `patch.remove()` (or a `with` block) takes the edits off again.
    """
    labels = labels or [f"#{i}" for i in range(len(concepts))]
    for c, label in zip(concepts, labels):
        check_layers(unet, c, label)
    dev = next(unet.parameters()).device
    betas = betas if betas is not None else [c.beta for c in concepts]
    taus = taus if taus is not None else [c.tau for c in concepts]
    i_stars = torch.stack([c.i_star.to(dev) for c in concepts])
    inputs = concept_inputs(i_stars, C_inv, betas, taus, exact=exact, linear=linear_gates)
    patch = attach(unet, cache=cache)
    patch.edits.update(build_edits(
        unet, inputs, [c.key_targets for c in concepts], [c.value_targets for c in concepts]
    ))
    if scoped is not None and any(scoped):
        patch.scope_default = torch.tensor([0.0 if s else 1.0 for s in scoped])
    return patch
