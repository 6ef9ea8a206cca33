"""The concept registry: locations, names, atomic writes, locking, import/export. CPU only, no model."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import filelock
import pytest
import torch
from safetensors.torch import save

from perfusion_cli import concept, registry
from perfusion_cli.edit import ConceptTensors
from perfusion_cli.errors import PerfusionError
from perfusion_cli.registry import Registry, validate_name

LAYERS = [("down.attn2", 3), ("up.attn2", 5)]
D = 4


def make_set(name: str = "mycat", supercategory: str = "cat", seed: int = 0) -> concept.ConceptSet:
    g = torch.Generator().manual_seed(seed)
    tensors = ConceptTensors(
        i_star=torch.randn(D, generator=g),
        key_targets={n: torch.randn(w, generator=g) for n, w in LAYERS},
        value_targets={n: torch.randn(w, generator=g) for n, w in LAYERS},
        beta=0.6,
        tau=0.2,
    )
    c = concept.Concept(
        name=name, supercategory=supercategory, tensors=tensors,
        embeddings=[torch.randn(D, generator=g)], training={"steps": 10},
    )
    return concept.ConceptSet(
        name=name, concepts=[c],
        base_model={"id": "toy/model", "fingerprint": "abc123", "family": "sd1"},
        covariance={"fingerprint": "cov1", "source": "bundled"},
    )


def make_bytes(name: str = "mycat", dtype=torch.float16, **kw) -> bytes:
    return concept.to_bytes(make_set(name, **kw), dtype=dtype)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(root=tmp_path / "home", bundled=tmp_path / "bundled")


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def snapshot(reg: Registry) -> dict[str, bytes]:
    d = reg.concepts_dir
    return {p.name: p.read_bytes() for p in d.iterdir()} if d.exists() else {}


def assert_same_tensors(a: concept.ConceptSet, b: concept.ConceptSet, atol: float = 1e-3) -> None:
    assert len(a.concepts) == len(b.concepts)
    for ca, cb in zip(a.concepts, b.concepts):
        torch.testing.assert_close(ca.tensors.i_star, cb.tensors.i_star, atol=atol, rtol=1e-3)
        for n, _ in LAYERS:
            torch.testing.assert_close(ca.tensors.key_targets[n], cb.tensors.key_targets[n], atol=atol, rtol=1e-3)
            torch.testing.assert_close(ca.tensors.value_targets[n], cb.tensors.value_targets[n], atol=atol, rtol=1e-3)
        assert len(ca.embeddings) == len(cb.embeddings)
        for ea, eb in zip(ca.embeddings, cb.embeddings):
            torch.testing.assert_close(ea, eb, atol=atol, rtol=1e-3)


# ----------------------------------------------------------------------------- locations


def test_home_honours_perfusion_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PERFUSION_HOME", str(tmp_path / "ph"))
    assert registry.home() == tmp_path / "ph"
    assert Registry(bundled=tmp_path / "b").root == tmp_path / "ph"
    assert Registry(bundled=tmp_path / "b").concepts_dir == tmp_path / "ph" / "concepts"


def test_home_default_is_platform_data_dir(monkeypatch):
    monkeypatch.delenv("PERFUSION_HOME", raising=False)
    h = registry.home()
    assert h.name == "perfusion" or "perfusion" in h.parts
    assert h.is_absolute()


def test_bundled_dir_points_at_repo_registry():
    b = registry.bundled_dir()
    # source checkout: the repo's top-level registry/ (it ships covariances), or the wheel's _registry
    assert b.name in ("registry", "_registry")
    assert (b / "covariances").is_dir()


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("good", ["a", "mycat", "my_cat2", "x" * 40, "sks_dog_v2"])
def test_validate_name_accepts(good):
    assert validate_name(good) == good


@pytest.mark.parametrize(
    "bad, words",
    [
        ("", ["empty"]),
        ("x" * 41, ["41", "limit is 40"]),
        ("a/b", ["path separator"]),
        ("a\\b", ["path separator"]),
        ("..", ["path separator or '..'"]),
        ("my..cat", ["'..'"]),
        ("MyCat", ["lowercase", "'mycat'"]),
        ("my cat", ["' '", "lowercase letters a-z"]),
        ("my-cat", ["'-'", "digits 0-9"]),
        ("caté", ["'é'"]),
        ("cat\n", ["'\\n'"]),
        ("1cat", ["start with a lowercase letter"]),
        ("_cat", ["start with a lowercase letter"]),
        ("con", ["reserved", "Windows"]),
    ],
)
def test_validate_name_rejects_with_specific_message(bad, words):
    with pytest.raises(PerfusionError) as ei:
        validate_name(bad)
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_validate_name_messages_are_distinct():
    msgs = set()
    for bad in ["", "x" * 41, "a/b", "MyCat", "my-cat", "1cat"]:
        with pytest.raises(PerfusionError) as ei:
            validate_name(bad)
        msgs.add(str(ei.value).split(";")[0].split(":")[0].replace(bad, "<n>"))
    assert len(msgs) == 6


# ----------------------------------------------------------------------------- round trip


def test_put_get_entries_remove_round_trip(reg):
    cs = make_set("mycat")
    e = reg.put("mycat", concept.to_bytes(cs))
    assert e.name == "mycat" and e.source == "user" and e.error is None
    assert e.path == reg.concepts_dir / "mycat.safetensors"
    assert e.size == e.path.stat().st_size > 0
    assert e.kind == "concept" and e.supercategories == ["cat"] and e.supercategory == "cat"
    assert e.base_model_id == "toy/model" and e.created
    assert e.sha256 == concept.file_sha256(e.path) and len(e.sha256) == 64

    got = reg.get("mycat")
    assert got.path == e.path and got.source == "user"
    back = concept.load(got.path)
    assert back.name == "mycat" and back.concepts[0].name == "mycat"
    assert back.concepts[0].layers == LAYERS
    assert_same_tensors(cs, back)  # fp16 storage: equal within fp16 tolerance

    reg.put("dog", make_bytes("dog", supercategory="dog", seed=1))
    assert [x.name for x in reg.entries()] == ["dog", "mycat"]

    assert reg.remove("mycat") == e.path
    assert not e.path.exists()
    assert [x.name for x in reg.entries()] == ["dog"]
    with pytest.raises(PerfusionError, match="no concept named 'mycat'"):
        reg.get("mycat")
    # nothing but the concept files (no temp files) is left in the folder
    assert files_in(reg.concepts_dir) == ["dog.safetensors"]


def test_float32_round_trip_is_exact(reg):
    cs = make_set("mycat")
    reg.put("mycat", concept.to_bytes(cs, dtype=torch.float32))
    assert_same_tensors(cs, concept.load(reg.get("mycat").path), atol=0)


def test_get_missing_suggests_close_match(reg):
    reg.put("mycat", make_bytes("mycat"))
    with pytest.raises(PerfusionError) as ei:
        reg.get("mycaat")
    msg = str(ei.value)
    assert "did you mean 'mycat'" in msg and str(reg.root) in msg and "perfusion list" in msg
    with pytest.raises(PerfusionError) as ei:
        reg.get("zebra")
    assert "did you mean" not in str(ei.value)


def test_entries_of_missing_dirs_is_empty(tmp_path):
    assert Registry(root=tmp_path / "nope", bundled=tmp_path / "nope2").entries() == []


def test_put_refuses_existing_name_and_keeps_bytes(reg):
    reg.put("mycat", make_bytes("mycat", seed=0))
    original = (reg.concepts_dir / "mycat.safetensors").read_bytes()
    with pytest.raises(PerfusionError, match="already exists; use --force"):
        reg.put("mycat", make_bytes("mycat", seed=1))
    assert (reg.concepts_dir / "mycat.safetensors").read_bytes() == original
    assert files_in(reg.concepts_dir) == ["mycat.safetensors"]
    # with force it is replaced
    new = make_bytes("mycat", seed=1)
    reg.put("mycat", new, force=True)
    assert (reg.concepts_dir / "mycat.safetensors").read_bytes() == new


def test_put_refuses_bytes_that_are_not_a_concept(reg):
    reg.put("mycat", make_bytes("mycat"))
    before = snapshot(reg)
    for junk in (b"", b"not safetensors at all", save({"x": torch.zeros(2)}), make_bytes("other")[:-7]):
        with pytest.raises(PerfusionError):
            reg.put("other", junk)
    assert snapshot(reg) == before


def test_crash_during_write_leaves_old_content_and_no_temp(reg, monkeypatch):
    reg.put("mycat", make_bytes("mycat", seed=0))
    path = reg.concepts_dir / "mycat.safetensors"
    original = path.read_bytes()

    def boom(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry.os, "replace", boom)
    # overwrite of an existing concept
    with pytest.raises(PerfusionError, match="disk full") as ei:
        reg.put("mycat", make_bytes("mycat", seed=1), force=True)
    assert "free space" in str(ei.value)
    assert path.read_bytes() == original
    # a new name: no final file at all
    with pytest.raises(PerfusionError, match="disk full"):
        reg.put("newcat", make_bytes("newcat"))
    assert not (reg.concepts_dir / "newcat.safetensors").exists()
    assert files_in(reg.concepts_dir) == ["mycat.safetensors"]  # no .tmp left behind
    # atomic_write itself behaves the same
    target = reg.root / "x.bin"
    with pytest.raises(PerfusionError, match="disk full"):
        reg.atomic_write(target, b"abc")
    assert not target.exists()
    assert not [p for p in reg.root.iterdir() if p.name.endswith(".tmp")]


def test_crash_while_writing_bytes_cleans_up(reg, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(registry.os, "fsync", fsync)
    with pytest.raises(PerfusionError, match="permission denied"):
        reg.put("mycat", make_bytes("mycat"))
    monkeypatch.setattr(registry.os, "fsync", real_fsync)
    assert files_in(reg.concepts_dir) == []


def test_atomic_write_replaces_whole_file(reg, tmp_path):
    target = tmp_path / "out" / "f.bin"
    assert reg.atomic_write(target, b"one") == target
    reg.atomic_write(target, b"two two")
    assert target.read_bytes() == b"two two"
    assert files_in(target.parent) == ["f.bin"]


def test_truncated_file_is_listed_with_error(reg):
    reg.put("good", make_bytes("good"))
    (reg.concepts_dir / "broken.safetensors").write_bytes(make_bytes("broken")[:-13])
    (reg.concepts_dir / "empty.safetensors").write_bytes(b"")
    (reg.concepts_dir / ".good.safetensors.abc.tmp").write_bytes(b"partial")  # temp files are ignored
    (reg.concepts_dir / "notes.txt").write_text("ignored")
    es = {e.name: e for e in reg.entries()}
    assert sorted(es) == ["broken", "empty", "good"]
    assert es["good"].error is None and es["good"].meta is not None
    for bad in ("broken", "empty"):
        assert es[bad].error and es[bad].meta is None and es[bad].kind is None
        assert "re-export or retrain" in es[bad].error
    # get still finds the damaged one (so it can be shown/removed), with the error set
    assert reg.get("broken").error
    reg.remove("broken")
    assert sorted(e.name for e in reg.entries()) == ["empty", "good"]


def test_badly_named_file_is_flagged(reg):
    reg.concepts_dir.mkdir(parents=True)
    (reg.concepts_dir / "My Cat.safetensors").write_bytes(make_bytes("mycat"))
    [e] = reg.entries()
    assert e.error and "not a valid concept name" in e.error


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pkl"])
def test_import_refuses_pickle_files(reg, tmp_path, suffix):
    src = tmp_path / f"evil{suffix}"
    src.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(PerfusionError) as ei:
        reg.import_file(src)
    assert "safetensors" in str(ei.value) and "unpickle" in str(ei.value)
    assert snapshot(reg) == {}


def test_import_refuses_other_suffix_and_missing(reg, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(PerfusionError, match=r"\.safetensors"):
        reg.import_file(tmp_path / "a.txt")
    with pytest.raises(PerfusionError, match="no file"):
        reg.import_file(tmp_path / "missing.safetensors")
    assert snapshot(reg) == {}


def test_import_refuses_foreign_and_truncated_safetensors(reg, tmp_path):
    reg.put("keep", make_bytes("keep"))
    before = snapshot(reg)
    foreign = tmp_path / "model.safetensors"
    foreign.write_bytes(save({"weight": torch.zeros(3)}, metadata={"format": "pt"}))
    with pytest.raises(PerfusionError, match="not a Perfusion concept"):
        reg.import_file(foreign)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(make_bytes("trunc")[:-9])
    with pytest.raises(PerfusionError, match="trunc.safetensors"):
        reg.import_file(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(PerfusionError):
        reg.import_file(garbage)
    assert snapshot(reg) == before


def _odd_metadata_file(path: Path, **overrides) -> Path:
    """A concept file whose metadata is well-formed JSON but of the wrong shape."""
    from safetensors import safe_open
    good = path.with_name("good_tmp.safetensors")
    good.write_bytes(make_bytes("odd"))
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    good.unlink()
    meta.update(overrides)
    path.write_bytes(save(tensors, metadata=meta))
    return path


@pytest.mark.parametrize("overrides", [{"format_version": "v1"}, {"layers": "5"}, {"concepts": "7"}])
def test_odd_metadata_is_a_perfusion_error_not_a_crash(reg, tmp_path, overrides):
    # concept.load lets ValueError/TypeError escape for these; the registry must not
    src = _odd_metadata_file(tmp_path / "odd.safetensors", **overrides)
    with pytest.raises(PerfusionError):
        reg.import_file(src)
    with pytest.raises(PerfusionError):
        reg.put("odd", src.read_bytes())
    assert snapshot(reg) == {}
    reg.concepts_dir.mkdir(parents=True, exist_ok=True)
    (reg.concepts_dir / "odd.safetensors").write_bytes(src.read_bytes())
    [e] = reg.entries()
    assert e.name == "odd" and e.error and "odd.safetensors" in e.error
    # concept.read_metadata checks the header's shape itself: nothing to display, the error is set
    assert e.meta is None


def test_import_uses_metadata_name(reg, tmp_path):
    src = tmp_path / "whatever.safetensors"
    src.write_bytes(make_bytes("mycat"))
    e = reg.import_file(src)
    assert e.name == "mycat" and e.path.read_bytes() == src.read_bytes()  # same name: copied verbatim
    with pytest.raises(PerfusionError, match="already exists"):
        reg.import_file(src)


@pytest.mark.parametrize("dtype, tag", [(torch.float16, "F16"), (torch.float32, "F32")])
def test_import_with_rename_rewrites_names(reg, tmp_path, dtype, tag):
    cs = make_set("mycat")
    src = tmp_path / "mycat.safetensors"
    src.write_bytes(concept.to_bytes(cs, dtype=dtype))
    e = reg.import_file(src, name="tabby")
    assert e.name == "tabby" and e.meta["name"] == "tabby"
    back = concept.load(e.path)
    assert back.name == "tabby" and back.concepts[0].name == "tabby"
    assert e.meta["concepts"][0]["token"] == "tabby"
    assert back.concepts[0].supercategory == "cat"
    assert_same_tensors(cs, back, atol=1e-3 if dtype == torch.float16 else 0)
    from safetensors import safe_open
    with safe_open(str(e.path), framework="pt") as f:
        assert f.get_slice("0.i_star").get_dtype() == tag  # original precision kept
    assert concept.load(src).name == "mycat"  # the source file is left alone


def test_import_rejects_bad_new_name(reg, tmp_path):
    src = tmp_path / "mycat.safetensors"
    src.write_bytes(make_bytes("mycat"))
    with pytest.raises(PerfusionError, match="lowercase"):
        reg.import_file(src, name="Tabby")
    assert snapshot(reg) == {}


# ----------------------------------------------------------------------------- export


def test_export_to_dir_and_file_refusing_overwrite(reg, tmp_path):
    reg.put("mycat", make_bytes("mycat"))
    stored = reg.get("mycat").path.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    p = reg.export("mycat", out)
    assert p == out / "mycat.safetensors" and p.read_bytes() == stored
    with pytest.raises(PerfusionError, match="already exists; use --force"):
        reg.export("mycat", out)
    assert reg.export("mycat", out, force=True) == p

    f = tmp_path / "custom.safetensors"
    f.write_bytes(b"old")
    with pytest.raises(PerfusionError, match="already exists"):
        reg.export("mycat", f)
    assert f.read_bytes() == b"old"
    assert reg.export("mycat", f, force=True) == f and f.read_bytes() == stored

    with pytest.raises(PerfusionError, match=r"\.safetensors"):
        reg.export("mycat", tmp_path / "x.pt")
    with pytest.raises(PerfusionError, match="does not exist"):
        reg.export("mycat", tmp_path / "nodir" / "x.safetensors")
    with pytest.raises(PerfusionError, match="no concept named"):
        reg.export("nosuch", out)
    assert sorted(files_in(out)) == ["mycat.safetensors"]


# ----------------------------------------------------------------------------- bundled


def test_bundled_entries_listed_read_only_and_shadowed(reg):
    bdir = reg.bundled_concepts_dir
    bdir.mkdir(parents=True)
    bundled_bytes = make_bytes("teddy", supercategory="teddy", seed=3)
    (bdir / "teddy.safetensors").write_bytes(bundled_bytes)
    (bdir / "vase.safetensors").write_bytes(make_bytes("vase", supercategory="vase", seed=4))
    reg.put("mycat", make_bytes("mycat"))

    es = reg.entries()
    assert [(e.name, e.source) for e in es] == [("mycat", "user"), ("teddy", "bundled"), ("vase", "bundled")]
    assert not any(e.shadowed for e in es)
    assert reg.get("teddy").source == "bundled"

    with pytest.raises(PerfusionError, match="'teddy' is bundled and read-only"):
        reg.remove("teddy")
    assert (bdir / "teddy.safetensors").read_bytes() == bundled_bytes

    with pytest.raises(PerfusionError, match="bundled"):
        reg.put("teddy", make_bytes("teddy", seed=9))
    assert not (reg.concepts_dir / "teddy.safetensors").exists()

    mine = make_bytes("teddy", seed=9)
    reg.put("teddy", mine, force=True)
    got = reg.get("teddy")
    assert got.source == "user" and got.path.read_bytes() == mine
    es = reg.entries()
    assert [(e.name, e.source, e.shadowed) for e in es] == [
        ("mycat", "user", False), ("teddy", "user", False), ("teddy", "bundled", True), ("vase", "bundled", False)
    ]
    # removing the user copy uncovers the bundled one, untouched
    reg.remove("teddy")
    assert reg.get("teddy").source == "bundled"
    assert (bdir / "teddy.safetensors").read_bytes() == bundled_bytes


# ----------------------------------------------------------------------------- covariances


def test_covariance_path_and_put(reg):
    p = reg.covariance_path("clip-l.abc123")
    assert p == reg.root / "covariances" / "clip-l.abc123.safetensors"
    data = save({"covariance": torch.eye(3)})
    assert reg.put_covariance("clip-l.abc123", data) == p and p.read_bytes() == data
    with pytest.raises(PerfusionError):
        reg.covariance_path("../evil")
    with pytest.raises(PerfusionError):
        reg.put_covariance("junk", b"not safetensors")
    assert not reg.covariance_path("junk").exists()


# ----------------------------------------------------------------------------- locking


def test_concurrent_puts_both_land(reg):
    names = ["alpha", "beta", "gamma", "delta"]
    payloads = {n: make_bytes(n, seed=i) for i, n in enumerate(names)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def worker(n):
        try:
            barrier.wait()
            reg.put(n, payloads[n])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(e.name for e in reg.entries()) == sorted(names)
    for n in names:
        assert reg.get(n).path.read_bytes() == payloads[n]
    assert not [p for p in reg.concepts_dir.iterdir() if p.name.endswith(".tmp")]


def test_lock_serialises_writers(reg):
    # while one writer holds the lock, another waits rather than writing
    order: list[str] = []
    with reg.lock():
        t = threading.Thread(target=lambda: (reg.put("late", make_bytes("late")), order.append("put")))
        t.start()
        t.join(0.3)
        assert t.is_alive() and not (reg.concepts_dir / "late.safetensors").exists()
        order.append("release")
    t.join(10)
    assert order == ["release", "put"]
    assert reg.get("late").error is None


def test_held_lock_times_out_with_perfusion_error(reg, monkeypatch):
    monkeypatch.setattr(registry, "LOCK_TIMEOUT", 0.1)
    reg.root.mkdir(parents=True)
    other = filelock.FileLock(str(reg.root / ".lock"))
    other.acquire()
    try:
        with pytest.raises(PerfusionError) as ei:
            reg.put("mycat", make_bytes("mycat"))
        assert str(reg.root / ".lock") in str(ei.value) and "retry" in str(ei.value)
        with pytest.raises(PerfusionError, match="lock"):
            reg.remove("mycat")
    finally:
        other.release()
    assert not (reg.concepts_dir / "mycat.safetensors").exists()
    reg.put("mycat", make_bytes("mycat"))  # works once released
    assert reg.get("mycat").error is None
