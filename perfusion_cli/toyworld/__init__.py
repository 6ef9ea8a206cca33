"""A procedural toy world of 64×64 captioned images (pure numpy + PIL, deterministic from a seed).

Used to train a tiny Stable-Diffusion-shaped base model (`sample`) and to measure personalization on
specific objects the base model never saw (`DEV_INSTANCES`, `REPORTING_INSTANCES`, `photo_set`,
`render_instance_in`). See `world` for the details.
"""

from .world import (
    ALL_COLOURS, COLOURS, DEV_INSTANCES, EXTRAS, INSTANCE_COLOURS, INSTANCES, INSTANCES_BY_NAME, KINDS,
    PATTERNS, PLURALS, POSITIONS, REPORTING_INSTANCES, RES, SCENES, SIZES, Instance, Obj, Scene, background,
    caption, draw, grid, ground_top, iterate, object_mask, object_size, photo_set, place, position_of,
    random_obj, render_instance_in, rgb, sample, sample_scene, visible_fraction,
)

__all__ = [
    "ALL_COLOURS", "COLOURS", "DEV_INSTANCES", "EXTRAS", "INSTANCE_COLOURS", "INSTANCES", "INSTANCES_BY_NAME",
    "KINDS", "PATTERNS", "PLURALS", "POSITIONS", "REPORTING_INSTANCES", "RES", "SCENES", "SIZES", "Instance",
    "Obj", "Scene", "background", "caption", "draw", "grid", "ground_top", "iterate", "object_mask",
    "object_size", "photo_set", "place", "position_of", "random_obj", "render_instance_in", "rgb", "sample",
    "sample_scene", "visible_fraction",
]
