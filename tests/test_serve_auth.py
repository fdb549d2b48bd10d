"""`mixtral serve --api-key`: requests without a valid `Authorization: Bearer` key get OpenAI's 401 error shape,
with one they are served, /health stays open, and no key ever reaches the server's output."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixtral.errors import InputError
from mixtral.serve.cli import read_api_keys
from test_serve import start_server, stop_servers, wait_for_url

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEYS = {"flag": "sk-flag-1234567890", "env": "sk-env-abcdefghij", "file": "sk-file-0987654321"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny preset served with a key from each source; (url, its log file)."""
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys.txt"
    keys.write_text(f"# the team's keys\n\n  {KEYS['file']}  \n")
    log = root / "server.log"
    os.environ["MIXTRAL_API_KEY"] = KEYS["env"]  # start_server passes the environment on
    try:
        process = start_server(["--model", "tiny", "--max-batch", "2", "--max-seq-len", "64", "--api-key",
                                KEYS["flag"], "--api-key-file", str(keys)], log)
    finally:
        del os.environ["MIXTRAL_API_KEY"]
    try:
        yield wait_for_url(process, log), log
    finally:
        stop_servers(process)


@pytest.mark.parametrize("headers,code", [({}, None), ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),
                                          ({"Authorization": f"Basic {KEYS['flag']}"}, None),
                                          ({"Authorization": "Bearer"}, None)])
def test_without_a_valid_key_401(server, headers, code):
    url, _ = server
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})):
        response = httpx.request(method, f"{url}{path}", headers=headers, json=body)
        assert response.status_code == 401, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] is None
        assert "sk-" not in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("source", list(KEYS))
def test_each_key_is_served(server, source):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[source], max_retries=0, timeout=60)
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_the_official_client_sees_authentication_errors(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-not-a-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "invalid_api_key"


def test_health_stays_open_and_no_key_is_logged(server):
    url, log = server
    assert httpx.get(f"{url}/health").status_code == 200
    text = log.read_text()
    assert "3 API key(s) required" in text
    assert not any(key in text for key in KEYS.values())


def test_reading_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXTRAL_API_KEY", raising=False)
    assert read_api_keys([], None) == []
    monkeypatch.setenv("MIXTRAL_API_KEY", "b")
    path = tmp_path / "keys"
    path.write_text("# comment\nc\n\na\n")
    assert read_api_keys(["a"], str(path)) == ["a", "b", "c"]
    path.write_text("# nothing\n")
    with pytest.raises(InputError, match=f"--api-key-file {path}: no keys in it"):
        read_api_keys([], str(path))
    with pytest.raises(InputError, match="cannot read it"):
        read_api_keys([], str(tmp_path / "missing"))
    with pytest.raises(InputError, match="empty or has spaces") as caught:
        read_api_keys(["two words"], None)
    assert "two words" not in str(caught.value)


def test_a_bad_key_file_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mixtral", "serve", "--port", "0", "--model", "tiny",
                             "--api-key-file", str(tmp_path / "missing")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "error: --api-key-file" in result.stderr and "Traceback" not in result.stderr
