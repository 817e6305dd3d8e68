"""LPIPS fetches a missing torchvision trunk as torchvision would, from a real (local) HTTP server:
hash prefix checked, nothing half-written left behind, no network touched when offline."""
from __future__ import annotations

import hashlib
import http.server
import io
import threading

import pytest
import torch
import torchvision

from autoencoder import perceptual
from autoencoder.perceptual import LPIPS


@pytest.fixture
def server(tmp_path):
    """An HTTP server over tmp_path/served; yields (its URL, the list of paths it was asked for)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    httpd.shutdown()
    httpd.server_close()


def squeezenet_file() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A torchvision SqueezeNet 1.1 weights file (random weights, 5 MB) and its state dict."""
    torch.manual_seed(0)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


def publish(monkeypatch, server, content: bytes, hash_of: bytes | None = None) -> str:
    """Serve `content` under a torchvision-style name carrying the SHA-256 prefix of `hash_of` (default:
    of the content itself) and point the squeeze trunk at it; returns the file name."""
    url, served, _ = server
    prefix = hashlib.sha256(content if hash_of is None else hash_of).hexdigest()[:8]
    name = f"squeezenet1_1-{prefix}.pth"
    (served / name).write_bytes(content)
    monkeypatch.setitem(perceptual.BACKBONE_FILES, "squeeze", name)
    monkeypatch.setattr(perceptual, "DOWNLOAD_URL", url)
    return name


@pytest.fixture
def online(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_trunk_is_downloaded_checked_and_used(online, monkeypatch, server):
    content, state = squeezenet_file()
    name = publish(monkeypatch, server, content)
    lpips = LPIPS("squeeze")
    assert (online / name).read_bytes() == content  # torchvision's place and name
    trunk = lpips.model.net.state_dict()  # slice<k>.<i>.* <- features.<i>.*
    assert torch.equal(trunk["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(trunk["slice7.12.expand3x3.weight"], state["features.12.expand3x3.weight"])
    assert server[2] == [f"/{name}"]
    LPIPS("squeeze")  # the second time it is on disk: no request
    assert server[2] == [f"/{name}"]


def test_a_download_with_the_wrong_hash_is_refused_and_not_kept(online, monkeypatch, server):
    content, _ = squeezenet_file()
    name = publish(monkeypatch, server, content, hash_of=b"something else")
    with pytest.raises(FileNotFoundError, match=rf"{name}.*the download failed \(.*SHA-256 .*not the expected file"):
        LPIPS("squeeze")
    assert not online.exists() or list(online.iterdir()) == []  # neither the file nor a temporary one


def test_offline_no_request_is_made(online, monkeypatch, server):
    content, _ = squeezenet_file()
    publish(monkeypatch, server, content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, so it was not downloaded"):
        LPIPS("squeeze")
    assert server[2] == []


def test_a_failed_download_is_a_clear_error(online, monkeypatch, server):
    url, _, _ = server
    monkeypatch.setattr(perceptual, "DOWNLOAD_URL", url + "missing/")  # 404
    with pytest.raises(FileNotFoundError, match=r"the download failed \(HTTP Error 404"):
        LPIPS("squeeze")


def test_an_explicit_path_is_never_downloaded(online, monkeypatch, server, tmp_path):
    content, _ = squeezenet_file()
    publish(monkeypatch, server, content)
    with pytest.raises(FileNotFoundError, match="mine.pth.*none were found"):
        LPIPS("squeeze", backbone_path=tmp_path / "mine.pth")
    assert server[2] == []
