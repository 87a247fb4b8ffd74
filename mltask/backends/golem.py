"""The golem backend: providers on the Golem network, through golem-core and a yagna node.

golem-core is asynchronous and the :class:`~mltask.backends.base.Backend` interface is not,
so the Golem side lives in one asyncio loop on a thread of its own; ``submit`` schedules
work there and ``wait`` collects the futures that ended.

The market: one demand for the provider image (``RepositoryVmPayload`` with the image hash
and URL, memory, storage and CPU threads from ``options.provider``) on the subnet, with
our payment platform. Offers dearer than the task's ``bid`` (GLM per hour, from the linear
pricing model) are rejected; at most ``workers`` providers are engaged at once. Each gets
an agreement and one activity: Deploy, Start and the resources once
(:func:`~mltask.backends.commands.setup_commands`), then per subtask the commands of
:func:`~mltask.backends.commands.subtask_commands`, bounded by ``subtask_timeout``. A
provider whose subtask fails or times out loses its agreement and is not engaged again in
this run (verification bans are the scheduler's, as on every backend); the market then
finds another. Providers are named after their node id (``golem-0x...``), never after the
name an offer gives itself, so a ban holds whatever a provider calls itself.

A provider's ``result.json`` arrives through gftp, which writes whatever the provider
sends: the download is watched while in flight and stopped once the file passes its
subtask's bound (:func:`~mltask.protocol.result_size_limit`), which bans the provider as
a docker output past its bounds does. Each transfer's gftp server is stopped when its
batch ends, so nothing can arrive after the result was read.

Debit notes and invoices are accepted from one allocation of ``options.golem.budget``
GLM, created when the first agreement is about to be made (so the demand can be
published, and the market searched, before any payment is possible); a subtask that could
take spending past the budget is not started.

What cannot be tested here: no provider agent runs on these machines, so everything from
an agreement on (activities, transfers, payments) has been exercised only against the
real image through the same command values (tests/test_golem_commands.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from mltask.backends import commands as cmd
from mltask.backends.base import Backend, Completion
from mltask.definition import GolemOptions, ProviderOptions, duration_seconds
from mltask.errors import TaskError
from mltask.protocol import RESULT_FILE, SUBTASK_FILE, SubtaskDefinition, dumps, result_size_limit, write_json_atomic

_USAGE_DURATION = "golem.usage.duration_sec"
_USAGE_CPU = "golem.usage.cpu_sec"
_INVOICE_WAIT_SECONDS = 60
_NEGOTIATION_SECONDS = 300  # offer to a provider ready with the resources
_DOWNLOAD_POLL_SECONDS = 0.05  # how often a download in flight is measured against its bound
_NODE_ID = re.compile(r"^0x[0-9a-f]{40}$")


class OversizeDownload(Exception):
    """A provider sent more than its result may hold; the download was stopped."""


def provider_name(node_id: str) -> str | None:
    """The name a provider goes by here (its stores, bans, scratch dir): its node id, if it is one."""
    return f"golem-{node_id}" if _NODE_ID.match(node_id) else None


@dataclass(frozen=True)
class OfferPrice:
    """An offer's linear price: a start fee and GLM per hour for ``threads`` busy threads."""

    start: float
    per_hour: float


def offer_price(properties: dict[str, Any], threads: float) -> OfferPrice | None:
    """The price of an offer, or ``None`` if it does not state a linear price we understand."""
    coeffs = properties.get("golem.com.pricing.model.linear.coeffs")
    usage = properties.get("golem.com.usage.vector")
    if not isinstance(coeffs, list) or not isinstance(usage, list) or len(coeffs) != len(usage) + 1:
        return None
    try:
        rates = dict(zip(usage, (float(c) for c in coeffs[:-1]), strict=True))
        start = float(coeffs[-1])
    except (TypeError, ValueError):
        return None
    if any(r < 0 for r in rates.values()) or start < 0 or set(rates) - {_USAGE_DURATION, _USAGE_CPU}:
        return None  # an unknown usage counter could charge anything
    return OfferPrice(start, 3600 * (rates.get(_USAGE_DURATION, 0.0) + threads * rates.get(_USAGE_CPU, 0.0)))


@dataclass
class Budget:
    """Spending so far plus the most that running subtasks can still cost, against a cap."""

    cap: float
    spent: float = 0.0
    reserved: dict[str, float] = field(default_factory=dict)  # subtask id -> worst-case cost

    def worst_case(self, price: OfferPrice, seconds: float, first: bool) -> float:
        return price.per_hour * seconds / 3600 + (price.start if first else 0.0)

    def reserve(self, subtask_id: str, cost: float) -> None:
        """Set ``cost`` aside for a subtask, or refuse if that could pass the cap."""
        if self.spent + sum(self.reserved.values()) + cost > self.cap:
            raise TaskError(
                "options.golem.budget", f"the next subtask could cost up to {cost:.4f} GLM, which could take "
                f"spending past the budget of {self.cap:g} GLM ({self.spent:.4f} spent); raise "
                "options.golem.budget and `mltask tasks resume --task`"
            )
        self.reserved[subtask_id] = cost

    def release(self, subtask_id: str) -> None:
        self.reserved.pop(subtask_id, None)


@dataclass
class _Provider:
    name: str
    provider_id: str
    price: OfferPrice
    agreement: Any
    activity: Any
    subtask: SubtaskDefinition | None = None
    future: Any = None
    deadline: float = 0.0
    started: float = 0.0
    subtasks: int = 0


def yagna_url() -> str:
    return os.environ.get("YAGNA_API_URL", "http://127.0.0.1:7465").rstrip("/")


def _get(path: str, app_key: str) -> Any:
    request = urllib.request.Request(f"{yagna_url()}{path}", headers={"Authorization": f"Bearer {app_key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


class GolemBackend(Backend):
    name = "golem"

    def __init__(self, workers: int | None, provider: ProviderOptions | None, golem: GolemOptions | None,
                 bid: float = 1.0) -> None:
        self.workers = workers or 2
        self.limits = provider or ProviderOptions()
        self.options = golem or GolemOptions()
        self.bid = bid
        # As golem-core and yapapi do: the task's choice, else the usual YAGNA_* environment; the network
        # defaults to yagna's own default (hoodi since 0.17.4; golem-core still says holesky, which is gone).
        self.network = self.options.payment_network or os.environ.get("YAGNA_PAYMENT_NETWORK", "hoodi")
        self.driver = self.options.payment_driver or os.environ.get("YAGNA_PAYMENT_DRIVER", "erc20")
        self.subnet = self.options.subnet or os.environ.get("YAGNA_SUBNET", "public")
        self.budget = Budget(self.options.budget)
        self._app_key = os.environ.get("YAGNA_APPKEY", "")
        self._providers: dict[str, _Provider] = {}
        self._excluded: set[str] = set()  # provider ids not to engage again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: Any = None
        self._demand: Any = None
        self._allocation: Any = None
        self._market: Any = None
        self._market_deadline = 0.0
        self._fatal: TaskError | None = None
        self._offers = {"seen": 0, "above_bid": 0, "unpriced": 0, "failed": 0}
        self._costs: dict[str, float] = {}  # subtask id -> estimated GLM (price x time)
        self._due: dict[str, float] = {}  # agreement id -> GLM billed so far
        self._spent_by: dict[str, float] = {}  # provider -> GLM billed
        self._released: dict[str, str] = {}  # agreement id -> provider, after we let it go
        self._invoiced: set[str] = set()  # agreement ids whose invoice we accepted
        self._resources: list[Path] = []
        self._scratch = Path()

    @property
    def platform(self) -> str:
        token = "glm" if self.network in ("mainnet", "polygon") else "tglm"
        return f"{self.driver}-{self.network}-{token}"

    def check(self) -> None:
        if not self.options.image_hash:
            raise TaskError("options.golem.image_hash", "is needed for the golem backend; build the image with "
                            "`mltask image gvmi` and put the hash it prints here")
        try:
            import golem  # noqa: F401
        except ImportError:
            raise TaskError("--backend", 'golem-core is missing; `pip install -e ".[golem]"`') from None
        if not self._app_key:
            raise TaskError("YAGNA_APPKEY", "is not set; create a key with `yagna app-key create requestor` and "
                            "export YAGNA_APPKEY=<key>")
        try:
            me = _get("/me", self._app_key)
            accounts = _get("/payment-api/v1/requestorAccounts", self._app_key)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise TaskError("YAGNA_APPKEY", "yagna refused this app key; list keys with `yagna app-key list` "
                                "or create one with `yagna app-key create requestor`") from None
            raise TaskError("yagna", f"yagna at {yagna_url()} answered HTTP {exc.code}; check YAGNA_API_URL") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TaskError("yagna", f"no yagna answers at {yagna_url()} ({getattr(exc, 'reason', exc)}); start it "
                            "with `yagna service run` or set YAGNA_API_URL") from None
        if not any(a.get("platform") == self.platform and a.get("send") for a in accounts):
            raise TaskError(
                "options.golem.payment_network", f"yagna ({me.get('identity')}) has no {self.platform} account to "
                f"pay from; run `yagna payment init --sender --driver {self.driver} --network "
                f"{self.network}` (and fund it, e.g. `yagna payment fund --network {self.network}` on a testnet)"
            )
        self._identity = me["identity"]

    # The loop thread ---------------------------------------------------------------------

    def start(self, resources_dir: Path, scratch_dir: Path) -> None:
        self.check()
        self._resources = sorted(p for p in resources_dir.iterdir() if p.is_file())
        self._scratch = scratch_dir
        scratch_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="golem", daemon=True).start()
        self._call(self._open(), timeout=60)
        self._market_deadline = time.monotonic() + duration_seconds(self.options.market_timeout)
        self._market = asyncio.run_coroutine_threadsafe(self._search_market(), self._loop)

    def _call(self, coroutine: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _open(self) -> None:
        from golem.node import GolemNode
        from golem.payload import RepositoryVmPayload
        from golem.payload.constraints import Constraint
        from golem.payload.defaults import ActivityInfo, NodeInfo
        from golem.resources import Demand, DemandBuilder, NewResource

        self._node = GolemNode(app_key=self._app_key, api_url=yagna_url())
        await self._node.start()
        await self._node.event_bus.on(NewResource, self._pay)
        image_url = self.options.image_url or "http://girepo.dev.golem.network:8000/download/" + self.options.image_hash
        payload = RepositoryVmPayload(
            image_hash=self.options.image_hash, image_url=self.options.image_url,
            package_url=f"hash:sha3:{self.options.image_hash}:{image_url}",
            min_mem_gib=self.limits.memory_gib, min_storage_gib=self.limits.storage_gib,
            min_cpu_threads=max(1, round(self.limits.cpus)),
        )
        builder = DemandBuilder()
        expiration = datetime.now(timezone.utc) + timedelta(hours=6)
        await builder.add(ActivityInfo(expiration=expiration, multi_activity=True))
        await builder.add(NodeInfo(subnet_tag=self.subnet))
        await builder.add(payload)
        # The payment platform, as an allocation would add it: the allocation itself waits
        # for the first agreement, since creating one needs the payment network.
        builder.add_properties({f"golem.com.payment.platform.{self.platform}.address": self._identity})
        builder.add_constraints(Constraint(f"golem.com.payment.platform.{self.platform}.address", "=", "*"))
        self._demand = await Demand.create_from_properties_constraints(self._node, builder.properties,
                                                                       builder.constraints)
        self._node.add_autoclose_resource(self._demand)  # unsubscribed when the node closes
        self._demand.start_collecting_events()

    async def _pay(self, event: Any) -> None:
        """Accept debit notes and invoices of our agreements, counting what is spent."""
        from golem.resources import DebitNote, Invoice

        document = event.resource
        if not isinstance(document, DebitNote | Invoice) or self._allocation is None:
            return
        data = await document.get_data()
        ours = {s.agreement.id: s.name for s in self._providers.values()} | self._released
        if data.agreement_id not in ours:
            return  # another requestor's, on a shared yagna
        amount = float(data.total_amount_due if isinstance(document, DebitNote) else data.amount)
        provider = ours[data.agreement_id]
        self.budget.spent += max(0.0, amount - self._due.get(data.agreement_id, 0.0))
        self._due[data.agreement_id] = max(amount, self._due.get(data.agreement_id, 0.0))
        self._spent_by[provider] = self._due[data.agreement_id]
        await _quietly(document.accept_full(self._allocation))
        if isinstance(document, Invoice):
            self._invoiced.add(data.agreement_id)

    async def _search_market(self) -> None:
        """Engage providers from the offers until ``workers`` are busy; runs all along."""
        try:
            async for proposal in self._demand.initial_proposals():
                if len(self._providers) >= self.workers:
                    await _quietly(proposal.reject("enough providers"))
                    continue
                try:
                    await asyncio.wait_for(self._consider(proposal), timeout=_NEGOTIATION_SECONDS)
                except TaskError:
                    raise
                except Exception:  # one provider's negotiation failed or stalled: on to the next offer
                    self._offers["failed"] += 1
        except TaskError as exc:
            self._fatal = exc

    async def _consider(self, proposal: Any) -> None:
        self._offers["seen"] += 1
        data = await proposal.get_data()
        provider_id = data.issuer_id
        name = provider_name(provider_id)
        price = offer_price(data.properties, self.limits.cpus)
        if provider_id in self._excluded:
            await _quietly(proposal.reject("excluded"))
        elif name is None:
            await _quietly(proposal.reject("not a node id"))
        elif price is None:
            self._offers["unpriced"] += 1
            await _quietly(proposal.reject("no linear price"))
        elif price.per_hour > self.bid:
            self._offers["above_bid"] += 1
            await _quietly(proposal.reject(f"above {self.bid} GLM/h"))
        else:
            await self._engage(proposal, provider_id, price, name)

    async def _engage(self, proposal: Any, provider_id: str, price: OfferPrice, name: str) -> None:
        response = await proposal.respond()
        counter = await asyncio.wait_for(anext(response.responses()), timeout=60)
        if self._allocation is None:
            self._allocation = await self._allocate()
        agreement = await counter.create_agreement()
        await agreement.confirm()
        if not await agreement.wait_for_approval():
            self._excluded.add(provider_id)
            return
        activity = await agreement.create_activity()
        slot = _Provider(name, provider_id, price, agreement, activity)
        await self._execute(activity, cmd.setup_commands(self._resources), timeout=600)
        self._providers[slot.name] = slot

    async def _allocate(self) -> Any:
        """Reserve the budget; yagna's refusal becomes a one-line error with the fix."""
        from golem.resources import NoMatchingAccount
        from ya_payment.exceptions import ApiException

        try:
            return await self._node.create_allocation(self.options.budget, network=self.network,
                                                      driver=self.driver)
        except NoMatchingAccount:
            raise TaskError("options.golem.payment_network", f"yagna has no {self.platform} account; run `yagna "
                            f"payment init --sender --driver {self.driver} --network "
                            f"{self.network}`") from None
        except ApiException as exc:
            try:
                detail = json.loads(exc.body).get("internalError") or exc.reason
            except (TypeError, ValueError, AttributeError):
                detail = exc.reason
            raise TaskError("options.golem.budget", f"yagna could not reserve {self.options.budget:g} GLM on "
                            f"{self.platform}: {str(detail)[:200]}; check `yagna payment status --network "
                            f"{self.network}` (fund it with `yagna payment fund --network {self.network}` on a "
                            "testnet) and that yagna reaches its payment network") from None

    async def _execute(self, activity: Any, commands: list[cmd.Command], timeout: float,
                       limit: int | None = None) -> None:
        """Run ``commands`` as one batch; a download passing ``limit`` bytes is stopped in flight."""
        from golem.resources import Deploy, DownloadFile, Run, SendFile, Start

        translated = []
        for command in commands:
            if isinstance(command, cmd.Deploy):
                translated.append(Deploy())
            elif isinstance(command, cmd.Start):
                translated.append(Start())
            elif isinstance(command, cmd.SendFile):
                translated.append(SendFile(str(command.src), command.dst))
            elif isinstance(command, cmd.Run):
                translated.append(Run(list(command.args)))
            else:
                # gftp writes into dst itself only if dst does not exist yet (else into a temporary
                # file, copied afterwards): gone, it is the very file whose size is watched.
                command.dst.unlink(missing_ok=True)
                translated.append(DownloadFile(command.src, str(command.dst)))
        downloads = [Path(c.dst) for c in commands if isinstance(c, cmd.DownloadFile)]
        batch = await activity.execute_commands(*translated)
        try:
            await _bounded(batch.wait(timeout=timeout), downloads, limit)
        finally:
            await _end_transfers(batch, translated)

    async def _run_subtask(self, slot: _Provider, subtask_file: Path, result_file: Path, timeout: float,
                           limit: int) -> None:
        await self._execute(slot.activity, cmd.subtask_commands(subtask_file, result_file), timeout, limit)

    async def _release(self, slot: _Provider, reason: str) -> None:
        self._released[slot.agreement.id] = slot.name  # its invoice is still to come and to be paid
        await _quietly(slot.activity.destroy())
        await _quietly(slot.agreement.terminate(reason))

    # The Backend interface ---------------------------------------------------------------

    def expecting_providers(self) -> bool:
        if self._fatal is not None:
            raise self._fatal
        if self._market is not None and self._market.done() and self._market.exception():
            raise TaskError("golem", f"the market search failed: {self._market.exception()}")
        if not self._providers and time.monotonic() > self._market_deadline:
            seen = self._offers
            raise TaskError(
                "options.golem.market_timeout",
                f"no provider within {self.options.market_timeout} for image {self.options.image_hash[:12]}... with "
                f">= {self.limits.memory_gib:g} GiB, >= {self.limits.cpus:g} CPU threads, <= {self.bid:g} GLM/h on "
                f"subnet {self.subnet!r} ({seen['seen']} offers, {seen['above_bid']} above the bid); raise "
                "bid or market_timeout, or check providers can download the image, then `mltask tasks resume`",
            )
        return True

    def idle_providers(self) -> list[str]:
        return [s.name for s in list(self._providers.values()) if s.subtask is None]

    def submit(self, provider: str, subtask: SubtaskDefinition, timeout: float) -> None:
        slot = self._providers[provider]
        self.budget.reserve(subtask.subtask_id, self.budget.worst_case(slot.price, timeout, slot.subtasks == 0))
        work = self._scratch / provider / subtask.subtask_id
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / SUBTASK_FILE, dumps(subtask))
        slot.subtask, slot.started, slot.deadline = subtask, time.monotonic(), time.monotonic() + timeout
        slot.subtasks += 1
        assert self._loop is not None
        slot.future = asyncio.run_coroutine_threadsafe(
            self._run_subtask(slot, work / SUBTASK_FILE, work / RESULT_FILE, timeout, result_size_limit(subtask)),
            self._loop)

    def wait(self, timeout: float) -> list[Completion]:
        end = time.monotonic() + timeout
        while True:
            done = [c for c in map(self._check, list(self._providers.values())) if c]
            if done or time.monotonic() >= end:
                return done
            time.sleep(0.05)

    def _check(self, slot: _Provider) -> Completion | None:
        subtask = slot.subtask
        if subtask is None:
            return None
        if not slot.future.done() and time.monotonic() < slot.deadline + 5:
            return None
        slot.subtask = None
        self.budget.release(subtask.subtask_id)
        seconds = time.monotonic() - slot.started
        cost = self.budget.worst_case(slot.price, seconds, slot.subtasks == 1)
        self._costs[subtask.subtask_id] = round(cost, 6)
        refused = None
        if not slot.future.done():
            error = f"timed out after {slot.deadline - slot.started:g} s"
        elif isinstance(slot.future.exception(), OversizeDownload):
            error = refused = str(slot.future.exception())
        elif slot.future.exception() is not None:
            error = f"{type(slot.future.exception()).__name__}: {slot.future.exception()}"
        else:
            return Completion(slot.name, subtask, self._scratch / slot.name / subtask.subtask_id)
        # A provider that failed is let go; the market finds another.
        del self._providers[slot.name]
        self._excluded.add(slot.provider_id)
        slot.future.cancel()
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._release(slot, "subtask failed"), self._loop)
        return Completion(slot.name, subtask, None, error[:500], refused)

    def costs(self) -> dict[str, object]:
        if self._node is None:
            return {}
        return {"currency": "GLM" if self.platform.endswith("-glm") else "tGLM", "budget": self.budget.cap,
                "spent": round(self.budget.spent, 6), "billed_by_provider": self._spent_by,
                "estimated_by_subtask": self._costs, "offers": dict(self._offers)}

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._close(), timeout=120)
        except Exception:  # closing must not hide the error that brought us here
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None

    async def _close(self) -> None:
        if self._market is not None:
            self._market.cancel()
        for slot in list(self._providers.values()):
            await self._release(slot, "task finished")
        # Providers invoice after the agreement ends; pay them before leaving.
        deadline = time.monotonic() + _INVOICE_WAIT_SECONDS
        while set(self._released) - self._invoiced and time.monotonic() < deadline:
            await asyncio.sleep(1)
        if self._node is not None:
            await _quietly(self._node.aclose())
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


async def _bounded(waiting: Any, downloads: list[Path], limit: int | None) -> None:
    """Await a batch, stopping it once a file it downloads passes ``limit`` bytes.

    gftp writes chunks at whatever offsets the provider sends, so the file's size (not its
    blocks) is what is measured; at most one poll interval of data arrives past the bound.
    """
    batch = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({batch}, timeout=_DOWNLOAD_POLL_SECONDS)
            if done:
                return batch.result()
            for path in downloads if limit is not None else []:
                if _size(path) > limit:
                    raise OversizeDownload(f"{path.name} passed the {limit}-byte bound for this subtask while "
                                           "downloading; the download was stopped")
    finally:
        batch.cancel()


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


async def _end_transfers(batch: Any, commands: list[Any]) -> None:
    """Stop the gftp server of each transfer in ``batch`` once the batch is over.

    golem-core 0.7.8 starts one ``gftp server`` per SendFile/DownloadFile and never stops it;
    a receiving one would take chunks for as long as it runs, after the result was read. A
    finished batch first gets its commands' ``after`` steps; an unfinished one has them
    cancelled, so nothing is copied from a download that was stopped.
    """
    if batch.done:
        await _quietly(batch.execute_after_task)
    else:
        await _quietly(batch.cleanup())
    for command in commands:
        gftp = getattr(command, "_gftp", None)  # golem-core's own handle on the transfer's server
        if gftp is not None:
            await _quietly(gftp.__aexit__(None, None, None))


async def _quietly(awaitable: Any) -> None:
    """A courtesy call to yagna (reject, terminate) whose failure changes nothing for us."""
    try:
        await awaitable
    except Exception:
        pass


__all__ = ["Budget", "GolemBackend", "OfferPrice", "OversizeDownload", "offer_price", "provider_name"]
