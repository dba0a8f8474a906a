"""A file-system model registry with immutable versions and atomic aliases.

Layout under the registry root::

    <name>/versions/<n>/model.onnx        the exported model
    <name>/versions/<n>/metadata.json     ModelMetadata
    <name>/versions/<n>/reference.parquet reference sample: features, labels, predictions
    <name>/versions/<n>/<artifact>        anything else (confusion_matrix.png, ...)
    <name>/aliases.json                   {"production": 3, "previous": 2}
    <name>/history.jsonl                  one line per alias change
    <name>/traffic.json                   {"canary_share": 0.2}: the canary alias's share
    <name>/.lock                          writers take it

A version is written into a temporary folder and renamed into place, so a reader sees a whole
version or none; aliases are replaced with a temp file and ``os.replace``, so a reader sees the old
mapping or the new one. Writers serialise on a file lock, so two processes cannot take the same
version number or lose each other's alias change.

No alias moves to a version that fails its check (``modelloop.verify``: loaded, run on its
reference rows, outputs finite and consistent with the sample): :meth:`Registry.promote`,
:meth:`Registry.rollback` raise :class:`BrokenVersion` instead, and ``previous`` only ever names
a version that passed. A version whose files cannot be read raises
:class:`BrokenVersion` too, naming the file, on one line.

Example::

    reg = Registry(settings.registry_dir)
    meta = reg.register(metadata, onnx_bytes, reference=df)
    reg.promote(meta.name, meta.version)
    reg.get("churn", "production").onnx_path
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import ValidationError

from modelloop.schemas import ALIAS_PREVIOUS, ALIAS_PRODUCTION, ModelMetadata

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
REFERENCE_FILE = "reference.parquet"


class RegistryError(Exception):
    """A registry operation could not be done; the message says which model and why."""


class ModelNotFound(RegistryError):
    pass


class BrokenVersion(RegistryError):
    """A version cannot be used: a file of it cannot be read, or it failed its check
    (``modelloop.verify``). The message names the version, the file and the reason, on one line."""

    def __init__(self, label: str, path: Path, reason: str) -> None:
        self.label = label
        self.path = path
        self.reason = " ".join(reason.split())  # one line, whatever a library put in it
        super().__init__(f"{label} is broken: {path}: {self.reason}")


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its folder and metadata."""

    path: Path
    metadata: ModelMetadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def reference_path(self) -> Path:
        return self.path / REFERENCE_FILE

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA_FILE

    def reference(self) -> Any:
        """The reference sample as a pandas DataFrame (features, labels, predictions)."""
        import pandas as pd

        if not self.reference_path.exists():
            raise RegistryError(f"{self.name} v{self.version} has no reference sample")
        return pd.read_parquet(self.reference_path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


class Registry:
    """Immutable, versioned ONNX models with atomic aliases (see the module docstring)."""

    def __init__(self, root: Path | str, lock_timeout_s: float = 60.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    # -- paths and locking -------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise RegistryError(
                f"invalid model name {name!r}: use letters, digits, '_', '-' or '.', up to 64"
            )
        return self.root / name

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        mdir = self._model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(mdir / ".lock"), timeout=self.lock_timeout_s):
            yield mdir

    # -- reading -------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Names of the registered models that have at least one version."""
        if not self.root.exists():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and self.version_numbers(p.name)
        )

    def version_numbers(self, name: str) -> list[int]:
        """The version numbers of ``name``, oldest first (reads no metadata)."""
        vdir = self._model_dir(name) / "versions"
        if not vdir.exists():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())

    def versions(self, name: str) -> list[ModelMetadata]:
        """Every version of ``name``, oldest first; BrokenVersion when one's metadata cannot be
        read (:meth:`version_numbers` and :meth:`get` list around it)."""
        return [self.get(name, v).metadata for v in self.version_numbers(name)]

    def aliases(self, name: str) -> dict[str, int]:
        """The alias mapping of ``name`` (empty when nothing is promoted yet)."""
        path = self._model_dir(name) / "aliases.json"
        try:
            data = json.loads(path.read_bytes())
            return {str(k): int(v) for k, v in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:  # not JSON, or not {alias: number}
            raise RegistryError(f"{path} is not a valid alias mapping: {exc}") from exc

    def resolve(self, name: str, ref: int | str = ALIAS_PRODUCTION) -> int:
        """Turn a version number, a numeric string or an alias into a version number."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            version = int(ref)
            if version not in self.version_numbers(name):
                raise ModelNotFound(f"model {name!r} has no version {version}")
            return version
        aliases = self.aliases(name)
        if ref not in aliases:
            if not self.version_numbers(name):
                raise ModelNotFound(f"model {name!r} is not registered under {self.root}")
            raise ModelNotFound(f"model {name!r} has no alias {ref!r} (aliases: {aliases or 'none'})")
        return aliases[ref]

    def get(self, name: str, ref: int | str = ALIAS_PRODUCTION) -> ModelVersion:
        """A version by number or alias; BrokenVersion when its metadata cannot be read."""
        version = self.resolve(name, ref)
        path = self._model_dir(name) / "versions" / str(version)
        file = path / METADATA_FILE
        label = f"{name} v{version}"
        try:
            meta = ModelMetadata.model_validate_json(file.read_bytes())
        except OSError as exc:
            raise BrokenVersion(label, file, f"cannot be read: {exc.strerror or exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                (".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + e["msg"]
                for e in exc.errors(include_url=False)[:3])
            more = exc.error_count() - 3
            raise BrokenVersion(label, file, f"not valid metadata: {problems}"
                                + (f" (and {more} more)" if more > 0 else "")) from exc
        if (meta.name, meta.version) != (name, version):
            raise BrokenVersion(label, file, f"it describes {meta.name} v{meta.version}")
        return ModelVersion(path=path, metadata=meta)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Alias changes of ``name``, oldest first."""
        path = self._model_dir(name) / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writing -------------------------------------------------------------------------------
    def register(
        self,
        metadata: ModelMetadata,
        onnx_model: bytes | Path,
        reference: Any | None = None,
        artifacts: Mapping[str, bytes | Path] | None = None,
    ) -> ModelMetadata:
        """Store a new immutable version and return its metadata with the version number set.

        The files are written and fsynced in a temporary folder first; the version becomes
        visible in one rename, so a writer killed at any point leaves no partial version.
        """
        name = metadata.name
        model_bytes = onnx_model.read_bytes() if isinstance(onnx_model, Path) else onnx_model
        with self._locked(name) as mdir:
            vroot = mdir / "versions"
            vroot.mkdir(exist_ok=True)
            self._clean_partial(vroot)
            existing = self.version_numbers(name)
            version = (existing[-1] if existing else 0) + 1
            meta = metadata.model_copy(update={"version": version})
            tmp = vroot / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                _write_file(tmp / ONNX_FILE, model_bytes)
                if reference is not None:
                    reference.to_parquet(tmp / REFERENCE_FILE, index=False)
                for fname, content in (artifacts or {}).items():
                    if "/" in fname or fname in (ONNX_FILE, METADATA_FILE, REFERENCE_FILE):
                        raise RegistryError(f"invalid artifact name {fname!r}")
                    data = content.read_bytes() if isinstance(content, Path) else content
                    _write_file(tmp / fname, data)
                meta.lineage.setdefault("onnx_sha256", hashlib.sha256(model_bytes).hexdigest())
                # metadata.json last: its presence marks a complete version folder
                _write_file(tmp / METADATA_FILE, meta.model_dump_json(indent=2).encode())
                _fsync_dir(tmp)
                os.rename(tmp, vroot / str(version))
                _fsync_dir(vroot)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return meta

    @staticmethod
    def _clean_partial(vroot: Path) -> None:
        # Left behind by a writer that died mid-write; we hold the lock, so none is in progress.
        for p in vroot.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _write_aliases(self, mdir: Path, aliases: dict[str, int], event: dict[str, Any]) -> None:
        atomic_write_bytes(mdir / "aliases.json", json.dumps(aliases, sort_keys=True).encode())
        with open(mdir / "history.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **event, "aliases": aliases}) + "\n")

    def _check(self, name: str, version: int, known: dict[int, BrokenVersion | None]) -> BrokenVersion | None:
        """Why ``version`` may not be aliased, or None when it passes its check. Kept in
        ``known``: a version never changes, so one checked before the lock is not checked again
        under it."""
        if version not in known:
            from modelloop.verify import check_version  # onnxruntime, only when an alias moves

            try:
                check_version(self.get(name, version))
                known[version] = None
            except BrokenVersion as exc:
                known[version] = exc
        return known[version]

    def promote(self, name: str, version: int | str, note: dict[str, Any] | None = None,
                expect_production: int | None = None) -> dict[str, int]:
        """Make ``version`` production; the old production becomes ``previous``. Atomic.

        ``version`` is checked first: BrokenVersion, and nothing changes, when it fails. The old
        production becomes ``previous`` only if it passes its check too (otherwise ``previous``
        stays as it was, and the history says why), so a rollback never lands on a broken version.
        The checks run before the lock is taken (a version never changes), so other writers wait
        only for the alias write; should production move meanwhile, the new one is checked under
        the lock. ``note`` goes into the history entry (why it was promoted). With
        ``expect_production``, RegistryError and no change when production is another version by
        the time the lock is held (compare-and-set, for automation that decided on that one).
        """
        target = self.resolve(name, version)
        known: dict[int, BrokenVersion | None] = {}
        problem = self._check(name, target, known)
        if problem is not None:
            raise problem
        current = self.aliases(name).get(ALIAS_PRODUCTION)
        if current is not None and current != target:
            self._check(name, current, known)
        with self._locked(name) as mdir:
            aliases = self.aliases(name)
            current = aliases.get(ALIAS_PRODUCTION)
            if expect_production is not None and current != expect_production:
                raise RegistryError(f"{name}: production is v{current}, not v{expect_production} "
                                    "as expected: nothing promoted")
            if current == target:
                return aliases
            event: dict[str, Any] = {"op": "promote", "version": target, **(note or {})}
            if current is not None:
                problem = self._check(name, current, known)
                if problem is None:
                    aliases[ALIAS_PREVIOUS] = current
                else:
                    event["not_previous"] = str(problem)
                    logger.warning("%s: v%d does not become %r: %s", name, current, ALIAS_PREVIOUS,
                                   problem)
            aliases[ALIAS_PRODUCTION] = target
            self._write_aliases(mdir, aliases, event)
            return aliases

    def rollback(self, name: str) -> dict[str, int]:
        """Swap ``production`` and ``previous``: the previous version serves again. Atomic.

        The previous version is checked first: BrokenVersion, and nothing changes, when it fails.
        The production version becomes ``previous`` only if it passes its check too; otherwise
        ``previous`` is removed. Checked before the lock, as :meth:`promote` does.
        """
        known: dict[int, BrokenVersion | None] = {}
        before = self.aliases(name)
        for alias in (ALIAS_PREVIOUS, ALIAS_PRODUCTION):
            if alias in before:
                self._check(name, before[alias], known)
        with self._locked(name) as mdir:
            aliases = self.aliases(name)
            if ALIAS_PREVIOUS not in aliases or ALIAS_PRODUCTION not in aliases:
                raise RegistryError(f"model {name!r} has no previous version to roll back to")
            target, current = aliases[ALIAS_PREVIOUS], aliases[ALIAS_PRODUCTION]
            problem = self._check(name, target, known)
            if problem is not None:
                raise problem
            event: dict[str, Any] = {"op": "rollback", "version": target}
            aliases[ALIAS_PRODUCTION] = target
            problem = self._check(name, current, known)
            if problem is None:
                aliases[ALIAS_PREVIOUS] = current
            else:
                del aliases[ALIAS_PREVIOUS]
                event["not_previous"] = str(problem)
                logger.warning("%s: v%d does not become %r: %s", name, current, ALIAS_PREVIOUS,
                               problem)
            self._write_aliases(mdir, aliases, event)
            return aliases

    def set_alias(self, name: str, alias: str, version: int | str) -> dict[str, int]:
        """Point ``alias`` (``canary``, ``challenger``, ...; not ``production`` or ``previous``,
        which :meth:`promote` and :meth:`rollback` move) at ``version``, checked first as
        :meth:`promote` checks: BrokenVersion, and nothing changes, when it fails. Atomic."""
        if alias in (ALIAS_PRODUCTION, ALIAS_PREVIOUS) or alias.isdigit() or not _NAME.match(alias):
            raise RegistryError(f"alias {alias!r}: use promote or rollback for {ALIAS_PRODUCTION!r} and "
                                f"{ALIAS_PREVIOUS!r}; other aliases are letters, digits, '_', '-', '.'")
        target = self.resolve(name, version)
        problem = self._check(name, target, {})
        if problem is not None:
            raise problem
        with self._locked(name) as mdir:
            aliases = self.aliases(name)
            if aliases.get(alias) != target:
                aliases[alias] = target
                self._write_aliases(mdir, aliases, {"op": "set_alias", "alias": alias, "version": target})
            return aliases

    def remove_alias(self, name: str, alias: str, note: dict[str, Any] | None = None,
                     expect_version: int | None = None) -> dict[str, int]:
        """Remove ``alias`` (not ``production``); nothing happens when it is not set. Atomic.
        ``note`` goes into the history entry. With ``expect_version``, RegistryError and no
        change when the alias names another version by the time the lock is held."""
        if alias == ALIAS_PRODUCTION:
            raise RegistryError(f"alias {ALIAS_PRODUCTION!r} cannot be removed; promote or roll back")
        with self._locked(name) as mdir:
            aliases = self.aliases(name)
            if expect_version is not None and aliases.get(alias, expect_version) != expect_version:
                raise RegistryError(f"{name}: alias {alias!r} names v{aliases[alias]}, not "
                                    f"v{expect_version} as expected: not removed")
            if alias in aliases:
                del aliases[alias]
                self._write_aliases(mdir, aliases, {"op": "remove_alias", "alias": alias, **(note or {})})
            return aliases

    def canary_share(self, name: str) -> float:
        """The share of requests (0-1) serving sends to the ``canary`` alias of ``name`` (0 when
        never set). Kept in ``traffic.json`` beside the aliases, so it changes without a restart."""
        path = self._model_dir(name) / "traffic.json"
        try:
            share = float(json.loads(path.read_bytes())["canary_share"])
        except FileNotFoundError:
            return 0.0
        except (ValueError, TypeError, KeyError) as exc:
            raise RegistryError(f"{path} is not a valid traffic file: {exc}") from exc
        if not 0.0 <= share <= 1.0:
            raise RegistryError(f"{path}: canary_share {share} is not between 0 and 1")
        return share

    def set_canary_share(self, name: str, share: float) -> None:
        """Set the share of requests (0-1) that go to the ``canary`` alias; logged in the history."""
        if not 0.0 <= share <= 1.0:
            raise RegistryError(f"canary share {share} is not between 0 and 1")
        if not self.version_numbers(name):
            raise ModelNotFound(f"model {name!r} is not registered under {self.root}")
        with self._locked(name) as mdir:
            atomic_write_bytes(mdir / "traffic.json", json.dumps({"canary_share": share}).encode())
            with open(mdir / "history.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), "op": "canary_share", "share": share}) + "\n")

    def alias_stamp(self, name: str) -> int:
        """A cheap value that changes whenever the aliases of ``name`` change (for pollers)."""
        try:
            st = os.stat(self._model_dir(name) / "aliases.json")
        except FileNotFoundError:
            return 0
        return st.st_mtime_ns ^ st.st_ino
