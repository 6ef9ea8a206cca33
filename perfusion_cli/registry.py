"""Where concepts live: the user's registry (writable) and the bundled one (read-only).

Layout of a registry root (the user's one is `home()`):
    <root>/concepts/NAME.safetensors          one concept file per name
    <root>/covariances/FINGERPRINT.safetensors text-encoder covariances estimated on this machine
    <root>/.lock                               serialises writers (filelock)

Rules: nothing here unpickles a file or loads a model, nothing prints, and every problem a user
can fix is raised as a one-line PerfusionError. Every write is atomic: the bytes go to a hidden
temp file (".NAME....tmp") in the target folder, are fsynced and then os.replace'd onto the final
name, so a crash or a full disk never leaves a half-written file under that name.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import filelock
import platformdirs
import torch
from safetensors import SafetensorError, safe_open

from . import concept
from .errors import ConceptFileError, PerfusionError

SUFFIX = ".safetensors"
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
MAX_NAME = 40
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another one (module-level so tests can shorten it)
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
# Names Windows cannot use as file names (whatever the extension).
WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
FINGERPRINT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# ----------------------------------------------------------------------------- locations


def home() -> Path:
    """The user's registry root: $PERFUSION_HOME if set, else the platform's user data folder."""
    env = os.environ.get("PERFUSION_HOME", "").strip()
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("perfusion", appauthor=False))


def bundled_dir() -> Path:
    """The read-only registry shipped with the package.

    Wheels map the repository's top-level `registry/` to `perfusion_cli/_registry`; source
    checkouts and editable installs use `registry/` itself.
    """
    packaged = Path(__file__).resolve().parent / "_registry"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "registry"


# ----------------------------------------------------------------------------- names


def validate_name(name: str) -> str:
    """Check a concept name: one prompt word and a portable file name. Returns it unchanged."""
    if not isinstance(name, str) or not name:
        raise PerfusionError("a concept name cannot be empty; pass a short lowercase word such as --name mycat")
    shown = name if len(name) <= MAX_NAME else name[:MAX_NAME] + "..."
    if any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")) or ".." in name:
        raise PerfusionError(
            f"concept name {shown!r} contains a path separator or '..'; a name is a plain word such as 'mycat'"
        )
    if len(name) > MAX_NAME:
        raise PerfusionError(f"concept name {shown!r} is {len(name)} characters long; the limit is {MAX_NAME}")
    if NAME_RE.fullmatch(name):
        if name in WINDOWS_RESERVED:
            raise PerfusionError(f"concept name {name!r} is reserved as a file name on Windows; choose another name")
        return name
    lower = name.lower()
    if lower != name and NAME_RE.fullmatch(lower):
        raise PerfusionError(f"concept names are lowercase: use {lower!r} instead of {name!r}")
    bad = sorted({ch for ch in name if not re.fullmatch(r"[a-z0-9_]", ch)})
    if bad:
        shown_bad = " ".join(repr(ch) for ch in bad)
        raise PerfusionError(
            f"concept name {shown!r} contains {shown_bad}; use only lowercase letters a-z, digits 0-9 "
            "and '_', starting with a letter"
        )
    raise PerfusionError(f"concept name {shown!r} must start with a lowercase letter a-z, e.g. 'c{name}'")


def validate_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT_RE.fullmatch(fingerprint) or ".." in fingerprint:
        raise PerfusionError(
            f"covariance fingerprint {fingerprint!r} is not a plain file name (letters, digits, '.', '_', '-'); "
            "this is a bug in the caller, please report it"
        )
    return fingerprint


# ----------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """One concept file in a registry, as listed.

    `error` is set whenever the file cannot be used (unreadable header, tensors that do not match
    it, a file name that is not a valid concept name); `meta` is None when the header itself is
    unreadable and kept otherwise, for display.
    """

    name: str
    path: Path
    source: str                   # "user" | "bundled"
    size: int                     # bytes
    meta: dict | None = None      # concept.read_metadata(path), or None when unreadable
    error: str | None = None      # why the file cannot be used; listing still shows it
    shadowed: bool = False        # a bundled entry hidden by a user entry of the same name

    @cached_property
    def sha256(self) -> str:
        return concept.file_sha256(self.path)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def kind(self) -> str | None:
        return self.meta.get("kind", "concept") if self.meta else None

    @property
    def members(self) -> list[dict]:
        members = (self.meta or {}).get("concepts")
        return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []

    @property
    def supercategories(self) -> list[str]:
        return [str(m.get("supercategory", "")) for m in self.members]

    @property
    def supercategory(self) -> str | None:
        """The member supercategories, comma-joined ("cat" for a single concept)."""
        cats = self.supercategories
        return ", ".join(cats) if cats else None

    @property
    def base_model_id(self) -> str | None:
        bm = (self.meta or {}).get("base_model")
        return bm.get("id") if isinstance(bm, dict) else None

    @property
    def created(self) -> str | None:
        return (self.meta or {}).get("created") or None


def _entry(path: Path, source: str) -> Entry:
    name = path.name[: -len(SUFFIX)]
    try:
        size = path.stat().st_size
    except OSError as e:
        return Entry(name, path, source, 0, None, f"cannot read {path}: {e.strerror or e}")
    meta, error = None, None
    try:
        validate_name(name)
    except PerfusionError as e:
        error = f"{path}: the file name is not a valid concept name ({e}); rename or re-import it"
    if error is None:
        try:
            meta = concept.read_metadata(path)
        except PerfusionError as e:
            error = str(e)
        except Exception as e:  # a foreign file that trips the reader in an unexpected way
            error = f"{path} is not a readable concept file ({concept.first_line(e)}); re-export or retrain it"
    if error is None:
        # The header alone can look fine while the tensors do not match it; concept files are
        # small (tens to hundreds of KB), so listing checks them fully. `meta` is kept for display.
        try:
            _check_concept(path, str(path))
        except PerfusionError as e:
            error = str(e)
    return Entry(name, path, source, size, meta, error)


def _scan(folder: Path, source: str) -> list[Entry]:
    try:
        paths = [p for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        return []
    except OSError as e:
        raise PerfusionError(f"cannot list {folder}: {e.strerror or e}; check its permissions") from None
    return [_entry(p, source) for p in paths if not p.is_dir()]


def _check_concept(path: Path, what: str) -> concept.ConceptSet:
    """Fully load a concept file; any failure becomes a ConceptFileError naming `what`."""
    try:
        return concept.load(path)
    except PerfusionError as e:
        raise ConceptFileError(str(e).replace(str(path), what)) from None
    except Exception as e:  # concept.load lets some malformed-metadata errors through
        raise ConceptFileError(
            f"{what} is not a valid Perfusion concept ({concept.first_line(e)}); re-export or retrain it"
        ) from None


def _os_error(e: OSError, path: Path) -> PerfusionError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return PerfusionError(f"disk full while writing {path}; free space and retry")
    if e.errno in (errno.EACCES, errno.EPERM) or isinstance(e, PermissionError):
        return PerfusionError(
            f"cannot write {path}: permission denied; fix the folder's permissions or set PERFUSION_HOME to a writable folder"
        )
    if e.errno == errno.EROFS:
        return PerfusionError(
            f"cannot write {path}: read-only file system; set PERFUSION_HOME to a writable folder"
        )
    return PerfusionError(f"cannot write {path}: {e.strerror or e}; check the folder and retry")


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- registry


class Registry:
    """The user's concepts under `root` (writable) over the bundled ones under `bundled` (read-only)."""

    def __init__(self, root: Path | None = None, bundled: Path | None = None):
        self.root = Path(root).expanduser() if root is not None else home()
        self.bundled = Path(bundled).expanduser() if bundled is not None else bundled_dir()

    def __repr__(self) -> str:
        return f"Registry(root={str(self.root)!r}, bundled={str(self.bundled)!r})"

    @property
    def concepts_dir(self) -> Path:
        return self.root / "concepts"

    @property
    def bundled_concepts_dir(self) -> Path:
        return self.bundled / "concepts"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def user_path(self, name: str) -> Path:
        return self.concepts_dir / f"{validate_name(name)}{SUFFIX}"

    def bundled_path(self, name: str) -> Path:
        return self.bundled_concepts_dir / f"{validate_name(name)}{SUFFIX}"

    # --- writing ---------------------------------------------------------------------------

    def atomic_write(self, path: Path, data: bytes) -> Path:
        """Write `data` to `path` so that readers see either the old file or the whole new one."""
        return self._atomic_write(Path(path), data)

    def _atomic_write(self, path: Path, data: bytes, check: Callable[[Path], object] | None = None) -> Path:
        """atomic_write, calling check(temp_path) on the synced temp file before it is renamed."""
        folder = path.parent
        tmp: Path | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
                try:
                    # O_EXCL: never clobber; mode 0o666 so the process umask applies, as for open().
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
                    break
                except FileExistsError:
                    tmp = None
            else:  # pragma: no cover - 100 collisions of 48 random bits
                raise FileExistsError(errno.EEXIST, "cannot create a temporary file", str(folder))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if check is not None:
                check(tmp)
            os.replace(tmp, path)
            tmp = None
        except BaseException as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):
                raise _os_error(e, path) from e
            raise
        _fsync_dir(folder)
        return path

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise writers to this registry, across threads and processes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, self.root) from None
        lock = filelock.FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise PerfusionError(
                f"timed out after {LOCK_TIMEOUT:g} s waiting for the registry lock {self.lock_path}; "
                "another perfusion command is writing to the registry: wait for it to finish and retry"
            ) from None
        except OSError as e:
            raise _os_error(e, self.lock_path) from None
        try:
            yield
        finally:
            lock.release()

    # --- concepts --------------------------------------------------------------------------

    def put(self, name: str, data: bytes, force: bool = False) -> Entry:
        """Store concept-file bytes as NAME; refuses to replace a user or bundled concept unless force."""
        validate_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"put() needs the concept file's bytes, not {type(data).__name__}")
        dest = self.user_path(name)
        with self.lock():
            if not force:
                if dest.exists():
                    raise PerfusionError(
                        f"concept {name!r} already exists; use --force to overwrite or choose another --name"
                    )
                if self.bundled_path(name).exists():
                    raise PerfusionError(
                        f"concept {name!r} is a bundled concept; use --force to shadow it with yours or choose another --name"
                    )
            self._atomic_write(dest, bytes(data), check=lambda tmp: _check_concept(tmp, f"the new concept {name!r}"))
        return _entry(dest, "user")

    def get(self, name: str) -> Entry:
        """The user entry NAME, else the bundled one. A damaged file comes back with `error` set."""
        validate_name(name)
        for path, source in ((self.user_path(name), "user"), (self.bundled_path(name), "bundled")):
            if path.is_file():
                return _entry(path, source)
        raise self._not_found(name)

    def _not_found(self, name: str) -> PerfusionError:
        names = sorted({e.name for e in self.entries()})
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return PerfusionError(
            f"no concept named {name!r} in the registry ({self.root}); {hint}(`perfusion list` shows all)"
        )

    def entries(self) -> list[Entry]:
        """Every concept, user and bundled, sorted by name (user first); damaged files flagged, not skipped."""
        user = _scan(self.concepts_dir, "user")
        bundled = _scan(self.bundled_concepts_dir, "bundled")
        if self.bundled_concepts_dir.resolve() == self.concepts_dir.resolve():
            bundled = []
        names = {e.name for e in user}
        for e in bundled:
            e.shadowed = e.name in names
        return sorted(user + bundled, key=lambda e: (e.name, e.source != "user"))

    def remove(self, name: str) -> Path:
        """Delete the user concept NAME (a bundled one it shadowed becomes visible again)."""
        validate_name(name)
        path = self.user_path(name)
        with self.lock():
            if not path.is_file():
                if self.bundled_path(name).is_file():
                    raise PerfusionError(f"{name!r} is bundled and read-only; it cannot be removed")
                raise self._not_found(name)
            try:
                path.unlink()
            except OSError as e:
                raise PerfusionError(
                    f"cannot remove {path}: {e.strerror or e}; check the folder's permissions"
                ) from None
        _fsync_dir(path.parent)
        return path

    def import_file(self, src: Path, name: str | None = None, force: bool = False) -> Entry:
        """Copy a .safetensors concept file into the registry, under its own name or `name`."""
        src = Path(src).expanduser()
        suffix = src.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise PerfusionError(
                f"{src} is a pickle-based {suffix} file; concept files are .safetensors and perfusion never "
                "unpickles anything: import the .safetensors concept file instead"
            )
        if suffix != SUFFIX:
            raise PerfusionError(f"{src} is not a concept file: concept files end in {SUFFIX}")
        if not src.exists():
            raise PerfusionError(f"no file at {src}; check the path")
        if not src.is_file():
            raise PerfusionError(f"{src} is not a file; pass the path of a {SUFFIX} concept file")
        try:
            data = src.read_bytes()
        except OSError as e:
            raise PerfusionError(f"cannot read {src}: {e.strerror or e}; check its permissions") from None
        cs = _check_concept(src, str(src))
        if name is None:
            try:
                target = validate_name(cs.name)
            except PerfusionError as e:
                raise PerfusionError(f"{src} names its concept {cs.name!r}, which cannot be used ({e}); pass --name") from None
        else:
            target = validate_name(name)
        if target != cs.name:
            data = self._renamed(src, cs, target)
        return self.put(target, data, force=force)

    @staticmethod
    def _renamed(src: Path, cs: concept.ConceptSet, new: str) -> bytes:
        """The concept set re-serialised under a new name, in the file's original dtype."""
        try:
            with safe_open(str(src), framework="pt") as f:
                dtype = torch.float32 if f.get_slice("0.i_star").get_dtype() == "F32" else torch.float16
        except (SafetensorError, OSError) as e:
            raise ConceptFileError(f"{src} is damaged ({concept.first_line(e)}); re-export or retrain it") from None
        cs.name = new
        if cs.kind == "concept" and len(cs.concepts) == 1:
            # the member name is the word that stands for the concept in prompts
            cs.concepts[0].name = new
        return concept.to_bytes(cs, dtype=dtype)

    def export(self, name: str, dest: Path, force: bool = False) -> Path:
        """Copy concept NAME to `dest` (a folder -> dest/NAME.safetensors, or a .safetensors path)."""
        entry = self.get(name)
        if entry.error:
            raise ConceptFileError(entry.error)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            target = dest / f"{name}{SUFFIX}"
        else:
            if dest.suffix.lower() != SUFFIX:
                raise PerfusionError(
                    f"cannot export to {dest}: give an existing folder or a file name ending in {SUFFIX}"
                )
            if not dest.parent.is_dir():
                raise PerfusionError(f"cannot export to {dest}: folder {dest.parent} does not exist; create it first")
            target = dest
        if target.exists() and not force:
            raise PerfusionError(f"{target} already exists; use --force to overwrite it or choose another destination")
        try:
            data = entry.path.read_bytes()
        except OSError as e:
            raise PerfusionError(f"cannot read {entry.path}: {e.strerror or e}; check its permissions") from None
        return self._atomic_write(target, data, check=lambda tmp: _check_concept(tmp, f"concept {name!r}"))

    # --- covariances -----------------------------------------------------------------------

    def covariance_path(self, fingerprint: str) -> Path:
        return self.root / "covariances" / f"{validate_fingerprint(fingerprint)}{SUFFIX}"

    def put_covariance(self, fingerprint: str, data: bytes) -> Path:
        """Store an estimated covariance (safetensors bytes) for the text encoder `fingerprint`."""
        path = self.covariance_path(fingerprint)

        def check(tmp: Path) -> None:
            try:
                with safe_open(str(tmp), framework="pt") as f:
                    if not list(f.keys()):
                        raise ValueError("no tensors")
            except (SafetensorError, ValueError, OSError) as e:
                raise PerfusionError(
                    f"the covariance for {fingerprint} is not a readable safetensors file ({concept.first_line(e)}); "
                    "this is a bug, please report it"
                ) from None

        with self.lock():
            return self._atomic_write(path, bytes(data), check=check)
