"""Damaged, hostile and half-written artifacts: one ValueError naming the file, nothing in a
file executed, finite values only, atomic and byte-identical writes."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unlock_fast import (
    Alignment,
    AlignmentStats,
    Direction,
    ModelInfo,
    SteeringKey,
    load_artifact,
)
from unlock_fast.artifacts import store
from unlock_fast.stats import Moments

pytestmark = pytest.mark.usefixtures("one_thread")

META, TENSORS = "unlock.json", "tensors.safetensors"
SOURCE = ModelInfo("src", "fs", 6, 3)
TARGET = ModelInfo("tgt", "ft", 8, 4)
KINDS = ["steering_key", "direction", "alignment", "alignment_centered", "alignment_stats"]
Thing = SteeringKey | Direction | Alignment | AlignmentStats
LOADERS: dict[str, Callable[[Path], object]] = {
    "steering_key": SteeringKey.from_pretrained,
    "direction": Direction.from_pretrained,
    "alignment": Alignment.from_pretrained,
    "alignment_centered": Alignment.from_pretrained,
    "alignment_stats": AlignmentStats.from_pretrained,
}


def make_stats(seed: int = 0) -> AlignmentStats:
    g = torch.Generator().manual_seed(seed)
    moments = []
    for _ in range(2):
        m = Moments(SOURCE.hidden_size, TARGET.hidden_size)
        m.update(torch.randn(10, 6, generator=g) + 3, torch.randn(10, 8, generator=g))
        moments.append(m)
    return AlignmentStats([(0, 1), (2, 3)], moments, SOURCE, TARGET, num_prompts=10)


def make(kind: str, seed: int = 0) -> Thing:
    g = torch.Generator().manual_seed(seed)
    if kind == "steering_key":
        return SteeringKey(torch.randn(2, 8, generator=g), [1, 3], TARGET, {"kind": "test"})
    if kind == "direction":
        return Direction(torch.randn(2, 6, generator=g), [0, 2], "mean", 5, SOURCE)
    stats = make_stats(seed)
    if kind == "alignment_stats":
        return stats
    return stats.fit(rank=3, centered=kind == "alignment_centered")


def saved(kind: str, folder: Path, seed: int = 0) -> Path:
    make(kind, seed).save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------- ways to damage


def edit_meta(folder: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads((folder / META).read_text())
    change(doc)
    (folder / META).write_text(json.dumps(doc))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / TENSORS))
    change(tensors)
    save_file(tensors, str(folder / TENSORS))


class _Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for a hostile file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (self.marker,))


def _pickle(folder: Path) -> None:
    (folder / TENSORS).write_bytes(pickle.dumps(_Payload(str(folder.parent / "pwned"))))


def _torch_save(folder: Path) -> None:
    torch.save({"vectors": torch.zeros(2, 8)}, folder / TENSORS)


def _cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: keep(len(data))])

    return damage


def _overwrite_header(folder: Path) -> None:
    data = bytearray((folder / TENSORS).read_bytes())
    data[9:31] = b"#" * 22
    (folder / TENSORS).write_bytes(bytes(data))


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def _nan_constant(folder: Path) -> None:
    text = (folder / META).read_text().replace('"format_version": 1', '"format_version": NaN')
    (folder / META).write_text(text)


def _set(key: str, value: object) -> Callable[[Path], None]:
    """Set the entry ``key`` (``a.b`` for nested, ``a[0].b`` in lists) of the metadata."""

    def change(doc: dict) -> None:
        *path, last = key.replace("[", ".").replace("]", "").split(".")
        node = doc
        for part in path:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return lambda folder: edit_meta(folder, change)


_DELETE = object()


def _first_tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        name = sorted(tensors)[0]
        tensors[name] = change(tensors[name])

    return lambda folder: edit_tensors(folder, edit)


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[-1] = value
        return t

    return change


def _drop_tensor(folder: Path) -> None:
    edit_tensors(folder, lambda t: t.pop(sorted(t)[-1]))


def _extra_tensor(folder: Path) -> None:
    edit_tensors(folder, lambda t: t.update(evil=torch.zeros(1)))


def _header_kind(folder: Path) -> None:
    save_file(load_file(str(folder / TENSORS)), str(folder / TENSORS), metadata={"kind": "x"})


def _other_kind(folder: Path) -> None:
    kind = json.loads((folder / META).read_text())["kind"]
    _set("kind", "direction" if kind == "steering_key" else "steering_key")(folder)


def _model_key(kind: str) -> str:
    return "model" if kind in ("steering_key", "direction") else "source"


def _wider_model(folder: Path) -> None:
    doc = json.loads((folder / META).read_text())
    key = "model" if "model" in doc else "source"
    doc[key]["hidden_size"] += 1
    (folder / META).write_text(json.dumps(doc))


def _flip_centered(doc: dict) -> None:
    if "centered" in doc:  # the means are then missing, or unexpected
        doc["centered"] = not doc["centered"]
    else:  # no such flag: the same mismatch, tensors of another shape
        doc["model" if "model" in doc else "target"]["hidden_size"] += 1


# (name, damage, the file the error must name)
GENERIC: list[tuple[str, Callable[[Path], None], str]] = [
    ("pickle renamed", _pickle, TENSORS),
    ("torch.save renamed", _torch_save, TENSORS),
    ("truncated tensors", _cut(TENSORS, lambda n: n - 7), TENSORS),
    ("truncated header", _cut(TENSORS, lambda _: 20), TENSORS),
    ("empty tensors", _write(TENSORS, b""), TENSORS),
    ("corrupt header", _overwrite_header, TENSORS),
    ("corrupt json", _write(META, b'{"kind": '), META),
    ("truncated json", _cut(META, lambda n: n // 2), META),
    ("json list", _write(META, b"[1, 2]"), META),
    ("json not utf-8", _write(META, b'{"kind": "\xff\xfe"}'), META),
    ("json NaN", _nan_constant, META),
    ("no tensors file", lambda f: (f / TENSORS).unlink(), TENSORS),
    ("no json file", lambda f: (f / META).unlink(), META),
    ("no kind", _set("kind", _DELETE), META),
    ("kind not a string", _set("kind", 3), META),
    ("other kind", _other_kind, ""),  # unlock.json, or the tensors that do not match it
    ("unknown kind", _set("kind", "mystery"), META),
    ("future format", _set("format_version", 99), META),
    ("format not an int", _set("format_version", "1"), META),
    ("no format", _set("format_version", _DELETE), META),
    ("tensor missing", _drop_tensor, TENSORS),
    ("extra tensor", _extra_tensor, TENSORS),
    ("wrong dtype", _first_tensor(lambda t: t.to(torch.int32)), TENSORS),
    ("wrong shape", _first_tensor(lambda t: t[:-1]), TENSORS),
    ("NaN", _first_tensor(_poison(float("nan"))), TENSORS),
    ("Inf", _first_tensor(_poison(float("-inf"))), TENSORS),
    ("tensors of another kind", _header_kind, TENSORS),
    ("model wider than tensors", _wider_model, TENSORS),
    ("centred flag flipped", lambda f: edit_meta(f, _flip_centered), TENSORS),
]

_VECTORS = [
    ("layers missing", _set("layers", _DELETE)),
    ("layers a string", _set("layers", "1,3")),
    ("layers of bools", _set("layers", [True, 3])),
    ("model missing", _set("model", _DELETE)),
    ("model a list", _set("model", [8, 4])),
    ("hidden size a string", _set("model.hidden_size", "8")),
    ("hidden size zero", _set("model.hidden_size", 0)),
    ("layers a float", _set("model.num_layers", 4.0)),
]
_MAPS = [
    ("layer map missing", _set("layer_map", _DELETE)),
    ("layer map of triples", _set("layer_map", [[0, 1, 2], [2, 3, 1]])),
    ("target layer twice", _set("layer_map", [[0, 1], [2, 1]])),
    ("source layer out of range", _set("layer_map", [[0, 1], [3, 3]])),
    ("target layer negative", _set("layer_map", [[0, -1], [2, 3]])),
    ("token level not a bool", _set("token_level", 1)),
    ("num_prompts negative", _set("num_prompts", -1)),
    ("source missing", _set("source", _DELETE)),
    ("target num_layers a string", _set("target.num_layers", "4")),
]
_ALIGNMENT = [
    ("rank zero", _set("rank", 0)),
    ("k too large", _set("k", 4)),
    ("k a string", _set("k", "3")),
    ("num_rows negative", _set("num_rows", -1)),
    ("num_rows below k", _set("num_rows", 2)),
    ("ridge negative", _set("ridge", -1.0)),
    ("ridge a string", _set("ridge", "0")),
    ("centered a string", _set("centered", "yes")),
]
_STATS = [
    ("moments missing", _set("moments", _DELETE)),
    ("moments an object", _set("moments", {"a": 1})),
    ("one moments entry", lambda f: edit_meta(f, lambda d: d["moments"].pop())),
    ("dim_x wrong", _set("moments[0].dim_x", 7)),
    ("rows negative", _set("moments[1].rows", -1)),
    ("rows differ", _set("moments[1].rows", 3)),
    ("count a string", _set("moments[0].count", "10")),
    ("unexpected entry", _set("moments[0].evil", 1)),
    ("count missing", _set("moments[0].count", _DELETE)),
]
SPECIFIC: list[tuple[str, str, Callable[[Path], None]]] = [
    *[("steering_key", n, d) for n, d in _VECTORS],
    ("steering_key", "layer twice", _set("layers", [1, 1])),
    ("steering_key", "layer out of range", _set("layers", [1, 4])),
    ("steering_key", "origin a list", _set("origin", [1])),
    *[("direction", n, d) for n, d in _VECTORS],
    ("direction", "layer twice", _set("layers", [2, 2])),
    ("direction", "layer out of range", _set("layers", [0, 3])),
    ("direction", "method missing", _set("method", _DELETE)),
    ("direction", "method a number", _set("method", 5)),
    ("direction", "num_prompts negative", _set("num_prompts", -5)),
    ("direction", "num_prompts a float", _set("num_prompts", 2.5)),
    ("direction", "unlocked model a list", _set("unlocked_model", [1])),
    *[("alignment", n, d) for n, d in _MAPS + _ALIGNMENT],
    *[("alignment_stats", n, d) for n, d in _MAPS + _STATS],
]


def _refused(kind: str, folder: Path, file: str) -> None:
    for load in (LOADERS[kind], load_artifact):
        with pytest.raises(ValueError, match=r".") as e:
            load(folder)
        msg = str(e.value)
        assert str(folder) in msg, msg
        assert file in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("damage", "file"), [pytest.param(d, f, id=n) for n, d, f in GENERIC])
def test_damaged_artifact_is_one_value_error(
    kind: str, damage: Callable[[Path], None], file: str, tmp_path: Path
) -> None:
    folder = saved(kind, tmp_path / "art")
    damage(folder)
    _refused(kind, folder, file)
    assert not (tmp_path / "pwned").exists(), "the file's content was executed"


@pytest.mark.parametrize(
    ("kind", "damage"), [pytest.param(k, d, id=f"{k}-{n}") for k, n, d in SPECIFIC]
)
def test_bad_metadata_entry_is_refused(
    kind: str, damage: Callable[[Path], None], tmp_path: Path
) -> None:
    folder = saved(kind, tmp_path / "art")
    damage(folder)
    _refused(kind, folder, META)


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        load_artifact(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        SteeringKey.from_pretrained(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an unlock-fast artifact"):
        load_artifact(tmp_path / "empty")


def test_nothing_is_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("an artifact was unpickled")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for kind in KINDS:
        saved(kind, tmp_path / kind)
        assert isinstance(LOADERS[kind](tmp_path / kind), type(make(kind)))


# ----------------------------------------------------------------- the same checks in memory


@pytest.mark.parametrize("cls", [SteeringKey, Direction])
def test_vectors_are_checked_in_memory(cls: type[SteeringKey] | type[Direction]) -> None:
    def build(vectors: torch.Tensor, layers: list[int]) -> object:
        if cls is SteeringKey:
            return SteeringKey(vectors, layers, TARGET)
        return Direction(vectors, layers, "mean", 3, TARGET)

    ok = torch.randn(2, 8)
    build(ok, [0, 3])
    with pytest.raises(ValueError, match="more than once"):
        build(ok, [2, 2])
    with pytest.raises(ValueError, match="out of range"):
        build(ok, [0, 4])
    for bad in (float("nan"), float("inf")):
        v = ok.clone()
        v[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            build(v, [0, 1])
    with pytest.raises(TypeError, match="floating-point"):
        build(torch.ones(2, 8, dtype=torch.int64), [0, 1])
    with pytest.raises(TypeError, match="ints"):
        build(ok, [0, True])  # type: ignore[list-item]


def test_alignment_is_checked_in_memory() -> None:
    a = make("alignment")
    assert isinstance(a, Alignment)

    def again(**changes: object) -> Alignment:
        fields = {f: getattr(a, f) for f in a.__dataclass_fields__ if f != "_index"}
        fields.update(changes)
        return Alignment(**fields)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="target layers \\[1\\] appear more than once"):
        again(layer_map=[(0, 1), (2, 1)])
    with pytest.raises(ValueError, match="out of range"):
        again(layer_map=[(0, 1), (5, 3)])
    core = a.core.clone()
    core[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        again(core=core)
    with pytest.raises(ValueError, match="num_rows"):
        again(num_rows=-1)


# --------------------------------------------------------------------------- atomic writes


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind", ["steering_key", "alignment_stats"])
@pytest.mark.parametrize("crash", ["tensors", "metadata", "rename"])
def test_crash_while_saving_keeps_the_previous_artifact(
    kind: str, crash: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved(kind, tmp_path / "art", seed=0)
    before = snapshot(folder)
    newer = make(kind, seed=1)

    if crash == "tensors":
        real = store.save_file

        def half_written(tensors: dict, filename: str, metadata: dict | None = None) -> None:
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError("no space left on device")

        monkeypatch.setattr(store, "save_file", half_written)
    elif crash == "metadata":

        def no_text(self: Path, *_: object, **__: object) -> int:
            self.write_bytes(b'{"kind": ')
            raise OSError("no space left on device")

        monkeypatch.setattr(Path, "write_text", no_text)
    else:
        real_rename = os.rename

        def no_second_rename(src: str | Path, dst: str | Path) -> None:
            if Path(src).name.endswith(".tmp"):
                raise OSError("interrupted")
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", no_second_rename)
    with pytest.raises(OSError, match="no space|interrupted"):
        newer.save_pretrained(folder)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert _leftovers(tmp_path) == ["art"], "a temporary folder was left behind"
    assert isinstance(LOADERS[kind](folder), type(newer))


def test_folder_with_other_files_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved("alignment", tmp_path / "out", seed=0)
    (folder / "diagnostics.json").write_text("{}")
    before = snapshot(folder)
    real_replace = os.replace

    def no_tensors(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == TENSORS:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_tensors)
    with pytest.raises(OSError, match="interrupted"):
        make("alignment", seed=1).save_pretrained(folder)
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert _leftovers(tmp_path) == ["out"]
    newer = make("alignment", seed=1)
    assert isinstance(newer, Alignment)
    newer.save_pretrained(folder)
    assert _leftovers(folder) == ["diagnostics.json", TENSORS, META]
    assert torch.equal(Alignment.from_pretrained(folder).core, newer.core)


def test_save_replaces_and_refuses_before_writing(tmp_path: Path) -> None:
    folder = saved("steering_key", tmp_path / "k", seed=0)
    newer = make("steering_key", seed=1)
    assert isinstance(newer, SteeringKey)
    newer.save_pretrained(folder)
    assert torch.equal(SteeringKey.from_pretrained(folder).vectors, newer.vectors)
    assert _leftovers(tmp_path) == ["k"]
    bad = SteeringKey(newer.vectors, newer.layers, TARGET, {"alpha": float("nan")})
    with pytest.raises(ValueError, match="metadata"):
        bad.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        newer.save_pretrained(tmp_path / "file")


# -------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("kind", KINDS)
def test_saving_twice_gives_identical_bytes(kind: str, tmp_path: Path) -> None:
    thing = make(kind)
    copies = []
    for i in range(6):
        thing.save_pretrained(tmp_path / f"c{i}")
        copies.append(snapshot(tmp_path / f"c{i}"))
    assert all(c == copies[0] for c in copies)
    reloaded = LOADERS[kind](tmp_path / "c0")
    assert isinstance(reloaded, type(thing))
    reloaded.save_pretrained(tmp_path / "again")
    assert snapshot(tmp_path / "again") == copies[0]
