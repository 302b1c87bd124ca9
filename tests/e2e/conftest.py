"""Session fixtures: one `ferry serve` for the whole suite (default model,
free ports, an API key, a temp state directory), and plain HTTP clients on it."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from e2e_server import SetupError, start_server, stop_server  # noqa: E402
from e2e_util import need  # noqa: E402

_failed = []


def pytest_configure(config):
    # Keep the marker known when pytest-timeout is not installed.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")
    config.addinivalue_line("markers", "heavy: minutes of full CPU load; runs after every other test")


def pytest_collection_modifyitems(session, config, items):
    # Minutes of full load on a 2-core machine leave it slower for a while
    # after (the tests that time /health under bad requests then miss their
    # bound): heavy tests go last, in their own order.
    items.sort(key=lambda item: item.get_closest_marker("heavy") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        _failed.append(item.nodeid)


@pytest.fixture(scope="session")
def server():
    srv, problem = None, None
    try:
        srv = start_server()
    except SetupError as e:
        problem = str(e)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        httpx = need("httpx")
        r = httpx.get(srv.http_url + "/v1/models", headers=srv.auth, timeout=10)
        r.raise_for_status()
        data = r.json()["data"]
        srv.model_id = data[0]["id"]
        yield srv
    finally:
        stop_server(srv)
        if _failed:
            sys.stderr.write(f"\n--- ferry serve stderr (tail), {len(_failed)} test(s) failed ---\n"
                             f"{srv.stderr_tail(80)}\n--- end of ferry stderr ---\n")
        if not os.environ.get("FERRY_E2E_KEEP_STATE"):
            shutil.rmtree(srv.state_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_still_alive(request):
    """A server crash during a test is reported as such, with its stderr."""
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        if not srv.alive():
            pytest.fail(f"ferry serve died (exit code {srv.proc.returncode}) during this test\n"
                        f"--- stderr tail ---\n{srv.stderr_tail()}", pytrace=False)


@pytest.fixture(scope="session")
def http(server):
    """httpx over HTTP/1.1 on the plain port, with the API key."""
    httpx = need("httpx")
    with httpx.Client(base_url=server.http_url, headers=server.auth, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def oai(server):
    """The official OpenAI SDK pointed at ferry."""
    openai = need("openai")
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key=server.api_key, timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def tokenize(http, server):
    def count(prompt=None, messages=None, **extra) -> list[int]:
        body = {"model": server.model_id, **extra}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        r = http.post("/tokenize", json=body)
        assert r.status_code == 200, f"/tokenize {body} -> {r.status_code} {r.text}"
        j = r.json()
        assert j["count"] == len(j["tokens"]), j
        return j["tokens"]
    return count
