"""Checkpoint I/O: the hand-written safetensors reader/writer against the official library, malformed and
malicious files, and model resolution (local dir, Seal cache, HF cache, downloads) against a loopback
server that answers like the Hugging Face hub."""
import hashlib
import json
import os
import re
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import decoder as ckpt  # the checkpoint I/O lives in the appendix of decoder.py

safetensors_torch = pytest.importorskip("safetensors.torch")


# ---------------------------------------------------------------------------------------------------
# safetensors

def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (3,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_and_interop_with_official_safetensors(tmp_path):
    tensors = _sample_tensors()
    ours = tmp_path / "ours.safetensors"
    ckpt.save_safetensors(tensors, ours, metadata={"format": "pt", "note": "hello"})
    _assert_same(ckpt.load_safetensors(ours), tensors)
    header_len = struct.unpack("<Q", ours.read_bytes()[:8])[0]
    assert (8 + header_len) % 8 == 0  # padded like the reference writer, so the data buffer is aligned
    _assert_same(safetensors_torch.load_file(ours), tensors)  # the official reader accepts our files
    from safetensors import safe_open
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hello"}

    theirs = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file(tensors, theirs, metadata={"format": "pt"})
    _assert_same(ckpt.load_safetensors(theirs), tensors)  # and we read the official writer's files


def _write_raw(path: Path, header: dict | bytes, data: bytes, header_len: int | None = None) -> Path:
    """A safetensors file written byte by byte, so tests control every field (no padding)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def test_unaligned_header_like_gpt2(tmp_path):
    # The real gpt2 file has a 14,283-byte header, so its floats do not start on a 4-byte boundary.
    a, b = torch.randn(3, 4), torch.randn(5).to(torch.bfloat16)
    header = {"__metadata__": {"format": "pt", "pad": "x"},
              "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "BF16", "shape": [5], "data_offsets": [48, 58]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - (len(raw) + 8) % 8) % 8 + 3)  # make 8 + N == 3 (mod 8): misaligned for every dtype
    assert (8 + len(raw)) % 4 != 0
    data = a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes()
    path = _write_raw(tmp_path / "unaligned.safetensors", raw, data)
    loaded = ckpt.load_safetensors(path)
    _assert_same(loaded, {"a": a, "b": b})
    _assert_same(loaded, safetensors_torch.load_file(path))
    assert all(t.data_ptr() % t.element_size() == 0 for t in loaded.values())  # our copies are aligned


def _f32(n: int) -> dict:
    return {"dtype": "F32", "shape": [n]}


MALFORMED = {
    # name: (header (dict or raw bytes), data bytes, declared header length or None, expected message)
    "header too large": (b"{}", b"", 200_000_000, r"header length 200,000,000 bytes exceeds the limit of 100,000,000"),
    "header past EOF": (b"{}", b"", 1000, r"header runs past the end of the file"),
    "bad JSON": (b'{"a": {"dtype": "F32",', b"", None, r"header is not valid JSON"),
    "invalid UTF-8": (b'{"\xff": 1}', b"", None, r"header is not valid UTF-8"),
    "overlap": ({"a": {**_f32(4), "data_offsets": [0, 16]}, "b": {**_f32(4), "data_offsets": [8, 24]}},
                bytes(24), None, r"tensor 'b': data_offsets \[8, 24\] overlap tensor 'a' \(expected begin 16, got 8\)"),
    "gap": ({"a": {**_f32(4), "data_offsets": [0, 16]}, "b": {**_f32(4), "data_offsets": [20, 36]}},
            bytes(36), None,
            r"tensor 'b': data_offsets \[20, 36\] leave a gap after tensor 'a' \(expected begin 16, got 20\)"),
    "not from 0": ({"a": {**_f32(1), "data_offsets": [4, 8]}}, bytes(8), None, r"tensor 'a'.*expected begin 0, got 4"),
    "out of range": ({"a": {**_f32(4), "data_offsets": [0, 16]}}, bytes(8), None,
                     r"tensor 'a': data_offsets \[0, 16\] are out of range "
                     r"\(expected end <= data buffer length 8, got 16\)"),
    "shape/length mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16), None,
                              r"tensor 'a': dtype F32 and shape \[3\] need 12 bytes .* hold 16"),
    "trailing bytes": ({"a": {**_f32(2), "data_offsets": [0, 8]}}, bytes(12), None,
                       r"data buffer is 12 bytes but the tensors cover 8"),
    "unknown dtype": ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), None,
                      r"tensor 'a': unknown dtype 'F7'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_rejected_clearly(tmp_path, case):
    header, data, header_len, message = MALFORMED[case]
    path = _write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path)) + ".*" + message):
        ckpt.load_safetensors(path)
    with pytest.raises(Exception):  # the reference reader rejects the same file: the case is really malformed
        safetensors_torch.load_file(path)


class _Payload:
    """Unpickling this calls open(marker, "w"): a harmless stand-in for os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_loading_and_malicious_pickle(tmp_path):
    good = {"w": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save(good, tmp_path / "pytorch_model.bin")
    _assert_same(ckpt.load_state_dict(tmp_path / "pytorch_model.bin"), good)

    # Prove the payload is live: an unrestricted load does run it.
    torch.save({"w": torch.zeros(1), "x": _Payload(tmp_path / "ran_unsafe")}, tmp_path / "live.bin")
    torch.load(tmp_path / "live.bin", weights_only=False)["x"].close()
    assert (tmp_path / "ran_unsafe").exists()

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, evil)
    refusal = re.escape(str(evil)) + r": refusing to unpickle.*it asks to call _?io.open"  # _io.open on Python 3.12
    with pytest.raises(ckpt.CheckpointError, match=refusal):
        ckpt.load_torch_bin(evil)
    assert not marker.exists()

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(garbage))):
        ckpt.load_torch_bin(garbage)
    with pytest.raises(ckpt.CheckpointError, match="unknown weights format"):
        ckpt.load_state_dict(tmp_path / "weights.npz")


# ---------------------------------------------------------------------------------------------------
# Resolution: local directory and Seal cache

@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated caches and fast network settings; the real home caches are never touched."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("SEAL_CACHE", str(tmp_path / "seal"))
    monkeypatch.setenv("SEAL_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("SEAL_HTTP_RETRIES", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing answers unless a hub is set up
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # so a repo id is never mistaken for a stray folder
    return tmp_path


def test_cache_locations_follow_huggingface_hub(env, monkeypatch):
    assert ckpt.hf_hub_cache_dir() == env / "hf"
    monkeypatch.delenv("HF_HUB_CACHE")
    assert ckpt.hf_hub_cache_dir() == env / "hf_home" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    assert ckpt.hf_hub_cache_dir() == env / "xdg" / "huggingface" / "hub"
    assert ckpt.seal_cache_dir() == env / "seal"


def _tiny_checkpoint():
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8}
    state = {"wte.weight": torch.randn(300, 8), "h.0.ln_1.weight": torch.ones(8)}
    return config, state


def test_local_directory_and_seal_cache(env):
    config, state = _tiny_checkpoint()
    local = ckpt.save_pretrained(env / "my-model", config, state, extra_files={"vocab.json": "{}"})
    for name in ("./my-model", str(local), "my-model"):
        got_config, got_state, files = ckpt.load_checkpoint(name, optional=["vocab.json", "merges.txt"])
        assert got_config == config
        _assert_same(got_state, state)
        assert sorted(files) == ["config.json", "model.safetensors", "vocab.json"]

    ckpt.save_pretrained(env / "seal" / "tiny-lm", config, state)  # where the micro world keeps its models
    assert ckpt.load_checkpoint("tiny-lm")[2]["config.json"] == env / "seal" / "tiny-lm" / "config.json"

    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"\./nope: no such directory"):
        ckpt.resolve_files("./nope", ["config.json"])
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"~/nope-seal-test: no such directory"):
        ckpt.resolve_files("~/nope-seal-test", ["config.json"])
    listing = r"\(the directory holds: config.json, model.safetensors, vocab.json\)"
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"my-model: missing tokenizer.model or merges.txt " + listing):
        ckpt.resolve_files("my-model", ["config.json", ("tokenizer.model", "merges.txt")])


# ---------------------------------------------------------------------------------------------------
# Resolution: downloads from a fake hub

def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A loopback server answering like huggingface.co.

    GET/HEAD /{repo}/resolve/{main or commit}/{file}: small files answer 200 with ETag = git blob sha1;
    LFS files (*.safetensors, *.bin) answer 302 to /lfs/<sha256> with X-Linked-Etag and X-Linked-Size,
    like the hub's redirect to its storage servers, which honour Range requests. Unknown files: 404.
    Knobs: truncate_next (cut that many LFS answers halfway), corrupt (serve wrong LFS bytes),
    stall (never answer), status (answer every request with this error code). The repo's old name
    answers with a relative redirect to the new one.
    """

    def __init__(self, repo: str, files: dict[str, bytes], old_name: str = "old-org/tiny"):
        self.repo, self.files, self.old_name = repo, files, old_name
        self.commit = hashlib.sha1(b"commit").hexdigest()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.truncate_next, self.corrupt, self.stall, self.status = 0, False, False, None
        self.released = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, send_body=False)

            def do_GET(self):
                hub.answer(self, send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # The hub redirects LFS files to storage on another host; "localhost" is another host name for us.
        self.storage_url = f"http://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: BaseHTTPRequestHandler, send_body: bool) -> None:
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        if self.stall:
            self.released.wait(30)
            h.close_connection = True
            return
        if self.status:
            h.send_error(self.status)
            return
        path = urllib.parse.unquote(h.path)
        if path.startswith(f"/{self.old_name}/resolve/"):  # a renamed repo: the hub redirects on its own host
            self._send(h, 307, b"", {"Location": path.replace(self.old_name, self.repo, 1)}, send_body)
            return
        if m := re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path):
            repo, revision, name = m.groups()
            if repo != self.repo or revision not in ("main", self.commit) or name not in self.files:
                h.send_error(404)
                return
            data = self.files[name]
            if name.endswith((".safetensors", ".bin")):
                sha = hashlib.sha256(data).hexdigest()
                self._send(h, 302, b"", {"Location": f"{self.storage_url}/lfs/{sha}", "X-Repo-Commit": self.commit,
                                         "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}, send_body)
            else:
                self._send(h, 200, data, {"X-Repo-Commit": self.commit, "ETag": f'W/"{_git_blob_sha1(data)}"'},
                           send_body)
        elif m := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
            data = next(d for d in self.files.values() if hashlib.sha256(d).hexdigest() == m.group(1))
            if self.corrupt:
                data = bytes(len(data))
            start = int(re.fullmatch(r"bytes=(\d+)-", h.headers["Range"]).group(1)) if h.headers["Range"] else 0
            extra = {"Accept-Ranges": "bytes"}
            if start:
                extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if send_body and self.truncate_next:  # promise the whole body, send half, hang up
                self.truncate_next -= 1
                h.send_response(206 if start else 200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[: len(body) // 2])
                h.close_connection = True
                return
            self._send(h, 206 if start else 200, body, extra, send_body)
        else:
            h.send_error(404)

    @staticmethod
    def _send(h, code, body, headers, send_body):
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        redirect = 300 <= code < 400
        h.send_header("Content-Length", "0" if redirect else str(len(body)))
        h.end_headers()
        if send_body and not redirect:
            h.wfile.write(body)


REPO = "org/tiny"


@pytest.fixture
def hub(env, monkeypatch):
    config, state = _tiny_checkpoint()
    src = ckpt.save_pretrained(env / "src", config, state, extra_files={"vocab.json": '{"a": 0}'})
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    server = FakeHub(REPO, files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def _repo_dir(env: Path) -> Path:
    return env / "hf" / "models--org--tiny"


def test_download_into_hf_cache_layout_then_reuse_without_network(env, hub, monkeypatch, capsys):
    config, state, files = ckpt.load_checkpoint(REPO, optional=["vocab.json", "generation_config.json"])
    assert f"{REPO}/model.safetensors" in capsys.readouterr().err  # a progress bar per file
    assert config == json.loads(hub.files["config.json"])
    _assert_same(state, ckpt.load_safetensors(env / "src" / "model.safetensors"))
    assert sorted(files) == ["config.json", "model.safetensors", "vocab.json"]  # the 404 optional file is skipped

    repo_dir = _repo_dir(env)
    assert (repo_dir / "refs" / "main").read_text() == hub.commit
    snapshot = repo_dir / "snapshots" / hub.commit
    weights_sha = hashlib.sha256(hub.files["model.safetensors"]).hexdigest()
    for name, blob in [("model.safetensors", weights_sha), ("config.json", _git_blob_sha1(hub.files["config.json"]))]:
        link = snapshot / name
        assert files[name] == link and link.is_symlink()
        assert os.readlink(link) == f"../../blobs/{blob}"  # relative, like huggingface_hub's
        assert link.read_bytes() == hub.files[name]
    assert not list((repo_dir / "blobs").glob("*.incomplete"))
    # After the first file, the others are fetched at the pinned commit, so all come from one snapshot.
    heads = [p for method, p, _ in hub.requests if method == "HEAD"]
    assert heads[0].endswith("/resolve/main/config.json") and len(heads) == 4
    assert all(f"/resolve/{hub.commit}/" in p for p in heads[1:])

    hf_hub = pytest.importorskip("huggingface_hub")  # the official client finds our downloads in its cache
    found = hf_hub.try_to_load_from_cache(REPO, "model.safetensors", cache_dir=env / "hf")
    assert Path(found) == files["model.safetensors"]

    hub.stop()
    n_requests = len(hub.requests)
    assert ckpt.load_checkpoint(REPO)[2]["model.safetensors"] == files["model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_same(ckpt.load_checkpoint(REPO)[1], state)
    assert len(hub.requests) == n_requests


def test_renamed_repo_redirect_is_followed(env, hub):
    files = ckpt.resolve_files(hub.old_name, ["config.json", "model.safetensors"])
    # Like huggingface_hub, the cache is keyed by the name the user asked for.
    assert files["model.safetensors"].parent == env / "hf" / "models--old-org--tiny" / "snapshots" / hub.commit
    assert files["model.safetensors"].read_bytes() == hub.files["model.safetensors"]


def test_cache_written_by_huggingface_hub_is_reused_offline(env, hub, monkeypatch):
    hf_hub = pytest.importorskip("huggingface_hub")
    for name in ("config.json", "model.safetensors"):  # the official client, against our fake hub
        hf_hub.hf_hub_download(REPO, name, cache_dir=env / "hf", endpoint=hub.url)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, state, files = ckpt.load_checkpoint(REPO)
    assert config == json.loads(hub.files["config.json"])
    assert files["model.safetensors"].parent == _repo_dir(env) / "snapshots" / hub.commit


def test_truncated_download_is_resumed_with_range(env, hub, monkeypatch):
    size = len(hub.files["model.safetensors"])
    hub.truncate_next = 1
    monkeypatch.setenv("SEAL_HTTP_RETRIES", "0")
    with pytest.raises(ckpt.DownloadError, match=rf"{hub.storage_url}/lfs/[0-9a-f]{{64}}: failed after 1 attempt "):
        ckpt.resolve_files(REPO, ["config.json", "model.safetensors"])
    partial = next((_repo_dir(env) / "blobs").glob("*.incomplete"))
    assert partial.stat().st_size == size // 2

    monkeypatch.setenv("SEAL_HTTP_RETRIES", "1")
    files = ckpt.resolve_files(REPO, ["config.json", "model.safetensors"])
    assert files["model.safetensors"].read_bytes() == hub.files["model.safetensors"]
    sha = partial.name.removesuffix(".incomplete")
    assert hub.requests[-1] == ("GET", f"/lfs/{sha}", f"bytes={size // 2}-")
    assert not partial.exists()

    # Within one call, a dropped connection is retried and resumed, too.
    hub.truncate_next = 1
    monkeypatch.setenv("HF_HUB_CACHE", str(env / "hf2"))
    files = ckpt.resolve_files(REPO, ["model.safetensors"])
    assert files["model.safetensors"].read_bytes() == hub.files["model.safetensors"]
    assert hub.requests[-1][2] == f"bytes={size // 2}-"


def test_blob_with_wrong_sha256_is_rejected(env, hub):
    hub.corrupt = True
    expected = hashlib.sha256(hub.files["model.safetensors"]).hexdigest()
    actual = hashlib.sha256(bytes(len(hub.files["model.safetensors"]))).hexdigest()
    with pytest.raises(ckpt.DownloadError, match=rf"{hub.storage_url}/lfs/{expected}: sha256 mismatch "
                                                 rf"\(expected {expected}, got {actual}\)"):
        ckpt.load_checkpoint(REPO)
    blobs = _repo_dir(env) / "blobs"
    assert not (blobs / expected).exists() and not list(blobs.glob("*.incomplete"))
    assert not (_repo_dir(env) / "snapshots" / hub.commit / "model.safetensors").exists()


def test_offline_with_missing_files_says_what_where_and_how(env, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ckpt.CheckpointNotFoundError) as info:
        ckpt.load_checkpoint(REPO)
    message = str(info.value)
    for part in ["missing config.json; model.safetensors or pytorch_model.bin", "HF_HUB_OFFLINE=1",
                 str(env / "seal" / REPO), str(_repo_dir(env)), f"hf download {REPO} --local-dir DIR"]:
        assert part in message
    assert hub.requests == []  # the network was never touched


def test_fallback_alternative_and_missing_file(env, hub):
    hub.files["pytorch_model.bin"] = hub.files.pop("model.safetensors")  # an older repo: .bin only
    files = ckpt.resolve_files(REPO, ["config.json", ("model.safetensors", "pytorch_model.bin")])
    assert sorted(files) == ["config.json", "pytorch_model.bin"]
    tried = r"\(HTTP 404 for http://.*/org/tiny/resolve/[0-9a-f]{40}/tokenizer.model\)"
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"the hub has no tokenizer.model at revision 'main' " + tried):
        ckpt.resolve_files(REPO, ["config.json", "tokenizer.model"])


@pytest.mark.parametrize("failure", ["stall", "status"])
def test_timeouts_and_server_errors_retry_then_name_the_url(env, hub, monkeypatch, failure):
    monkeypatch.setenv("SEAL_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("SEAL_HTTP_RETRIES", "2")
    if failure == "stall":
        hub.stall = True
    else:
        hub.status = 503
    start = time.perf_counter()
    url = f"{hub.url}/{REPO}/resolve/main/config.json"
    with pytest.raises(ckpt.DownloadError, match=re.escape(url) + ": failed after 3 attempts"):
        ckpt.resolve_files(REPO, ["config.json"])
    assert len(hub.requests) == 3
    assert time.perf_counter() - start < 10


def _gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> dict[str, list[int]]:
    """Every tensor of the hub's gpt2 model.safetensors, including the h.N.attn.bias mask buffers."""
    shapes = {"wte.weight": [vocab, n_embd], "wpe.weight": [n_ctx, n_embd],
              "ln_f.weight": [n_embd], "ln_f.bias": [n_embd]}
    for i in range(n_layer):
        for name, shape in [("ln_1.weight", [n_embd]), ("ln_1.bias", [n_embd]), ("attn.bias", [1, 1, n_ctx, n_ctx]),
                            ("attn.c_attn.weight", [n_embd, 3 * n_embd]), ("attn.c_attn.bias", [3 * n_embd]),
                            ("attn.c_proj.weight", [n_embd, n_embd]), ("attn.c_proj.bias", [n_embd]),
                            ("ln_2.weight", [n_embd]), ("ln_2.bias", [n_embd]),
                            ("mlp.c_fc.weight", [n_embd, 4 * n_embd]), ("mlp.c_fc.bias", [4 * n_embd]),
                            ("mlp.c_proj.weight", [4 * n_embd, n_embd]), ("mlp.c_proj.bias", [n_embd])]:
            shapes[f"h.{i}.{name}"] = shape
    return shapes


@pytest.mark.slow
def test_full_size_gpt2_file_loads_in_under_5_s(tmp_path):
    shapes = _gpt2_shapes()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8 + 3)  # like the real file, the data starts misaligned
    path = tmp_path / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            f.write(torch.randn(shape, generator=g).numpy().tobytes())
    assert path.stat().st_size > 548_000_000
    try:
        start = time.perf_counter()
        tensors = ckpt.load_safetensors(path)
        seconds = time.perf_counter() - start
        print(f"load_safetensors: {path.stat().st_size:,} bytes in {seconds:.2f} s")
        assert seconds < 5
        reference = safetensors_torch.load_file(path)
        for key in ["wte.weight", "h.11.mlp.c_proj.bias"]:
            assert torch.equal(tensors[key], reference[key])
    finally:
        path.unlink()
