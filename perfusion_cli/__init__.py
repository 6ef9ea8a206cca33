"""perfusion: personalize text-to-image diffusion models with Perfusion (arXiv 2305.01644).

The Python API (the same functions the CLI calls) is imported lazily, so `perfusion --version`
stays fast:

    import perfusion_cli as pf
    pf.train("./photos", name="mycat", supercategory="cat", model="toyworld")
    pf.render(["mycat on a beach"], out="renders")
    with pf.apply(pipe, ["mycat"]) as applied:        # any diffusers pipeline you loaded
        image = applied("mycat on a beach").images[0]
"""

__version__ = "0.1.0"

_API = {
    "train": "api", "render": "api", "apply": "api", "combine": "api", "load_concept_set": "api",
    "Applied": "rendering", "Gate": "rendering", "RenderSettings": "rendering", "TrainConfig": "training",
    "Registry": "registry", "PerfusionError": "errors", "ConceptTensors": "edit", "Concept": "concept",
    "ConceptSet": "concept", "load_model": ("models", "load"),
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'perfusion_cli' has no attribute {name!r}")
    import importlib

    target = _API[name]
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(f".{module}", __name__), attr)
