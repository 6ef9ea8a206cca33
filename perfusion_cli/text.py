"""Prompts with concept words in them, and the text encoders that read them.

The tokenizer is never modified. A concept word ("mycat") is written into a prompt as its
supercategory word ("cat", one token), and a forward hook on each text encoder's token-embedding
table swaps the concept's own embedding in at exactly those positions. Token positions therefore
line up between "mycat on a beach" and "cat on a beach", which is what global locking needs, and a
pipeline is unchanged once the hooks are gone.

A concept that keeps the class noun after its token (DreamBooth's "a [V] dog", and Perfusion trained with
`TrainConfig.class_noun`: `written_as(..., class_noun=True)`) is written as the supercategory twice, "cat cat": the
first word's token carries the concept's embedding, the second stays the plain class noun.
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import PerfusionError


def text_stack(pipe) -> list[tuple[object, nn.Module]]:
    """[(tokenizer, text_encoder)] of a pipeline: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def word_ids(tokenizer, word: str) -> list[int]:
    """Token ids of one word, without begin/end/padding tokens."""
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def is_single_token(pipe, word: str) -> bool:
    return all(len(word_ids(tok, word)) == 1 for tok, _ in text_stack(pipe))


def check_supercategory(pipe, word: str) -> str:
    """The supercategory must be one known token in every tokenizer (it is what keys lock to)."""
    word = " ".join(word.strip().lower().split())
    if not word:
        raise PerfusionError("the supercategory is empty; pass one word such as --super cat")
    if not re.fullmatch(r"[a-z][a-z\-' ]*", word):
        raise PerfusionError(f"supercategory {word!r} must be one plain word (letters only), e.g. --super cat")
    if is_single_token(pipe, word):
        return word
    parts = [w for w in re.split(r"[\s\-']+", word) if w and is_single_token(pipe, w)]
    vocab = [t[:-4] for t in pipe.tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()]
    close = [w for w in difflib.get_close_matches(word, vocab, n=4, cutoff=0.6) if is_single_token(pipe, w)]
    hint = ", ".join(dict.fromkeys(parts + close)) or "a simpler word"
    n = len(word_ids(pipe.tokenizer, word))
    raise PerfusionError(
        f"supercategory {word!r} is {n} tokens for this model's tokenizer, not one; try: {hint}"
    )


def check_concept_word(pipe, name: str) -> None:
    """A concept's name must not already be a word the tokenizer knows (it would shadow it)."""
    if is_single_token(pipe, name):
        raise PerfusionError(
            f"name {name!r} is already a word of this model's vocabulary; pick a made-up word such as 'my{name}'"
        )


def find_concepts(prompt: str, names) -> list[str]:
    """Names (from `names`) that occur as whole words in the prompt, in order of first appearance."""
    found = []
    for m in re.finditer(r"[A-Za-z][A-Za-z0-9_]*", prompt):
        w = m.group(0).lower()
        if w in names and w not in found:
            found.append(w)
    return found


def rewrite(prompt: str, words: dict[str, str]) -> str:
    """Replace each whole-word occurrence of a key of `words` by its value (case-insensitive)."""
    if not words:
        return prompt
    pattern = r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, words)) + r")(?![A-Za-z0-9_])"
    return re.sub(pattern, lambda m: words[m.group(1).lower()], prompt, flags=re.IGNORECASE)


def written_as(supercategory: str, class_noun: bool = False) -> str:
    """The words a concept word is written as in the prompt the pipeline reads. The first word's token gets the
    concept's embedding; with class_noun the supercategory follows it as itself ("a [V] cat", DreamBooth's and
    Custom Diffusion's prompt form)."""
    return f"{supercategory} {supercategory}" if class_noun else supercategory


def token_rows(tokenizer, prompt: str) -> Tensor:
    """The ids row a diffusers pipeline feeds its text encoder for `prompt` (padded, truncated)."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids[0]


def _other_word(tokenizer, not_this: str) -> str:
    for w in ("dog", "cat", "car", "box", "tree", "house", "a", "the"):
        if w != not_this and len(word_ids(tokenizer, w)) == 1:
            return w
    raise PerfusionError("this tokenizer has none of the common words perfusion uses to find concept positions")


@dataclass
class Slot:
    """Where one concept sits in one tokenized prompt, for one tokenizer."""

    ids: Tensor    # (L,) ids row of the rewritten prompt
    mask: Tensor   # (L,) bool: positions of this concept
    concept: int   # index into the list of concepts being encoded


def slots_for(tokenizer, prompt: str, supers: dict[str, str]) -> list[Slot]:
    """Token positions of each concept of `supers` (name -> the words it is written as: `written_as`) in `prompt`.

    Positions are found by difference: the prompt is tokenized with concept c written as its words and
    once more with their first word swapped for another one-token word; the ids differ exactly at the
    positions that carry c's embedding (a kept class noun after them is not one).
    """
    base_words = dict(supers)
    ids = token_rows(tokenizer, rewrite(prompt, base_words))
    slots = []
    for j, (name, words) in enumerate(supers.items()):
        first, _, rest = words.partition(" ")
        other = _other_word(tokenizer, first) + (f" {rest}" if rest else "")
        alt = token_rows(tokenizer, rewrite(prompt, {**base_words, name: other}))
        mask = ids != alt
        if mask.any():
            slots.append(Slot(ids=ids, mask=mask, concept=j))
    return slots


class EmbeddingOverride:
    """Forward hooks on the token-embedding tables: rows whose ids equal a registered row get the
    concept's embedding at its positions. Differentiable in the embeddings (training uses this)."""

    def __init__(self, pipe):
        self.stack = text_stack(pipe)
        self.slots: list[list[Slot]] = [[] for _ in self.stack]  # per text encoder
        self.vectors: list[list[Tensor]] = [[] for _ in self.stack]  # per text encoder, per concept
        self.handles = []
        for k, (_, enc) in enumerate(self.stack):
            emb = enc.get_input_embeddings()
            self.handles.append(emb.register_forward_hook(lambda m, a, out, k=k: self._hook(k, a[0], out)))

    def set_concepts(self, embeddings: list[list[Tensor]]) -> None:
        """embeddings[c][k]: concept c's embedding for text encoder k."""
        self.vectors = [[e[k] for e in embeddings] for k in range(len(self.stack))]

    def add_prompt(self, prompt: str, supers: dict[str, str]) -> int:
        """Register a prompt; returns how many concept occurrences were found in it."""
        n = 0
        for k, (tok, _) in enumerate(self.stack):
            new = slots_for(tok, prompt, supers)
            self.slots[k].extend(new)
            n = max(n, len(new))
        return n

    def clear_prompts(self) -> None:
        self.slots = [[] for _ in self.stack]

    def _hook(self, k: int, ids: Tensor, out: Tensor) -> Tensor:
        if not self.slots[k] or ids.dim() != 2:
            return out
        for slot in self.slots[k]:
            if slot.ids.shape[0] != ids.shape[1]:
                continue
            rows = (ids == slot.ids.to(ids.device)).all(1)                   # (B,)
            if not rows.any():
                continue
            where = rows[:, None] & slot.mask.to(ids.device)[None, :]       # (B, L)
            vec = self.vectors[k][slot.concept].to(out.device, out.dtype)
            out = torch.where(where[..., None], vec, out)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@dataclass
class Encoded:
    embeds: Tensor             # (B, L, d) what the UNet's cross-attention reads
    pooled: Tensor | None      # (B, d_pool) SDXL's pooled text embedding, else None


def encode(pipe, prompts: list[str], device=None) -> Encoded:
    """The pipeline's own prompt encoding (no CFG, one image per prompt), differentiable."""
    device = device or pipe.device
    kw = dict(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    out = pipe.encode_prompt(**kw)
    if len(out) == 4:  # SDXL: embeds, negative, pooled, negative pooled
        return Encoded(out[0], out[2])
    return Encoded(out[0], None)


@contextmanager
def quiet_diffusers():
    """Silence diffusers' per-call warnings (e.g. "input was truncated") for bulk encoding."""
    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old)


def attention_mask(pipe, prompts: list[str]) -> Tensor:
    """(B, L) bool: the positions of real tokens (begin and end included, padding excluded)."""
    tok = pipe.tokenizer
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).attention_mask.bool()


@contextmanager
def concept_embeddings(pipe, embeddings: list[list[Tensor]]):
    override = EmbeddingOverride(pipe)
    override.set_concepts(embeddings)
    try:
        yield override
    finally:
        override.remove()
