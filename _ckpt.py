"""
Checkpoint files: reading and writing weights, and finding a model's files.

Every pretrained model Seal uses (the GPT-2 decoder, the HuBERT encoder, the tiny models of the micro
world) is a directory in the Hugging Face format: `config.json` plus the weights, either
`model.safetensors` or the older `pytorch_model.bin`. This section turns a name such as
"openai-community/gpt2" or a path such as "./tiny-lm" into those files, and the files into a state dict.

safetensors is a deliberately simple format:

    [8 bytes: N, a little-endian u64] [N bytes: a JSON header] [the data buffer]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end)}, byte offsets into
the data buffer (row-major, little-endian), plus an optional "__metadata__" of string pairs. Reading it
runs no code, which is why it replaced pickled `.bin` files. We still read `.bin` files, but only through
`torch.load(weights_only=True)`, whose restricted unpickler refuses anything but tensors and containers.

Where files come from (`resolve_files`), in this order:
  1. a local directory, or a bare name under the Seal cache ($SEAL_CACHE, default ~/.cache/seal);
  2. an existing Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub),
     so nothing is downloaded twice (and nothing at all if transformers already fetched the model);
  3. a download from $HF_ENDPOINT (default https://huggingface.co) into that same cache layout:
        models--{org}--{name}/blobs/<etag>               file contents, named by their hash
        models--{org}--{name}/snapshots/<commit>/<file>  relative symlinks into blobs/, one folder per commit
        models--{org}--{name}/refs/<revision>            the commit that a branch (e.g. main) pointed to
HF_HUB_OFFLINE=1 forbids step 3: nothing touches the network.
Downloads resume partial files (`blobs/<etag>.incomplete`) with an HTTP Range request, check the size,
check the sha256 of large ("LFS") files against their etag, time out after $SEAL_HTTP_TIMEOUT seconds
(default 10) and retry transient failures $SEAL_HTTP_RETRIES times (default 4) with exponential backoff.
"""
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from tqdm import tqdm


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read safely: malformed safetensors, unsafe pickle, bad JSON."""


class CheckpointNotFoundError(FileNotFoundError):
    """The files a model needs are in none of the places looked; the message lists them and the places."""


class DownloadError(OSError):
    """A download failed after all retries, or its bytes do not match the size or hash the hub announced."""


# ---------------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The reference reader's limit: no real model needs a 100 MB header, so a bigger one is corruption
# (or an attempt to make us allocate gigabytes).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class _TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data buffer, end exclusive
    end: int


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_safetensors_header(f, path: Path, file_size: int) -> tuple[dict, int]:
    """Reads and parses the JSON header; returns it with the file offset where the data buffer starts."""
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes is too short for a safetensors file "
                              f"(expected at least the 8-byte header length)")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n:,} bytes exceeds the limit of {MAX_HEADER_BYTES:,} "
                              f"(corrupt, or not a safetensors file)")
    if 8 + n > file_size:
        raise CheckpointError(f"{path}: header runs past the end of the file (expected 8 + {n:,} header "
                              f"bytes <= file size, got a file of {file_size:,} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _check_safetensors_layout(path: Path, header: dict, data_len: int) -> list[_TensorEntry]:
    """Validates every header entry; returns them sorted by offset. They must tile the data buffer exactly."""
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {str(metadata)[:200]}")
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor '{key}'"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: expected {{dtype, shape, data_offsets}}, got {str(info)[:200]}")
        dtype_name = info.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {dtype_name!r} "
                                  f"(expected one of {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: dtype {dtype_name} and shape {shape} need {nbytes:,} bytes "
                                  f"(prod(shape) * itemsize), but data_offsets [{begin}, {end}] hold {end - begin:,}")
        entries.append(_TensorEntry(key, dtype, tuple(shape), begin, end))
    # Sorted by offset, each tensor must start exactly where the previous one ended, starting at 0:
    # a gap would hide unread bytes, an overlap would alias two tensors.
    entries.sort(key=lambda e: (e.begin, e.end))
    expected_begin, previous = 0, "the start of the data buffer"
    for e in entries:
        if e.begin != expected_begin:
            problem = "overlap" if e.begin < expected_begin else "leave a gap after"
            raise CheckpointError(f"{path}: tensor '{e.key}': data_offsets [{e.begin}, {e.end}] {problem} "
                                  f"{previous} (expected begin {expected_begin}, got {e.begin})")
        if e.end > data_len:
            raise CheckpointError(f"{path}: tensor '{e.key}': data_offsets [{e.begin}, {e.end}] are out of range "
                                  f"(expected end <= data buffer length {data_len:,}, got {e.end:,})")
        expected_begin, previous = e.end, f"tensor '{e.key}'"
    if expected_begin != data_len:
        raise CheckpointError(f"{path}: the data buffer is {data_len:,} bytes but the tensors cover "
                              f"{expected_begin:,} (expected equal; the file has unreferenced trailing bytes)")
    return entries


def _readinto_exactly(f, buffer: np.ndarray, path: Path, key: str) -> None:
    view, done = memoryview(buffer), 0
    while done < len(view):  # a single read may return less than asked (e.g. over 2 GiB on Linux)
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: tensor '{key}': file ended early "
                                  f"(expected {len(view):,} bytes, got {done:,}); was it modified while reading?")
        done += n


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor, as a uint8 numpy array sharing its memory."""
    return t.reshape(-1).view(torch.uint8).numpy()


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a .safetensors file into CPU tensors, after checking the header against the file."""
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, data_start = _read_safetensors_header(f, path, file_size)
        entries = _check_safetensors_layout(path, header, file_size - data_start)
        # The entries tile the data buffer in order, so one sequential pass reads the file exactly once.
        # Each tensor gets freshly allocated (hence aligned) memory and the bytes are read straight into
        # it: viewing the file in place is not possible in general, since e.g. GPT-2's 14,283-byte
        # header leaves every float misaligned.
        tensors = {}
        for e in entries:
            tensor = torch.empty(e.shape, dtype=e.dtype)
            _readinto_exactly(f, _as_bytes(tensor), path, e.key)
            tensors[e.key] = tensor
    return tensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Writes tensors to a .safetensors file (atomically: a crash never leaves a half-written file)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError(f"{path}: metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    for key, t in tensors.items():
        if not isinstance(key, str) or key == "__metadata__" or not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: cannot save entry {key!r} ({type(t).__name__}): expected str -> Tensor")
        if t.dtype not in _SAFETENSORS_NAMES:
            raise TypeError(f"{path}: tensor '{key}': dtype {t.dtype} has no safetensors equivalent")
    # Widest dtypes first, as the reference writer does: with the header padded to a multiple of 8,
    # every tensor then starts at a multiple of its own itemsize.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    flat, offset = [], 0
    for key in order:
        t = tensors[key].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        flat.append(t)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # trailing spaces keep it valid JSON
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in flat:
            f.write(memoryview(_as_bytes(t)))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# pickled PyTorch checkpoints and dispatch

def load_torch_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a pytorch_model.bin / .pt state dict, refusing any pickle that would construct other objects."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        asks = f" (it asks to call {culprit.group(1)})" if culprit else ""
        raise CheckpointError(f"{path}: refusing to unpickle: the file holds objects other than tensors{asks}, "
                              f"and loading them could run arbitrary code. Use a .safetensors checkpoint, or "
                              f"convert this one yourself only if you trust its source.") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (str -> Tensor), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r}: expected a Tensor, got {type(value).__name__}")
    return state


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads weights, choosing the reader from the file suffix (.safetensors, .bin, .pt, .pth)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return load_torch_bin(path)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt or .pth)")


# ---------------------------------------------------------------------------------------------------
# Finding a model's files: local directory, Seal cache, Hugging Face cache, download

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")  # preference order: safetensors runs no code
DEFAULT_ENDPOINT = "https://huggingface.co"
HTTP_BACKOFF_S = 0.5  # the wait before retry i is HTTP_BACKOFF_S * 2**i: 0.5, 1, 2, 4 s
DOWNLOAD_CHUNK = 1 << 20  # 1 MiB reads: few syscalls, frequent enough progress updates
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_NAME = re.compile(r"[\w.-]+")  # etags and commits become file names: no slashes from a server


def seal_cache_dir() -> Path:
    """Where Seal keeps models it makes itself (e.g. the micro world's tiny-lm): $SEAL_CACHE or ~/.cache/seal."""
    return Path(os.environ.get("SEAL_CACHE") or "~/.cache/seal").expanduser()


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_number(name: str, default: float, kind: type) -> float | int:
    try:
        value = kind(os.environ.get(name) or default)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${name} must be a non-negative {kind.__name__}, got {os.environ[name]!r}")
    return value


def _http_timeout() -> float:
    return _env_number("SEAL_HTTP_TIMEOUT", 10.0, float)


def _http_retries() -> int:
    return _env_number("SEAL_HTTP_RETRIES", 4, int)


def _describe(group: tuple[str, ...]) -> str:
    return " or ".join(group)


def _collect(directory: Path, wanted: list[tuple[str, ...]], optional: Sequence[str]
             ) -> tuple[dict[str, Path], list[tuple[str, ...]]]:
    """Picks, for each wanted group, its first alternative present in directory; also the optional files there.
    Returns (found name -> path, the groups with no alternative present)."""
    found, missing = {}, []
    for group in wanted:
        name = next((n for n in group if (directory / n).is_file()), None)
        if name is None:
            missing.append(group)
        else:
            found[name] = directory / name
    found.update({n: directory / n for n in optional if (directory / n).is_file()})
    return found, missing


def _local_dir(name_or_path: str) -> Path | None:
    """A local directory for name_or_path, or None if it should be looked up as a hub repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{name_or_path}: is a file; expected a model directory (config.json + weights)")
    if path.is_absolute() or name_or_path.startswith(("./", "../", "~", ".\\", "..\\")) or name_or_path in (".", ".."):
        raise CheckpointNotFoundError(f"{name_or_path}: no such directory")
    in_seal_cache = seal_cache_dir() / name_or_path
    if in_seal_cache.is_dir():
        return in_seal_cache
    if not _REPO_ID.fullmatch(name_or_path):
        raise CheckpointNotFoundError(f"{name_or_path}: no such directory, and not a hub repo id (expected 'org/name')")
    return None


def _cached_snapshot(repo_dir: Path, revision: str) -> Path | None:
    """The snapshot folder a revision points to in an HF cache, if the cache knows it."""
    commit = revision
    if not _COMMIT_HASH.fullmatch(revision):
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def resolve_files(name_or_path: str, required: Sequence[str | tuple[str, ...]], optional: Sequence[str] = (),
                  revision: str = "main") -> dict[str, Path]:
    """Finds a model's files; returns {file name: local path} for the files found.

    Each entry of `required` is a file name or a tuple of alternatives in preference order (the first one
    present wins); an `optional` file is returned when present. Order: local directory (or Seal cache),
    existing HF cache, download (unless HF_HUB_OFFLINE=1). See the section docstring.
    """
    wanted = [(r,) if isinstance(r, str) else tuple(r) for r in required]
    local = _local_dir(name_or_path)
    if local is not None:
        found, missing = _collect(local, wanted, optional)
        if missing:
            present = sorted(p.name for p in local.iterdir())
            raise CheckpointNotFoundError(f"{local}: missing {'; '.join(map(_describe, missing))} "
                                          f"(the directory holds: {', '.join(present) or 'nothing'})")
        return found

    repo_id = name_or_path
    repo_dir = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshot = _cached_snapshot(repo_dir, revision)
    # A complete snapshot in the cache is used as is: optional files missing from it are not worth a
    # network round trip (which, with no network, would only end in time-outs).
    missing = wanted
    if snapshot is not None:
        found, missing = _collect(snapshot, wanted, optional)
        if not missing:
            return found
    if _env_flag("HF_HUB_OFFLINE"):
        where = snapshot or repo_dir / "refs" / revision
        raise CheckpointNotFoundError(
            f"{repo_id}: missing {'; '.join(map(_describe, missing))}, and HF_HUB_OFFLINE=1 forbids downloading.\n"
            f"  Looked in: local directory ./{repo_id} (none), the Seal cache {seal_cache_dir() / repo_id} (none), "
            f"the Hugging Face cache {where} ({'incomplete' if snapshot else 'no such revision cached'}).\n"
            f"  To get the files: run once without HF_HUB_OFFLINE=1 (they go to the Hugging Face cache above), "
            f"or on a machine with network run `hf download {repo_id} --local-dir DIR` "
            f"(older: `huggingface-cli download ...`), copy DIR here and pass DIR instead of '{repo_id}'.")
    return _download_files(repo_id, revision, repo_dir, wanted, optional)


def load_checkpoint(name_or_path: str, extra_required: Sequence[str | tuple[str, ...]] = (),
                    optional: Sequence[str] = (), revision: str = "main"
                    ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Path]]:
    """Resolves and loads a checkpoint: returns (config.json as a dict, state dict, {file name: path}).
    Weights come from model.safetensors when the checkpoint has it, else pytorch_model.bin."""
    files = resolve_files(name_or_path, [CONFIG_NAME, WEIGHTS_NAMES, *extra_required], optional, revision)
    config_path = files[CONFIG_NAME]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    weights = next(files[name] for name in WEIGHTS_NAMES if name in files)
    return config, load_state_dict(weights), files


def save_pretrained(directory: str | os.PathLike, config: dict, state_dict: Mapping[str, torch.Tensor],
                    extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Writes a checkpoint directory that load_checkpoint (and transformers) can read:
    config.json, model.safetensors and any extra files (e.g. a tokenizer), given as name -> contents."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # {"format": "pt"} is what transformers writes, and what its 4.x versions check when loading.
    save_safetensors(state_dict, directory / WEIGHTS_NAMES[0], metadata={"format": "pt"})
    for name, contents in (extra_files or {}).items():
        data = contents.encode("utf-8") if isinstance(contents, str) else contents
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


# --- HTTP: every request has a time-out; transient failures are retried with backoff ---------------

_T = TypeVar("_T")
_USER_AGENT = "seal/0.1 (python urllib)"


class _ShortRead(Exception):
    """The server closed the connection before sending the whole file (retried: the next try resumes)."""


def _is_transient(e: Exception) -> bool:
    if isinstance(e, urllib.error.HTTPError):  # an answer from the server: retry only overload/server errors
        return e.code == 429 or e.code >= 500
    return isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, _ShortRead))


def _with_retries(url: str, attempt: Callable[[], _T]) -> _T:
    retries = _http_retries()
    for i in range(retries + 1):
        try:
            return attempt()
        except Exception as e:
            if not _is_transient(e):
                raise
            if i == retries:
                reason = getattr(e, "reason", None) or e  # URLError wraps the socket error in .reason
                attempts = f"{retries + 1} attempt" + ("s" if retries else "")
                raise DownloadError(f"{url}: failed after {attempts} ({_http_timeout():g} s time-out "
                                    f"each; $SEAL_HTTP_TIMEOUT, $SEAL_HTTP_RETRIES): {type(e).__name__}: {reason}. "
                                    f"Check the network or $HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only local "
                                    f"files.") from e
            time.sleep(HTTP_BACKOFF_S * 2**i)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Stops at redirects (urllib then raises HTTPError), so the hub's headers are not lost to the CDN's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_no_redirect_opener = urllib.request.build_opener(_NoRedirect)
_MAX_HUB_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@dataclass(frozen=True)
class _HubFile:
    url: str     # where the bytes are: the resolve URL, or the storage URL it redirects to
    commit: str  # X-Repo-Commit
    etag: str    # sha256 of the contents for LFS files, git blob sha1 for small files
    size: int


def _hub_metadata(url: str) -> _HubFile | None:
    """HEADs a resolve URL and reads the hub's headers; None when the file does not exist (HTTP 404).

    Large (LFS) files answer with a redirect to a storage server on another host; the hub's headers
    (commit, etag, size) are on that redirect, so we stop there. Redirects that stay on the hub's own
    host (e.g. a renamed repo) are followed, as huggingface_hub does.
    """
    def attempt() -> tuple[str, http.client.HTTPMessage, bool]:  # (where the bytes are, headers, redirected)
        target = url
        for _ in range(_MAX_HUB_REDIRECTS):
            request = urllib.request.Request(target, method="HEAD",
                                             headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
            try:
                with _no_redirect_opener.open(request, timeout=_http_timeout()) as response:
                    return target, response.headers, False
            except urllib.error.HTTPError as e:
                e.close()
                location = e.headers.get("Location") if 300 <= e.code < 400 else None
                if location is None:
                    raise
                location = urllib.parse.urljoin(target, location)
                if _origin(location) != _origin(target):
                    return location, e.headers, True
                target = location
        raise DownloadError(f"{url}: more than {_MAX_HUB_REDIRECTS} redirects within the hub")

    try:
        location, headers, redirected = _with_retries(url, attempt)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        if e.code in (401, 403):
            raise CheckpointNotFoundError(f"{url}: HTTP {e.code}: no such repository, or it needs authentication "
                                          f"(Seal downloads public repos only; a local path must be an existing "
                                          f"directory)") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    commit = headers.get("X-Repo-Commit")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    # On a redirect, Content-Length is the length of the redirect's own body, not of the file.
    size = headers.get("X-Linked-Size") or (None if redirected else headers.get("Content-Length"))
    if not (commit and _SAFE_NAME.fullmatch(commit) and _SAFE_NAME.fullmatch(etag) and size and size.isdigit()):
        raise DownloadError(f"{url}: not a Hugging Face hub response (expected headers X-Repo-Commit, "
                            f"X-Linked-Etag or ETag, X-Linked-Size or Content-Length; got commit={commit!r}, "
                            f"etag={etag!r}, size={size!r}); is $HF_ENDPOINT right?")
    return _HubFile(location, commit, etag, int(size))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download_blob(hub_file: _HubFile, blob: Path, label: str) -> None:
    """Downloads into blob + ".incomplete" (resuming what is already there), verifies it, then renames it."""
    partial = blob.with_name(blob.name + ".incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)

    def attempt() -> None:
        have = partial.stat().st_size if partial.exists() else 0
        if have == hub_file.size:
            return
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if 0 < have < hub_file.size:
            headers["Range"] = f"bytes={have}-"
        with urllib.request.urlopen(urllib.request.Request(hub_file.url, headers=headers),
                                    timeout=_http_timeout()) as response:
            if response.status != 206:  # a full answer (no Range sent, or the server ignored it): start over
                have = 0
            with open(partial, "ab" if have else "wb") as f, \
                    tqdm(total=hub_file.size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=label) as bar:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        if partial.stat().st_size < hub_file.size:  # http.client reports an early close as a normal end
            raise _ShortRead(f"connection closed after {partial.stat().st_size:,} of {hub_file.size:,} bytes")

    try:
        _with_retries(hub_file.url, attempt)
    except urllib.error.HTTPError as e:  # e.g. an expired storage link: retrying the same URL will not help
        raise DownloadError(f"{hub_file.url}: HTTP {e.code} {e.reason}") from None
    got = partial.stat().st_size
    if got != hub_file.size:
        partial.unlink()
        raise DownloadError(f"{hub_file.url}: expected {hub_file.size:,} bytes (as the hub announced), got {got:,}; "
                            f"the partial file was deleted, try again")
    if _SHA256.fullmatch(hub_file.etag):  # LFS files are named by the sha256 of their contents
        actual = _sha256_of(partial)
        if actual != hub_file.etag:
            partial.unlink()
            raise DownloadError(f"{hub_file.url}: sha256 mismatch (expected {hub_file.etag}, got {actual}); "
                                f"the corrupt download was deleted, try again")
    os.replace(partial, blob)


def _link_snapshot(blob: Path, dest: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, relative so the cache can be moved as a whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    except OSError:  # no symlinks (e.g. Windows without developer mode): a copy costs disk but works
        shutil.copyfile(blob, dest)


def _download_files(repo_id: str, revision: str, repo_dir: Path, wanted: list[tuple[str, ...]],
                    optional: Sequence[str]) -> dict[str, Path]:
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    commit = None  # once known, every later file is fetched at that commit, so all come from one snapshot
    found: dict[str, Path] = {}

    def fetch(filename: str) -> tuple[Path | None, str]:
        nonlocal commit
        url = (f"{endpoint}/{repo_id}/resolve/{urllib.parse.quote(commit or revision, safe='')}/"
               f"{urllib.parse.quote(filename)}")
        hub_file = _hub_metadata(url)
        if hub_file is None:
            return None, url
        commit = hub_file.commit
        blob = repo_dir / "blobs" / hub_file.etag
        if not (blob.is_file() and blob.stat().st_size == hub_file.size):
            _download_blob(hub_file, blob, label=f"{repo_id}/{filename}")
        dest = repo_dir / "snapshots" / hub_file.commit / filename
        _link_snapshot(blob, dest)
        return dest, url

    for group in wanted:
        tried = []
        for filename in group:  # a 404 on a non-preferred alternative is not an error
            path, url = fetch(filename)
            if path is not None:
                found[filename] = path
                break
            tried.append(url)
        else:
            raise CheckpointNotFoundError(
                f"{repo_id}: not a local directory, not in the Seal cache ({seal_cache_dir() / repo_id}), and the "
                f"hub has no {_describe(group)} at revision '{revision}' (HTTP 404 for {', '.join(tried)})")
    for filename in optional:
        path, _ = fetch(filename)
        if path is not None:
            found[filename] = path
    if commit is not None and revision != commit:
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return found
