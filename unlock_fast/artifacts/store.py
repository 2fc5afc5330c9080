"""The on-disk format of every artifact, and the registry that maps a kind to its class.

An artifact is a folder with ``tensors.safetensors`` (the arrays) and ``unlock.json`` (what
they are: kind, format and library versions, and the kind's own metadata). Nothing is
pickled and nothing in a file is ever executed: reading parses JSON and safetensors only,
and any damage is one ValueError that names the file. Writing is atomic (a temporary
folder beside the target, renamed into place) and reproducible (the same artifact gives
the same bytes). Each artifact class registers a loader for its kind, so
:func:`load_artifact` needs to know none of them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from .schema import Meta, TensorSpec, check_tensors

__all__ = [
    "Artifact",
    "StoredArtifact",
    "expect_shape",
    "load_artifact",
    "open_artifact",
    "read_artifact",
    "read_meta",
    "register_kind",
    "registered_kinds",
    "save_artifact",
]

TENSORS_FILE = "tensors.safetensors"
META_FILE = "unlock.json"
FORMAT_VERSION = 1
_FILES = frozenset({TENSORS_FILE, META_FILE})

PathLike = str | os.PathLike[str]


@runtime_checkable
class Artifact(Protocol):
    """Anything that saves itself as an artifact folder."""

    def save_pretrained(self, path: PathLike) -> None: ...


_LOADERS: dict[str, Callable[[PathLike], Artifact]] = {}


def register_kind(kind: str, loader: Callable[[PathLike], Artifact]) -> None:
    """Make :func:`load_artifact` open folders of ``kind`` with ``loader``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty str, got {kind!r}")
    if kind in _LOADERS and _LOADERS[kind] is not loader:
        raise ValueError(f"artifact kind {kind!r} is registered already")
    _LOADERS[kind] = loader


def registered_kinds() -> list[str]:
    """The artifact kinds :func:`load_artifact` can open."""
    return sorted(_LOADERS)


# ----------------------------------------------------------------------------------- writing


def save_artifact(
    path: PathLike, kind: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]
) -> Path:
    """Write ``tensors`` and ``meta`` as the artifact folder ``path``, atomically.

    Both files are written to a temporary folder beside ``path`` and renamed into place, so
    a crash leaves the previous artifact or the new one, never new tensors with old
    metadata. A folder that holds other files too keeps them: there the metadata is moved
    away first, the tensors replaced, and the new metadata moved in last. The same
    artifact always gives the same bytes (tensors in name order, sorted JSON).
    """
    out = Path(path)
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "library_version": __version__}
    doc.update(meta)
    try:  # before anything touches the disk: NaN or a non-JSON value is refused here
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save the {kind} artifact to {out}: metadata {e}") from None
    flat = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; cannot save there")
    # A folder of its own is swapped whole; one with other files (or the working directory,
    # or a link) keeps them.
    own_folder = not out.exists() or (
        not out.is_symlink()
        and set(os.listdir(out)) <= _FILES
        and not Path.cwd().resolve().is_relative_to(out.resolve())
    )
    # A temporary folder on the same file system, so that the renames below are atomic.
    where = out.absolute().parent if own_folder else out
    where.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_folder(where, f".{out.name or 'artifact'}", ".tmp")
    try:
        # One metadata entry: a dict of several is written in a varying order.
        save_file(flat, str(tmp / TENSORS_FILE), metadata={"kind": kind})
        (tmp / META_FILE).write_text(text, encoding="utf-8")
        for name in (TENSORS_FILE, META_FILE, ""):
            _fsync(tmp / name)
        if own_folder:
            _swap_folder(tmp, out)
        else:
            _replace_files(tmp, out)
        _fsync(where)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fresh_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty folder in ``parent`` with an unused random name."""
    while True:
        p = parent / f"{prefix}.{secrets.token_hex(6)}{suffix}"
        try:
            p.mkdir()
        except FileExistsError:
            continue
        return p


def _fsync(path: Path) -> None:
    """Flush a file or folder to the disk (where the platform lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_folder(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``: the old folder (if any) is renamed to a
    backup first and restored if the new one cannot be moved in."""
    if not out.exists():
        os.rename(tmp, out)
        return
    tmp.chmod(stat.S_IMODE(out.stat().st_mode))
    backup = _fresh_folder(tmp.parent, f".{out.name}", ".old")
    backup.rmdir()  # only the name was wanted
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _replace_files(tmp: Path, out: Path) -> None:
    """Replace the artifact files of a folder that holds other files too. The old metadata
    goes first, so the folder never pairs new tensors with it."""
    old_meta = out / META_FILE
    aside = tmp / "previous.json"
    moved = old_meta.exists()
    if moved:
        os.replace(old_meta, aside)
    try:
        os.replace(tmp / TENSORS_FILE, out / TENSORS_FILE)
    except BaseException:
        if moved:  # the old tensors are still there: put their metadata back
            os.replace(aside, old_meta)
        raise
    os.replace(tmp / META_FILE, old_meta)


# ----------------------------------------------------------------------------------- reading


@dataclass
class StoredArtifact:
    """An artifact read from disk, before its kind's checks: the folder, its kind, typed
    access to ``unlock.json`` and the tensors of ``tensors.safetensors``."""

    path: Path
    kind: str
    meta: Meta
    tensors: dict[str, torch.Tensor]

    @property
    def tensor_file(self) -> str:
        return str(self.path / TENSORS_FILE)

    def check_tensors(self, spec: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
        """The tensors, once they are exactly ``spec`` (names, dtypes, shapes, finite)."""
        check_tensors(self.tensor_file, self.tensors, spec)
        return self.tensors


def _artifact_files(src: Path) -> tuple[Path, Path]:
    meta_file, tensor_file = src / META_FILE, src / TENSORS_FILE
    if not src.exists():
        raise FileNotFoundError(f"{src} is not an unlock-fast artifact: it does not exist")
    if not src.is_dir():
        raise ValueError(
            f"{src} is not an unlock-fast artifact: it is a file, not a folder holding "
            f"{META_FILE} and {TENSORS_FILE}"
        )
    have = [f.is_file() for f in (meta_file, tensor_file)]
    if not any(have):
        raise FileNotFoundError(
            f"{src} is not an unlock-fast artifact: expected {META_FILE} and {TENSORS_FILE}"
        )
    if not all(have):
        gone = META_FILE if not have[0] else TENSORS_FILE
        raise ValueError(f"{src / gone} is missing: the artifact in {src} is incomplete")
    return meta_file, tensor_file


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a valid number")


def _read_json(file: Path) -> Meta:
    try:
        doc = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{file} is damaged: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{file} is damaged: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{file} is damaged: {e or 'nested too deeply'}") from None
    except OSError as e:
        raise ValueError(f"{file} cannot be read: {e.strerror or e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(doc).__name__}")
    return Meta(doc, str(file))


def read_meta(path: PathLike, kind: str | None = None) -> tuple[str, Meta]:
    """Read and check an artifact's ``unlock.json`` only: its kind (``kind``, when given),
    its format version, and typed access to the rest."""
    src = Path(path)
    meta_file, _ = _artifact_files(src)
    meta = _read_json(meta_file)
    found = meta.string("kind")
    version = meta.integer("format_version", lo=1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{meta_file} has format version {version}; this library reads up to "
            f"{FORMAT_VERSION}. Upgrade unlock-fast."
        )
    if kind is not None and found != kind:
        raise ValueError(f"{meta_file} holds a {found!r} artifact, expected {kind!r}")
    return found, meta


def _read_tensors(file: Path, kind: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{file} is damaged or not a safetensors file ({text}); nothing was loaded"
        ) from None
    except (OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"{file} cannot be read: {e}") from None
    stored = header.get("kind")
    if stored is not None and stored != kind:
        raise ValueError(f"{file} holds the tensors of a {stored!r} artifact, not {kind!r}")
    return tensors


def open_artifact(path: PathLike, kind: str | None = None) -> StoredArtifact:
    """Read an artifact folder; with ``kind``, refuse any other kind. The kind's own
    checks (:meth:`StoredArtifact.check_tensors`, the :class:`Meta` reads) come after."""
    found, meta = read_meta(path, kind)
    src = Path(path)
    return StoredArtifact(src, found, meta, _read_tensors(src / TENSORS_FILE, found))


def read_artifact(
    path: PathLike, kind: str | None = None
) -> tuple[str, dict[str, torch.Tensor], dict[str, object]]:
    """Read an artifact folder as (kind, tensors, metadata); with ``kind``, refuse any
    other kind."""
    art = open_artifact(path, kind)
    return art.kind, art.tensors, dict(art.meta.doc)


def load_artifact(path: PathLike) -> Artifact:
    """Load whichever artifact ``path`` holds (direction, alignment, statistics or key)."""
    kind, meta = read_meta(path)
    loader = _LOADERS.get(kind)
    if loader is None:
        raise meta.error(f"unknown artifact kind {kind!r}; known kinds: {registered_kinds()}")
    return loader(path)


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse an artifact whose tensor ``name`` does not have ``shape``."""
    if tuple(t.shape) != shape:
        raise ValueError(
            f"artifact tensor {name!r} has shape {tuple(t.shape)}, its metadata says {shape}"
        )
