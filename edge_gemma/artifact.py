"""The exported artifact: one directory, one `manifest.json`, checksums for every file, written atomically.

Layout (schema version 1)::

    ARTIFACT/
      manifest.json        schema version, model config, quant manifest, tokenizer, backends, caches, PLE layout,
                           fidelity figures, and the sha256 + size of every other file
      ple.bin              the Per-Layer-Embedding table, raw and page-aligned, memory-mapped by every backend
      tokenizer/...        tokenizer.json (or tokenizer.model), tokenizer_config.json, chat_template.jinja
      onnx/ executorch/ litert/    one folder per backend

Writing goes to a temporary sibling directory that is renamed into place only when every file and the manifest are
complete, so an export killed half-way leaves no OUT directory (and an existing OUT is replaced only on request).
Reading validates the schema version and that every file the manifest lists exists with its recorded size;
`verify()` also recomputes every sha256 (`edge-gemma inspect --verify`). `check_sha256(prefixes)` is what opening a
model does: the files it is about to use are hashed once (streamed, their pages dropped from the cache afterwards)
and the result is remembered in a per-user cache (`verified_cache_path()`) keyed by path, inode, size and
mtime_ns, so a later run costs one `stat` per file.

No torch here: a device reads artifacts with numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PAGE = 4096  # alignment of raw tensor files such as ple.bin, so they can be memory-mapped page by page

__all__ = ["Artifact", "ArtifactError", "ArtifactWriter", "BackendEntry", "SCHEMA_VERSION", "sha256_file"]


class ArtifactError(ValueError):
    """An artifact that cannot be used: the message names the file and what is wrong."""


def sha256_file(path: str | Path, chunk: int = 1 << 22, *, drop_pages: bool = False) -> str:
    """sha256 of a file, streamed; `drop_pages` asks the kernel to forget the pages read (posix_fadvise DONTNEED),
    so hashing a table read on demand (ple.bin) does not leave it in the page cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        if drop_pages and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
    return h.hexdigest()


def verified_cache_path() -> Path:
    """The per-user record of files whose sha256 was checked: `$EDGE_GEMMA_VERIFIED_CACHE`, else
    `$XDG_CACHE_HOME/edge-gemma/verified.json` (`~/.cache/...`)."""
    if os.environ.get("EDGE_GEMMA_VERIFIED_CACHE"):
        return Path(os.environ["EDGE_GEMMA_VERIFIED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-gemma" / "verified.json"


def _read_verified(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: everything is hashed again
    return data if isinstance(data, dict) else {}


def _write_verified(path: Path, data: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: verification still happened, it is just not remembered
        log.debug("could not record verified files in %s: %s", path, exc)


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    path: str  # relative to the artifact root, '/'-separated
    size: int
    sha256: str


class ArtifactWriter:
    """Builds an artifact in a temporary directory next to `out`; `commit()` renames it into place.

    Use as a context manager: leaving the block with an exception removes the temporary directory, so nothing
    half-written is ever visible at `out`::

        with ArtifactWriter(out, force=False) as w:
            w.write_bytes("onnx/decoder.onnx", data)       # or w.path("onnx/x.onnx") and write it yourself
            w.manifest["backends"] = {...}
        # committed here
    """

    def __init__(self, out: str | Path, *, force: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not force:
            raise ArtifactError(f"{self.out}: already exists; pass --force to replace it")
        if self.out.exists() and not _replaceable(self.out):
            raise ArtifactError(f"{self.out}: --force replaces only an artifact (manifest.json), a quantized checkpoint "
                                "(quant_manifest.json) or an empty folder; this is none of them, so nothing was "
                                "touched: choose another --out or remove it yourself")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.force = force
        _remove_stale_temporaries(self.out)
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        self.manifest: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        self._committed = False

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._committed:
            self.commit()
        elif not self._committed:
            shutil.rmtree(self.root, ignore_errors=True)

    def path(self, rel: str) -> Path:
        """Absolute path for a file inside the artifact (parent folders are created)."""
        p = self.root / rel
        if self.root not in p.resolve().parents:
            raise ArtifactError(f"{rel}: artifact file paths must stay inside the artifact")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_bytes(self, rel: str, data: bytes) -> Path:
        p = self.path(rel)
        p.write_bytes(data)
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def copy_in(self, src: str | Path, rel: str) -> Path:
        p = self.path(rel)
        shutil.copyfile(src, p)
        return p

    def _files(self) -> Iterator[Path]:
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                yield p

    def commit(self) -> Path:
        """Checksum every file, write the manifest last, then rename the directory into place."""
        files = []
        for p in self._files():
            rel = p.relative_to(self.root).as_posix()
            files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        self.manifest["files"] = files
        tmp_manifest = self.root / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_manifest, self.root / MANIFEST)
        for p in [self.root, *[q for q in self.root.rglob("*") if q.is_dir()]]:
            _fsync_dir(p)
        if self.out.exists():
            if not self.force:
                raise ArtifactError(f"{self.out}: appeared while exporting; pass --force to replace it")
            # Move the old artifact aside first, so a crash between the two renames still leaves one whole artifact.
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "a")
            os.replace(self.root, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.root, self.out)
        _fsync_dir(self.out.parent)
        self._committed = True
        log.info("wrote artifact %s (%d files)", self.out, len(files))
        return self.out


def _replaceable(out: Path) -> bool:
    """Whether `--force` may replace `out`: a folder that is ours (an artifact or a quantized checkpoint) or empty."""
    if not out.is_dir() or out.is_symlink():
        return False
    return (out / "manifest.json").is_file() or (out / "quant_manifest.json").is_file() or not any(out.iterdir())


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary directories left by earlier exports of `out` that were killed (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*-*"):
        try:
            pid = int(tmp.name[len(f".{out.name}.tmp-"):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed export (pid %d)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _fsync_dir(path: Path) -> None:
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


class Artifact:
    """A validated, read-only view of an artifact directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{self.root}: not an edge-gemma artifact (no {MANIFEST})")
        if mpath.is_symlink():
            raise ArtifactError(f"{mpath}: a symlink; an artifact holds its own files")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from None
        if not isinstance(self.manifest, dict):
            raise ArtifactError(f"{mpath}: expected a JSON object, found {type(self.manifest).__name__}")
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{mpath}: schema_version {version!r} is not supported by this edge-gemma "
                f"(it reads version {SCHEMA_VERSION}); re-export the checkpoint or upgrade edge-gemma"
            )
        entries = self.manifest.get("files", [])
        if not isinstance(entries, list):
            raise ArtifactError(f"{mpath}: files must be a list, found {type(entries).__name__}")
        self.files = {}
        for n, e in enumerate(entries):
            try:
                entry = FileEntry(**e)
                if not (isinstance(entry.path, str) and isinstance(entry.size, int) and isinstance(entry.sha256, str)):
                    raise TypeError("path, size and sha256 must be a string, an integer and a string")
            except TypeError as exc:
                raise ArtifactError(f"{mpath}: files[{n}] is malformed ({exc}); expected "
                                    "{\"path\": ..., \"size\": ..., \"sha256\": ...}") from None
            self._inside(entry.path, f"files[{n}].path")
            self.files[entry.path] = entry
        for field in (("tokenizer", "dir"), ("ple", "file")):
            section = self.manifest.get(field[0])
            if isinstance(section, dict) and field[1] in section:
                self._inside(section[field[1]], ".".join(field))
        for entry in self.files.values():
            p = self.root / entry.path
            if not p.is_file():
                raise ArtifactError(f"{p}: listed in {MANIFEST} but missing")
            if p.stat().st_size != entry.size:
                raise ArtifactError(f"{p}: size {p.stat().st_size} differs from the manifest's {entry.size}")

    def _inside(self, rel: Any, field: str) -> Path:
        """`root / rel` for a manifest path that is relative, normalized and has no symlink below the root (an
        artifact is downloaded like a checkpoint: a path out of it, or a link, would make it read other files)."""
        where = f"{self.root / MANIFEST}: {field}"
        if not isinstance(rel, str) or not rel:
            raise ArtifactError(f"{where} must be a non-empty relative path, got {rel!r}")
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or any(part in ("", ".", "..") for part in parts) \
                or Path(rel).is_absolute():
            raise ArtifactError(f"{where} {rel!r} is not a path inside the artifact (absolute, or with '..', '.' or "
                                "empty parts)")
        p = self.root
        for part in parts:
            p = p / part
            if p.is_symlink():
                raise ArtifactError(f"{p}: a symlink ({field}); an artifact holds its own files")
        return self.root / rel

    def folder(self, rel: str, field: str = "folder") -> Path:
        """A folder of the artifact named by the manifest (e.g. `tokenizer.dir`), checked as every manifest path
        is; none of the files in it may be a symlink either."""
        p = self._inside(rel, field)
        if p.is_dir():
            for child in p.iterdir():
                if child.is_symlink():
                    raise ArtifactError(f"{child}: a symlink ({field}); an artifact holds its own files")
        return p

    def path(self, rel: str) -> Path:
        if rel not in self.files:
            raise ArtifactError(f"{self.root}: {rel} is not part of this artifact")
        return self.root / rel

    def verify(self) -> list[str]:
        """Recompute every checksum; returns the list of files that differ (empty when the artifact is intact)."""
        bad = []
        for entry in self.files.values():
            if sha256_file(self.root / entry.path) != entry.sha256:
                bad.append(entry.path)
        return bad

    def check_sha256(self, prefixes: list[str] | tuple[str, ...], *, cache: Path | None = None) -> int:
        """Refuse to go on unless every file whose path is one of `prefixes` or lies under one of them (a folder)
        has its manifest sha256. Files verified before, unchanged since (same inode, size and mtime_ns, per the
        per-user cache), are not hashed again. Returns how many files were hashed."""
        cache = cache or verified_cache_path()
        record = _read_verified(cache)
        hashed = 0
        for entry in self.files.values():
            if not any(entry.path == x or entry.path.startswith(x.rstrip("/") + "/") for x in prefixes):
                continue
            p = (self.root / entry.path).resolve()
            st = p.stat()
            key, stamp = str(p), [st.st_ino, st.st_size, st.st_mtime_ns, entry.sha256]
            if record.get(key) == stamp:
                continue
            log.info("checking the sha256 of %s (%.1f MiB; once per file)", entry.path, st.st_size / 2**20)
            hashed += 1
            if sha256_file(p, drop_pages=True) != entry.sha256:
                record.pop(key, None)
                _write_verified(cache, record)
                raise ArtifactError(f"{p}: its sha256 differs from the one in {MANIFEST}: the file is damaged or was "
                                    "changed after export; export the artifact again (edge-gemma inspect --verify "
                                    "lists every such file)")
            record[key] = stamp
        if hashed:
            _write_verified(cache, record)
        return hashed

    @property
    def backends(self) -> dict[str, Any]:
        return self.manifest.get("backends", {})

    def backend_entry(self, name: str, *, absent: type[Exception] = ArtifactError) -> "BackendEntry":
        """The manifest entry of backend `name`, parsed (`BackendEntry`); `absent` is raised when the artifact has no
        such backend, `ArtifactError` when the entry is malformed."""
        if not self.backends.get(name):
            raise absent(f"{self.root}: this artifact has no {name} backend (manifest backends: "
                         f"{sorted(self.backends)})")
        return BackendEntry.parse(self, name)


@dataclass(frozen=True)
class BackendEntry:
    """The fields every backend's manifest entry has, typed; `raw` keeps the whole entry for backend-specific keys."""

    name: str
    files: dict[str, Any]
    context: int
    max_prefill_chunk: int
    hidden_size: int
    vocab_size: int
    ple_layers: int
    ple_dim: int
    raw: dict[str, Any]

    @classmethod
    def parse(cls, artifact: "Artifact", name: str) -> "BackendEntry":
        entry = artifact.backends.get(name)
        try:
            return cls(name=name, files=dict(entry["files"]), context=int(entry["context"]),
                       max_prefill_chunk=int(entry["max_prefill_chunk"]), hidden_size=int(entry["hidden_size"]),
                       vocab_size=int(entry["vocab_size"]), ple_layers=int(entry["ple"]["num_layers"]),
                       ple_dim=int(entry["ple"]["dim"]), raw=entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{artifact.root}: manifest backends.{name} is malformed ({exc!r})") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def require(self, artifact: "Artifact", key: str) -> Any:
        """A backend-specific key that must be present (the same error as a malformed common field)."""
        if key not in self.raw:
            raise ArtifactError(f"{artifact.root}: manifest backends.{self.name} is malformed (no {key!r})")
        return self.raw[key]
