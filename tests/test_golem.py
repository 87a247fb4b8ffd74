"""The golem backend against a real yagna (offline, hybrid net), plus its market arithmetic.

The yagna tests need the ``yagna`` binary of the ``golem-node`` wheel (``pip install -e
".[golem]"``). Offline, no provider offers anything and no payment network answers, so
they cover everything up to the first offer: the checks, the demand, the market timeout,
the payment errors. Without yagna they are skipped with a banner, except in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mltask.backends.golem import Budget, GolemBackend, OfferPrice, offer_price, provider_name
from mltask.definition import GolemOptions, ProviderOptions
from mltask.errors import TaskError
from tests.support import results, run_cli, task_dict, write_task

HASH = "0123456789abcdef" * 3 + "01234567"
APP_KEY = "mltask-test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def yagna(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real yagna on a free port, offline, with an erc20/hoodi sender account (yagna's default network)."""
    binary = shutil.which("yagna")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("yagna tests must run in CI, but no yagna binary is installed (pip install golem-node)")
        from tests.conftest import skip_loudly

        skip_loudly("NO YAGNA: the golem-node wheel is not installed; `pip install -e \".[golem]\"`")
    data = tmp_path_factory.mktemp("yagna")
    url = f"http://127.0.0.1:{_free_port()}"
    env = {**os.environ, "YA_NET_TYPE": "hybrid", "YA_NET_RELAY_HOST": "127.0.0.1:9", "YAGNA_AUTOCONF_APPKEY": APP_KEY,
           "YAGNA_DATADIR": str(data), "GSB_URL": f"unix:{data}/gsb.sock", "YAGNA_API_URL": url,
           "YA_NET_BIND_URL": f"udp://127.0.0.1:{_free_port()}"}
    proc = subprocess.Popen([binary, "service", "run", "--disable-metrics-push"], env=env,
                            stdout=open(data / "yagna.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(f"{url}/me", headers={"Authorization": f"Bearer {APP_KEY}"})
            urllib.request.urlopen(request, timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (data / "yagna.log").read_text()[-2000:]
            time.sleep(0.5)
    subprocess.run([binary, "payment", "init", "--sender", "--driver", "erc20", "--network", "hoodi"], env=env,
                   check=True, capture_output=True, timeout=60)
    yield {"YAGNA_API_URL": url, "YAGNA_APPKEY": APP_KEY}
    proc.terminate()
    proc.wait(30)


def _use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _golem_task(tmp_path: Path, **golem: Any) -> Path:
    data = task_dict(n_trials=4)
    data["options"]["golem"] = {"image_hash": HASH, "market_timeout": "00:00:04", **golem}
    return write_task(tmp_path, data)


def _demands(env: dict[str, str]) -> list[dict]:
    request = urllib.request.Request(f"{env['YAGNA_API_URL']}/market-api/v1/demands",
                                     headers={"Authorization": f"Bearer {APP_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_demand_carries_the_image_and_resources_then_the_market_times_out(
    yagna: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, yagna)
    backend = GolemBackend(2, ProviderOptions(memory_gib=3, cpus=2, storage_gib=5),
                           GolemOptions(image_hash=HASH, market_timeout="00:00:03"), bid=0.5)
    (tmp_path / "resources").mkdir()
    with backend:
        backend.start(tmp_path / "resources", tmp_path / "scratch")
        [demand] = [d for d in _demands(yagna) if d["demandId"] == backend._demand.id]
        assert f"hash:sha3:{HASH}:" in demand["properties"]["golem.srv.comp.task_package"]
        assert demand["properties"]["golem.node.debug.subnet"] == "public"
        assert "golem.com.payment.platform.erc20-hoodi-tglm.address" in json.dumps(demand["properties"])
        for constraint in ("golem.inf.mem.gib>=3", "golem.inf.storage.gib>=5", "golem.inf.cpu.threads>=2",
                           "golem.runtime.name=vm"):
            assert constraint in demand["constraints"].replace(" ", ""), demand["constraints"]
        assert backend.expecting_providers() and backend.idle_providers() == []
        time.sleep(3.5)
        with pytest.raises(TaskError, match=r"no provider within 00:00:03 .* <= 0\.5 GLM/h"):
            backend.expecting_providers()
    assert not [d for d in _demands(yagna) if d["demandId"] == backend._demand.id]  # unsubscribed


@pytest.mark.slow
def test_cli_stops_at_the_market_timeout_with_a_resumable_state(
    yagna: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _use(monkeypatch, yagna)
    out = tmp_path / "out"
    code, _, err = run_cli(["tasks", "create", str(_golem_task(tmp_path)), "--backend", "golem", "--output",
                            str(out), "--quiet"], capsys)
    assert code == 2 and "options.golem.market_timeout: no provider within 00:00:04" in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    doc = results(out)
    assert doc["status"] == "stopped" and doc["costs"]["spent"] == 0.0
    code, _, _ = run_cli(["tasks", "resume", str(out), "--backend", "local", "--quiet"], capsys)
    assert code == 0 and results(out)["counts"]["complete"] == 4


def test_no_payment_account_names_the_yagna_command(yagna: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _use(monkeypatch, yagna)
    code, _, err = run_cli(["tasks", "create", str(_golem_task(tmp_path, payment_network="sepolia")), "--backend",
                            "golem", "--output", str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2 and "yagna payment init --sender --driver erc20 --network sepolia" in err
    assert not (tmp_path / "out").exists()


def test_allocation_refused_by_yagna_is_a_clear_error(yagna: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, yagna)
    backend = GolemBackend(1, None, GolemOptions(image_hash=HASH), bid=1.0)
    (tmp_path / "resources").mkdir()
    with backend:
        backend.start(tmp_path / "resources", tmp_path / "scratch")
        with pytest.raises(TaskError, match=r"yagna could not reserve 1 GLM on erc20-hoodi-tglm: .*payment fund"):
            backend._call(backend._allocate(), timeout=120)


def test_bad_app_key_and_absent_yagna(yagna: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _use(monkeypatch, yagna)
    task = str(_golem_task(tmp_path))
    monkeypatch.setenv("YAGNA_APPKEY", "wrong")
    code, _, err = run_cli(["tasks", "create", task, "--backend", "golem", "--quiet"], capsys)
    assert code == 2 and "yagna refused this app key" in err and "yagna app-key create" in err
    monkeypatch.setenv("YAGNA_API_URL", f"http://127.0.0.1:{_free_port()}")
    code, _, err = run_cli(["tasks", "create", task, "--backend", "golem", "--quiet"], capsys)
    assert code == 2 and "no yagna answers at" in err and "yagna service run" in err
    monkeypatch.delenv("YAGNA_APPKEY")
    code, _, err = run_cli(["tasks", "create", task, "--backend", "golem", "--quiet"], capsys)
    assert code == 2 and "YAGNA_APPKEY: is not set" in err


def test_missing_image_hash_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = write_task(tmp_path, task_dict())
    code, _, err = run_cli(["tasks", "create", str(task), "--backend", "golem", "--quiet"], capsys)
    assert code == 2 and "options.golem.image_hash" in err and "mltask image gvmi" in err


# Market arithmetic, without yagna ---------------------------------------------------------

OFFER = {"golem.com.usage.vector": ["golem.usage.cpu_sec", "golem.usage.duration_sec"],
         "golem.com.pricing.model.linear.coeffs": [0.0001, 0.00005, 0.01]}


def test_offer_price_per_hour_from_the_linear_model() -> None:
    price = offer_price(OFFER, threads=2)
    assert price == OfferPrice(start=0.01, per_hour=pytest.approx(3600 * (0.00005 + 2 * 0.0001)))
    assert offer_price({}, 1) is None
    assert offer_price({**OFFER, "golem.com.usage.vector": ["golem.usage.gpu_sec", "golem.usage.duration_sec"]},
                       1) is None  # an unknown counter could charge anything
    assert offer_price({**OFFER, "golem.com.pricing.model.linear.coeffs": [-1, 0, 0]}, 1) is None


class _Proposal:
    def __init__(self, issuer: str, properties: dict) -> None:
        self.data = type("Data", (), {"issuer_id": issuer, "properties": properties})()
        self.rejected: str | None = None

    async def get_data(self) -> Any:
        return self.data

    async def reject(self, reason: str = "") -> None:
        self.rejected = reason


CHEAP = {**OFFER, "golem.com.pricing.model.linear.coeffs": [0.00005, 0.00005, 0.0]}  # 0.36 GLM/h


def _node(digit: str) -> str:
    return "0x" + digit * 40


def _engaging() -> tuple[GolemBackend, list[tuple[str, str]]]:
    """A backend (bid 0.5 GLM/h) that records whom it would engage, as (node id, name)."""
    backend = GolemBackend(2, ProviderOptions(cpus=1), GolemOptions(image_hash=HASH), bid=0.5)
    engaged: list[tuple[str, str]] = []

    async def engage(proposal: Any, provider_id: str, price: OfferPrice, name: str) -> None:
        engaged.append((provider_id, name))

    backend._engage = engage  # type: ignore[method-assign]
    return backend, engaged


def test_offers_above_the_bid_or_from_excluded_providers_are_rejected() -> None:
    backend, engaged = _engaging()
    dear = {**OFFER, "golem.com.pricing.model.linear.coeffs": [0.0002, 0.0002, 0.0]}  # 1.44 GLM/h
    offers = [_Proposal(_node("a"), CHEAP), _Proposal(_node("b"), dear), _Proposal(_node("c"), {}),
              _Proposal(_node("d"), CHEAP)]
    backend._excluded.add(_node("d"))
    for offer in offers:
        asyncio.run(backend._consider(offer))
    assert [node for node, _ in engaged] == [_node("a")]
    assert [o.rejected for o in offers] == [None, "above 0.5 GLM/h", "no linear price", "excluded"]
    assert backend._offers == {"seen": 4, "above_bid": 1, "unpriced": 1, "failed": 0}


def test_providers_are_known_by_their_node_id_whatever_they_call_themselves() -> None:
    backend, engaged = _engaging()
    for alias in ("honest", "../../../../tmp/x", "honest"):  # a name is the offer's own claim
        asyncio.run(backend._consider(_Proposal(_node("e"), {**CHEAP, "golem.node.id.name": alias})))
    assert [name for _, name in engaged] == [f"golem-{_node('e')}"] * 3  # one key across names and agreements
    odd = _Proposal("../x", CHEAP)
    asyncio.run(backend._consider(odd))
    assert odd.rejected == "not a node id" and len(engaged) == 3


def test_budget_refuses_a_subtask_that_could_pass_it() -> None:
    budget = Budget(cap=1.0, spent=0.6)
    price = OfferPrice(start=0.1, per_hour=0.9)
    budget.reserve("s1", budget.worst_case(price, 1200, first=True))  # 0.4: exactly the cap
    with pytest.raises(TaskError, match=r"options\.golem\.budget: the next subtask could cost up to 0\.0025"):
        budget.reserve("s2", budget.worst_case(price, 10, first=False))
    budget.release("s1")
    budget.reserve("s2", budget.worst_case(price, 10, first=False))


def test_failed_provider_is_let_go_and_never_engaged_again(tmp_path: Path) -> None:
    from concurrent.futures import Future

    from mltask.backends.golem import _Provider
    from mltask.definition import parse_definition
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(task_dict()), tmp_path, tmp_path / "out")
    backend = GolemBackend(1, None, GolemOptions(image_hash=HASH), bid=1.0)
    backend._scratch = tmp_path / "scratch"
    released: list[str] = []

    class _Resource:
        id = "agreement-1"

        async def destroy(self) -> None:
            released.append("activity")

        async def terminate(self, reason: str) -> None:
            released.append(f"agreement: {reason}")

    slot = _Provider("golem-p", "0xdead", OfferPrice(0, 0.5), agreement=_Resource(), activity=_Resource())
    backend._providers[slot.name] = slot
    loop = backend._loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    failed: Future = Future()
    backend.submit = lambda *a: None  # type: ignore[method-assign]
    slot.subtask, slot.future, slot.started, slot.deadline = task.next_subtask("golem-p"), failed, 0.0, 1e12
    failed.set_exception(RuntimeError("CommandFailed: mltask-provider exited 2"))
    [completion] = backend.wait(0)
    assert completion.error and "exited 2" in completion.error and completion.output_dir is None
    assert backend.idle_providers() == [] and "0xdead" in backend._excluded
    time.sleep(0.2)
    loop.call_soon_threadsafe(loop.stop)
    assert released == ["activity", "agreement: subtask failed"]


def test_a_failed_negotiation_does_not_end_the_market_search() -> None:
    backend = GolemBackend(2, ProviderOptions(cpus=1), GolemOptions(image_hash=HASH), bid=0.5)
    engaged: list[str] = []

    async def engage(proposal: Any, provider_id: str, price: OfferPrice, name: str) -> None:
        if provider_id == _node("b"):
            raise RuntimeError("agreement not approved")
        engaged.append(provider_id)

    class _Demand:
        async def initial_proposals(self) -> Any:
            for issuer in (_node("b"), _node("9")):
                yield _Proposal(issuer, CHEAP)

    backend._engage = engage  # type: ignore[method-assign]
    backend._demand = _Demand()
    asyncio.run(backend._search_market())
    assert engaged == [_node("9")] and backend._offers["failed"] == 1 and backend._fatal is None


class _Streaming:
    """An activity whose provider sends a result.json without end, as gftp would write it here."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.destroyed = False

    async def execute_commands(self, *commands: Any) -> Any:
        [download] = [c for c in commands if type(c).__name__ == "DownloadFile"]
        self.batch = _StreamingBatch(Path(download.dst_path))
        return self.batch

    async def destroy(self) -> None:
        self.destroyed = True


class _StreamingBatch:
    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.done = False
        self.cleaned = False
        self.execute_after_task = None

    async def wait(self, timeout: float) -> None:
        with self.destination.open("ab") as fh:  # 64 KiB every 10 ms, 16 MiB in all
            for _ in range(256):
                fh.write(bytes(64 * 1024))
                fh.flush()
                await asyncio.sleep(0.01)
        self.done = True

    async def cleanup(self) -> None:
        self.cleaned = True


class _Agreement:
    id = "agreement-2"

    async def terminate(self, reason: str) -> None:
        pass


def test_a_download_past_its_bound_is_stopped_in_flight_and_bans_its_provider(tmp_path: Path) -> None:
    from mltask.backends.golem import _Provider
    from mltask.definition import parse_definition
    from mltask.protocol import RESULT_FILE, result_size_limit
    from mltask.scheduler import make_verifier
    from mltask.task import HyperparameterSearchTask

    task = HyperparameterSearchTask.create(parse_definition(task_dict()), tmp_path, tmp_path / "out")
    backend = GolemBackend(1, None, GolemOptions(image_hash=HASH), bid=1.0)
    backend._scratch = tmp_path / "scratch"
    activity = _Streaming()
    slot = _Provider(provider_name(_node("f")), _node("f"), OfferPrice(0, 0.5), _Agreement(), activity)
    backend._providers[slot.name] = slot
    loop = backend._loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        subtask = task.next_subtask(slot.name)
        backend.submit(slot.name, subtask, 60)
        done: list = []
        while not done:
            done = backend.wait(1.0)
        result = backend._scratch / slot.name / subtask.subtask_id / RESULT_FILE
        size = result.stat().st_size
        time.sleep(0.3)
        assert result.stat().st_size == size  # stopped: nothing more arrives
        # Past the bound by at most a few polls' worth of chunks, never the 16 MiB sent.
        assert result_size_limit(subtask) < size < result_size_limit(subtask) + (2 << 20)
        assert activity.batch.cleaned and not activity.batch.done
        [completion] = done
        assert completion.refused and "passed the" in completion.refused and completion.output_dir is None
        make_verifier(task).settle(completion, 0.0)
        assert slot.name in task.store.bans() and task.progress().done == 0
        assert backend.idle_providers() == [] and _node("f") in backend._excluded
    finally:
        loop.call_soon_threadsafe(loop.stop)
