"""VNIC lifecycle from libvirt domain events: the hypervisor agent's second source.

The inventory file says what VNICs a hypervisor has; on a libvirt host the
hypervisor itself knows better.  This module turns libvirt's view into the
agent's operations, in two layers:

**Mapping (sans-I/O, no libvirt import).**

* ``plan_domain(xml)``: domain XML -> one ``VnicPlan`` per ``<interface>``:
  VNIC Name, MAC, port, VN and IPs.  Each interface is one VNIC, the root of
  the draft's containment tree (section 3.1: VNIC -- VN -- MAC -- IP), attached
  to exactly one VN with one MAC.

  - **VNIC Name.**  A libvirt interface has a MAC but no UUID, and a MAC
    cannot be a VNIC Name (section 2: MACs are not globally unique).  The name
    is ``uuid5(VNIC_NAMESPACE, "<domain uuid>/<mac>")``, both lower case.  It is
    stable across restarts, and across hosts, since a migrated domain keeps its
    UUID and MACs: the destination announces the same VNIC the source had,
    which is what a migration needs (section 4.4).  ``<nvo3:interface name=…>``
    overrides it.
  - **VN.**  The ``<nvo3:interface mac=… vn=…>`` element in the domain's
    ``<metadata>`` (namespace ``NVO3_NS``) if there is one for that MAC;
    otherwise the interface's ``<source network='N'/>`` names VN alias ``N``.
    ``vn`` is read like ``nvo3 agent ctl --vn``: digits are a VN ID, a UUID a
    VN Name, anything else an alias.  Any other interface (a bridge or direct
    interface with no metadata) is not managed, and is listed in ``skipped``.
  - **Port** (the hypervisor's link to the NVE, the tag space): the metadata's
    ``port``, else the agent's default port.
  - **IPs**: the interface's ``<ip address=…>`` elements (host addresses; their
    ``prefix`` is the subnet, not a range) and the metadata's
    ``<nvo3:ip address=…>`` children, which may be prefixes (a VIP range,
    section 3.1).  An L3 VN needs one (section 3.1.2): the NVE refuses
    ``ip_required`` otherwise.

  ::

      <metadata>
        <nvo3:vnics xmlns:nvo3="urn:nvo3:libvirt:1">
          <nvo3:interface mac="52:54:00:00:00:02" vn="red" port="eth1">
            <nvo3:ip address="10.2.0.11"/>
            <nvo3:ip address="10.2.100.0/28"/>
          </nvo3:interface>
        </nvo3:vnics>
      </metadata>

* ``decide(event, detail, phase, persistent)``: a libvirt lifecycle event ->
  an ``Intent`` and the domain's next ``Phase`` (section 4.4, and 4.3 for what
  a shutdown or departure withdraws):

  ============================  ===========  ==========================================
  libvirt event/detail          intent       agent call, per VNIC of the domain
  ============================  ===========  ==========================================
  STARTED/BOOTED, RESTORED,     START        ``connect`` + ``associate`` (4.1, 4.2), or,
  FROM_SNAPSHOT, WAKEUP                      for a VNIC it knows down, ``startup``
                                             after any change of VN or addresses
  STOPPED/SHUTDOWN, DESTROYED,  SHUTDOWN     ``shutdown`` (4.4; the NVE withdraws the
  CRASHED, SAVED, FAILED,                    bindings at once and keeps the VNIC) for a
  FROM_SNAPSHOT                              persistent domain; REMOVE for a transient
                                             one, which is gone
  UNDEFINED (domain not         REMOVE       ``remove_vnic``: vnic_disassociate, the
  running), STOPPED of a                     whole tree at once (3.1)
  transient or prepared domain
  STARTED/MIGRATED              PREPARE      ``prepare``: pre-arrival handshake (4.4)
  (destination, paused)
  RESUMED/MIGRATED, POSTCOPY    ARRIVE       ``arrive`` (4.4)
  (destination)
  STOPPED/MIGRATED (source)     DEPART       ``depart``: the NVE holds the bindings for
                                             its hold time (4.3, 4.4)
  anything else                 IGNORE       nothing (suspend/resume keep the VNIC)
  ============================  ===========  ==========================================

**Adapter (asyncio).**  ``LibvirtSource`` opens a libvirt connection with
libvirt's asyncio event loop integration (``libvirtaio``), subscribes to
domain lifecycle events, applies the running domains once (START), then feeds
every event through ``decide`` and drives a ``HypervisorAgent`` through its
public methods.  The agent records each change in its desired state, so the
sidecar's ``hv_sync`` carries it after an NVE restart; a refusal (e.g.
``unknown_vn`` for a libvirt network that is no VN) is logged and counted and
affects only that VNIC.

libvirt's test driver (``test:///default``) emits STARTED, STOPPED,
SUSPENDED, RESUMED, DEFINED and UNDEFINED but cannot migrate; the migration
rows are those libvirt's QEMU driver emits (source: SUSPENDED/MIGRATED then
STOPPED/MIGRATED; destination: STARTED/MIGRATED then RESUMED/MIGRATED), and
are tested with synthetic events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from pydantic import ValidationError

from agents.agent import AgentError, HypervisorAgent, NveUnreachable, raise_if_cancelled
from agents.inventory import VnicSpec, VnicVn
from schemas.messages import AddressEntry, VnAddresses, VnRef
from schemas.types import normalize_ip_entry, normalize_mac, normalize_uuid
from schemas.wire import summarize

_log = logging.getLogger(__name__)

#: XML namespace of the nvo3 element in a domain's ``<metadata>``.
NVO3_NS = "urn:nvo3:libvirt:1"
#: uuid5 namespace of the VNIC Names derived from (domain UUID, MAC).
VNIC_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, NVO3_NS)


# ----------------------------------------------------------------- libvirt's numbers


class Event(IntEnum):
    """``virDomainEventType`` (libvirt's stable ABI; checked against libvirt in tests)."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


class Started(IntEnum):
    BOOTED = 0
    MIGRATED = 1
    RESTORED = 2
    FROM_SNAPSHOT = 3
    WAKEUP = 4


class Resumed(IntEnum):
    UNPAUSED = 0
    MIGRATED = 1
    FROM_SNAPSHOT = 2
    POSTCOPY = 3
    POSTCOPY_FAILED = 4


class Stopped(IntEnum):
    SHUTDOWN = 0
    DESTROYED = 1
    CRASHED = 2
    MIGRATED = 3
    SAVED = 4
    FAILED = 5
    FROM_SNAPSHOT = 6


# ---------------------------------------------------------------- domain XML -> VNICs


@dataclass(frozen=True)
class VnicPlan:
    """One libvirt interface as the agent's VNIC [3.1]."""

    name: str  # VNIC Name (UUID)
    mac: str
    port: str
    vn: VnRef
    ips: tuple[str, ...] = ()
    source: str = "network"  # where the VN came from: "metadata" or "network"

    @property
    def entries(self) -> tuple[AddressEntry, ...]:
        return (AddressEntry(mac=self.mac, ips=self.ips),)

    @property
    def vns(self) -> tuple[VnAddresses, ...]:
        return (VnAddresses(vn=self.vn, entries=self.entries),)

    def spec(self, vm: str = "") -> VnicSpec:
        """As an inventory entry (``HypervisorAgent.set_inventory``)."""
        return VnicSpec(name=self.name, vm=vm, port=self.port,
                        vns=(VnicVn(vn=self.vn, addresses=self.entries),))


@dataclass(frozen=True)
class DomainPlan:
    uuid: str
    name: str
    vnics: tuple[VnicPlan, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (interface MAC or "?", why)


def vnic_name(domain_uuid: str, mac: str) -> str:
    """The VNIC Name of a libvirt interface: uuid5 of "<domain uuid>/<mac>" [2]."""
    return str(uuid.uuid5(VNIC_NAMESPACE, f"{normalize_uuid(domain_uuid)}/{normalize_mac(mac)}"))


def vn_ref(text: str) -> VnRef:
    """A VN reference as ``nvo3 agent ctl --vn`` reads it: ID, Name (UUID) or alias."""
    text = text.strip()
    if text.isdigit():
        return VnRef(id=int(text))
    with contextlib.suppress(ValueError):
        return VnRef(name=str(uuid.UUID(text)))
    return VnRef(alias=text)


def _q(tag: str) -> str:
    return f"{{{NVO3_NS}}}{tag}"


def _metadata(root: ET.Element) -> dict[str, ET.Element]:
    """``<nvo3:interface>`` elements of the domain's metadata, by normalized MAC."""
    out: dict[str, ET.Element] = {}
    for vnics in root.findall(f"metadata/{_q('vnics')}"):
        for iface in vnics.findall(_q("interface")):
            with contextlib.suppress(ValueError):
                out[normalize_mac(iface.get("mac", ""))] = iface
    return out


def plan_domain(xml: str, *, default_port: str = "eth0") -> DomainPlan:
    """Domain XML (``virDomainGetXMLDesc``) -> the VNICs to announce [3.1]."""
    root = ET.fromstring(xml)
    dom_uuid = normalize_uuid(root.findtext("uuid", ""))
    name = root.findtext("name", "")
    meta = _metadata(root)
    vnics: list[VnicPlan] = []
    skipped: list[tuple[str, str]] = []
    for iface in root.findall("devices/interface"):
        mac_el = iface.find("mac")
        raw_mac = "" if mac_el is None else mac_el.get("address", "")
        try:
            mac = normalize_mac(raw_mac)
        except ValueError as exc:
            skipped.append((raw_mac or "?", str(exc)))
            continue
        source = iface.find("source")
        network = None if source is None else source.get("network")
        ips = [ip.get("address", "") for ip in iface.findall("ip")]
        extra = meta.get(mac)
        port = default_port
        vnic = None
        try:
            if extra is not None:
                if not extra.get("vn"):
                    raise ValueError("nvo3:interface has no vn attribute")
                vn, origin = vn_ref(extra.get("vn", "")), "metadata"
                port = extra.get("port") or default_port
                ips += [ip.get("address", "") for ip in extra.findall(_q("ip"))]
                if extra.get("name"):
                    vnic = normalize_uuid(extra.get("name"))
            elif network:
                vn, origin = vn_ref(network), "network"
            else:
                skipped.append((mac, f"interface type {iface.get('type')!r}: no network, "
                                     "no nvo3 metadata"))
                continue
            normalized = tuple(dict.fromkeys(normalize_ip_entry(ip) for ip in ips))
            plan = VnicPlan(name=vnic or vnic_name(dom_uuid, mac), mac=mac, port=port, vn=vn,
                            ips=normalized, source=origin)
            plan.spec()  # validates the port, names and addresses as the agent would
        except ValidationError as exc:
            skipped.append((mac, summarize(exc)))
            continue
        except ValueError as exc:
            skipped.append((mac, str(exc)))
            continue
        vnics.append(plan)
    return DomainPlan(dom_uuid, name, tuple(vnics), tuple(skipped))


# ------------------------------------------------------------ lifecycle event -> intent


class Phase(StrEnum):
    """What the source knows of a domain on this hypervisor."""

    ABSENT = "absent"  # not running here (never seen, departed, removed)
    PREPARED = "prepared"  # incoming migration, paused: pre-arrival announced
    RUNNING = "running"
    STOPPED = "stopped"  # persistent, shut off: VNICs down at the NVE


class Intent(StrEnum):
    IGNORE = "ignore"
    START = "start"  # connect + associate, or startup [4.1, 4.2, 4.4]
    SHUTDOWN = "shutdown"  # vnic_shutdown [4.4]
    REMOVE = "remove"  # vnic_disassociate [3.1, 4.3]
    PREPARE = "prepare"  # vnic_prepare: pre-arrival handshake [4.4]
    ARRIVE = "arrive"  # vnic_arrive [4.4]
    DEPART = "depart"  # vnic_depart [4.4]


@dataclass(frozen=True)
class Decision:
    intent: Intent
    phase: Phase  # the domain's phase after the event
    persistent: bool


def decide(event: int, detail: int, phase: Phase, persistent: bool) -> Decision:
    """One lifecycle event of a domain -> what the agent does [4.4]."""

    def to(intent: Intent, nxt: Phase, keep: bool = persistent) -> Decision:
        return Decision(intent, nxt, keep)

    active = phase in (Phase.RUNNING, Phase.PREPARED)
    if event == Event.STARTED:
        if detail == Started.MIGRATED:
            return to(Intent.PREPARE, Phase.PREPARED)
        return to(Intent.START, Phase.RUNNING)
    if event == Event.RESUMED:
        if detail in (Resumed.MIGRATED, Resumed.POSTCOPY) and phase != Phase.RUNNING:
            return to(Intent.ARRIVE, Phase.RUNNING)
        return to(Intent.IGNORE, phase)
    if event == Event.STOPPED:
        if detail == Stopped.MIGRATED:
            return to(Intent.DEPART if phase == Phase.RUNNING else Intent.IGNORE, Phase.ABSENT)
        if phase == Phase.PREPARED or (phase == Phase.RUNNING and not persistent):
            return to(Intent.REMOVE, Phase.ABSENT)  # an incoming migration failed / gone
        if phase == Phase.RUNNING:
            return to(Intent.SHUTDOWN, Phase.STOPPED)
        return to(Intent.IGNORE, phase)
    if event == Event.UNDEFINED:
        if active:  # a running domain that lost its definition becomes transient
            return to(Intent.IGNORE, phase, False)
        return to(Intent.REMOVE if phase == Phase.STOPPED else Intent.IGNORE, Phase.ABSENT)
    if event == Event.DEFINED:
        return to(Intent.IGNORE, phase, True if active else persistent)
    return to(Intent.IGNORE, phase)  # suspended, pmsuspended, shutdown, crashed


# ------------------------------------------------------------------ asyncio adapter


@dataclass(frozen=True)
class DomainEvent:
    uuid: str
    name: str
    event: int
    detail: int


@dataclass
class _Domain:
    phase: Phase = Phase.ABSENT
    persistent: bool = True
    plan: DomainPlan | None = None


def _libvirt() -> Any:
    """libvirt-python, imported only by the adapter (the mapping needs none)."""
    import libvirt  # type: ignore[import-untyped]

    return libvirt


def _libvirtaio() -> Any:
    import libvirtaio  # type: ignore[import-untyped]

    return libvirtaio


def open_connection(uri: str) -> Any:
    """Open ``uri`` with libvirt's events delivered by the running asyncio loop.

    libvirt takes one event loop implementation per process, for good: the
    first call registers ``libvirtaio`` for the running loop.  A later call
    from another loop (asyncio.run again, or a test's own loop) moves it there
    if it is idle, i.e. every connection was closed with ``close_connection``;
    otherwise it fails.
    """
    libvirt, libvirtaio = _libvirt(), _libvirtaio()
    loop = asyncio.get_running_loop()
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop)
    elif impl.loop is not loop:
        if not impl.is_idle():
            raise RuntimeError("libvirt's events are bound to another asyncio loop that "
                               "still has libvirt connections (one event loop per process)")
        # No handle or timer is registered: nothing refers to the old loop any more
        # (libvirtaio reads ``impl.loop`` each time it registers one).
        impl.loop = loop
    # libvirt prints every error to stderr by default; they are raised anyway.
    libvirt.registerErrorHandler(lambda _ctx, err: _log.debug("libvirt: %s", err), None)
    return libvirt.open(uri)


_NEEDS_XML = (Intent.START, Intent.PREPARE, Intent.ARRIVE)
_CLOSED = DomainEvent("", "", -1, -1)  # queued when libvirt closes the connection


async def close_connection(conn: Any) -> None:
    """Close a connection and run libvirt's pending free callbacks on this loop."""
    with contextlib.suppress(Exception):
        conn.close()
    impl = _libvirtaio().getCurrentImpl()
    if impl is not None and impl.loop is asyncio.get_running_loop():
        await impl.drain()


class LibvirtSource:
    """Drives a ``HypervisorAgent`` from libvirt domain lifecycle events [4.4]."""

    def __init__(self, agent: HypervisorAgent, conn: Any = None, *,
                 default_port: str = "eth0") -> None:
        self.agent = agent
        self.conn = conn
        self.default_port = default_port
        self.domains: dict[str, _Domain] = {}
        self.counters: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[DomainEvent, Any]] = asyncio.Queue()
        self._callback: int | None = None
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ subscription

    def subscribe(self) -> None:
        """Queue every domain lifecycle event from now on (before ``scan``)."""
        libvirt = _libvirt()
        self._callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        # libvirtd went away: no more events will come, so stop (visibly) instead of
        # serving a stale view; a supervisor restarts the agent, which scans again.
        self.conn.registerCloseCallback(
            lambda _conn, reason, _opaque: self._queue.put_nowait((_CLOSED, reason)), None)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        # Called by libvirtaio on the loop's thread: only queue.
        self._queue.put_nowait((DomainEvent(dom.UUIDString(), dom.name(), event, detail), dom))

    async def close(self) -> None:
        """Unsubscribe, close the connection, let libvirt's pending callbacks run."""
        if self.conn is None:
            return
        if self._callback is not None:
            with contextlib.suppress(Exception):
                self.conn.domainEventDeregisterAny(self._callback)
            with contextlib.suppress(Exception):
                self.conn.unregisterCloseCallback()
            self._callback = None
        conn, self.conn = self.conn, None
        await close_connection(conn)

    # ------------------------------------------------------------------ running

    async def scan(self) -> int:
        """Announce every running domain (START); returns how many there are."""
        libvirt = _libvirt()
        domains = await asyncio.to_thread(
            self.conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        for dom in domains:
            await self._dispatch(DomainEvent(dom.UUIDString(), dom.name(), Event.STARTED,
                                             Started.BOOTED), dom)
            raise_if_cancelled()
        return len(domains)

    async def run(self) -> None:
        """Scan, then handle events until cancelled."""
        await self.scan()
        while True:
            ev, dom = await self._queue.get()
            if ev is _CLOSED:
                raise ConnectionError(f"libvirt closed the connection (reason {dom})")
            await self._dispatch(ev, dom)
            raise_if_cancelled()

    async def _dispatch(self, ev: DomainEvent, dom: Any) -> None:
        """Read what the event needs from libvirt (off the loop), then ``handle`` it."""
        known = self.domains.get(ev.uuid, _Domain())
        if decide(ev.event, ev.detail, known.phase, known.persistent).intent not in _NEEDS_XML:
            await self.handle(ev)
            return
        libvirt = _libvirt()
        try:
            xml, persistent = await asyncio.to_thread(
                lambda: (dom.XMLDesc(0), bool(dom.isPersistent())))
        except libvirt.libvirtError as exc:  # gone meanwhile: a later event says so
            self.counters["xml_unavailable"] += 1
            _log.info("libvirt: domain %s: no XML (%s)", ev.name, exc)
            self._done()
            return
        await self.handle(ev, xml, persistent=persistent)

    async def handle(self, ev: DomainEvent, xml: str | None = None, *,
                     persistent: bool | None = None) -> Decision:
        """Apply one lifecycle event [4.4].

        ``xml`` is the domain's XML, needed for START, PREPARE and ARRIVE;
        ``persistent`` whether the domain has a persistent definition, when known.
        """
        dom = self.domains.get(ev.uuid, _Domain())
        if persistent is not None:
            dom.persistent = persistent
        decision = decide(ev.event, ev.detail, dom.phase, dom.persistent)
        self.counters[f"event:{_event_name(ev.event)}"] += 1
        self.counters[f"intent:{decision.intent}"] += 1
        _log.info("libvirt: %s %s/%s -> %s", ev.name, _event_name(ev.event), ev.detail,
                  decision.intent)
        old = dom.plan
        if decision.intent in _NEEDS_XML:
            if xml is None:
                raise ValueError(f"{decision.intent} of {ev.name} needs the domain XML")
            dom.plan = plan_domain(xml, default_port=self.default_port)
            for mac, why in dom.plan.skipped:
                self.counters["skipped_interfaces"] += 1
                _log.warning("libvirt: %s: interface %s not managed: %s", ev.name, mac, why)
        dom.phase, dom.persistent = decision.phase, decision.persistent
        if dom.phase == Phase.ABSENT:
            self.domains.pop(ev.uuid, None)
        else:
            self.domains[ev.uuid] = dom
        try:
            await self._apply(decision.intent, dom.plan, old, ev.name)
        finally:
            self._done()
        return decision

    def _done(self) -> None:
        self.counters["events_handled"] += 1
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds after a handled event (bound it by a timeout)."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    # ------------------------------------------------------------------ intents

    async def _apply(self, intent: Intent, plan: DomainPlan | None, old: DomainPlan | None,
                     domain: str) -> None:
        if intent == Intent.IGNORE or plan is None:
            return
        agent = self.agent
        if intent == Intent.START and old is not None and old is not plan:
            gone = {v.name for v in old.vnics} - {v.name for v in plan.vnics}
            for name in sorted(gone):  # interfaces removed from the definition
                if name in agent.desired.vnics:
                    await self._call(domain, "remove", agent.remove_vnic(name))
        for vnic in plan.vnics:
            if intent == Intent.START:
                await self._start(domain, vnic)
            elif intent == Intent.SHUTDOWN:
                entry = agent.desired.vnics.get(vnic.name)
                if entry is not None and entry.state == "up":
                    await self._call(domain, "shutdown", agent.shutdown(vnic.name))
            elif intent == Intent.REMOVE:
                if vnic.name in agent.desired.vnics or vnic.name in agent.vnic_nves:
                    await self._call(domain, "remove", agent.remove_vnic(vnic.name))
            elif intent == Intent.DEPART:
                if vnic.name in agent.desired.vnics:
                    await self._call(domain, "depart", agent.depart(vnic.name))
            elif intent == Intent.PREPARE:
                await self._call(domain, "prepare",
                                 agent.prepare(vnic.name, vnic.port, vnic.vns))
            elif intent == Intent.ARRIVE:
                await self._call(domain, "arrive", agent.arrive(vnic.name, vnic.port, vnic.vns))

    async def _start(self, domain: str, vnic: VnicPlan) -> None:
        """Make the NVE hold exactly this VNIC, up [4.1, 4.2, 4.4]."""
        agent = self.agent
        entry = agent.desired.vnics.get(vnic.name)
        if entry is None:
            if await self._call(domain, "connect", agent.connect(vnic.name, vnic.port, vnic.vn)):
                await self._call(domain, "associate",
                                 agent.associate(vnic.name, vnic.vn, vnic.entries))
            return
        was_down = entry.state == "down"
        for vn in [vn for vn in entry.vns if vn != vnic.vn]:  # the VN changed meanwhile
            await self._call(domain, "disconnect", agent.disconnect(vnic.name, vn))
        wanted = {vnic.mac: set(vnic.ips)}
        current = agent.desired.vnics.get(vnic.name)
        if current is None or vnic.vn not in current.vns:
            if not await self._call(domain, "connect",
                                    agent.connect(vnic.name, vnic.port, vnic.vn)):
                return
            await self._call(domain, "associate", agent.associate(vnic.name, vnic.vn,
                                                                  vnic.entries))
        elif current.vns[vnic.vn].macs != wanted:
            await self._call(domain, "replace", agent.replace(vnic.name, vnic.vn, vnic.entries))
        if was_down and vnic.name in agent.desired.vnics:
            await self._call(domain, "startup", agent.startup(vnic.name))

    async def _call(self, domain: str, op: str, request: Any) -> bool:
        """Await one agent operation; a refusal or an unreachable NVE is logged, not raised."""
        try:
            await request
        except AgentError as exc:
            self.counters[f"refused:{exc.code}"] += 1
            _log.warning("libvirt: %s: %s refused: %s", domain, op, exc)
            return False
        except NveUnreachable as exc:  # kept in the desired state: the next resync sends it
            self.counters["nve_unreachable"] += 1
            _log.warning("libvirt: %s: %s: %s", domain, op, exc)
            return False
        self.counters[f"op:{op}"] += 1
        return True


def _event_name(event: int) -> str:
    try:
        return Event(event).name.lower()
    except ValueError:
        return str(event)


async def serve(service: Any, source: LibvirtSource) -> None:
    """The sidecar (``AgentService``) and a libvirt source in one TaskGroup.

    Events are subscribed to before the running domains are listed, so none is
    missed; the sidecar's first ``hv_sync`` and the scan's requests both start
    from the agent's desired state.  Closes the source's connection on exit.
    """
    try:
        source.subscribe()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.run())
            tg.create_task(source.run())
    finally:
        await source.close()


async def run_with_libvirt(service: Any, uri: str, *, default_port: str = "eth0") -> None:
    """``nvo3 agent run --libvirt URI``: ``serve`` with a connection to ``uri``."""
    await serve(service, LibvirtSource(service.agent, open_connection(uri),
                                       default_port=default_port))


async def apply_running_domains(agent: HypervisorAgent, uri: str, *,
                                default_port: str = "eth0") -> int:
    """``--once``: announce the running domains' VNICs once; returns how many domains.

    Raises ``NveUnreachable`` if an NVE did not answer (the CLI's exit 3).
    """
    source = LibvirtSource(agent, open_connection(uri), default_port=default_port)
    try:
        count = await source.scan()
    finally:
        await source.close()
    if source.counters["nve_unreachable"]:
        raise NveUnreachable(f"{source.counters['nve_unreachable']} libvirt VNIC requests "
                             "got no answer")
    return count
