"""iSCSI target nodes and the registry that logins consult (RFC 7143 4.3, 6.3, 13).

A `TargetNode` is one IQN with its logical units and its access list; the `TargetRegistry`
holds every node, answers the login's questions (which targets exist, who may log in, which
authentication applies), assigns TSIHs, and binds logins to sessions, reporting the sessions a
reinstatement replaces. Nothing here performs I/O. Logical units are reached through the
front-end interface (`core.frontend`): a node is the `UnitDirectory` of its target port, and the
unit that answers for an absent LUN comes from the device server's `AbsentUnitFactory`, given
to the registry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from ..core.frontend import AbsentUnitFactory
from ..core.task import Nexus
from .auth import (
    Authenticator,
    ChallengeLedger,
    ChapAuthenticator,
    ChapCredentials,
    NoAuthentication,
)
from .errors import LoginError, LoginStatus
from .login import LoginResult
from .node import DEFAULT_TPGT, TargetNode
from .params import TargetLimits
from .session import Session


class TargetRegistry:
    """Targets, portals and live sessions of one pytarget instance."""

    def __init__(self, limits: TargetLimits | None = None, window: int = 128,
                 absent_unit: AbsentUnitFactory | None = None) -> None:
        self.limits = limits or TargetLimits()
        self.absent_unit = absent_unit
        self.window = window
        self.targets: dict[str, TargetNode[Any]] = {}
        self.portals: list[tuple[str, int]] = []
        self.sessions: dict[int, Session] = {}
        self._next_tsih = 1
        self._tsih_first, self._tsih_step = 1, 1  # this process's share of TSIHs
        self.discovery_auth: ChapCredentials | None = None
        self.max_sessions = 0  # every session, discovery included (0: no limit)
        # The portal group this process serves (a gateway's id, docs/guides/scale-out.md): the
        # TargetPortalGroupTag of its logins and the tag SendTargets gives its portals.
        self.tpgt = DEFAULT_TPGT
        self.ledger = ChallengeLedger()

    def add_target(self, node: TargetNode[Any]) -> None:
        if node.absent_unit is None:
            node.absent_unit = self.absent_unit
        self.targets[node.name.lower()] = node

    def target(self, name: str) -> TargetNode[Any] | None:
        return self.targets.get(name.lower())

    # ---------------------------------------------------------------- login policy
    def portal_group_tag(self) -> int:
        return self.tpgt

    def authenticator(self, session_type: str, target_name: str) -> Authenticator:
        if session_type == "Discovery":
            credentials = self.discovery_auth
        else:
            node = self.target(target_name)
            credentials = node.auth if node is not None else None
        if credentials is None:
            return NoAuthentication()
        return ChapAuthenticator(credentials, self.ledger)

    def check_target(self, target_name: str, initiator_name: str) -> str:
        node = self.target(target_name)
        if node is None:
            raise LoginError(LoginStatus.NOT_FOUND, f"no target {target_name}")
        if not node.allows(initiator_name):
            raise LoginError(LoginStatus.AUTHORIZATION_FAILURE,
                             f"{initiator_name} may not log into {target_name}")
        return node.alias

    def _check_room(self, node: TargetNode[Any] | None, replaced: Iterable[Session]) -> None:
        """OUT OF RESOURCES when a new session would pass the global or the target's limit
        (the sessions a reinstatement replaces do not count)."""
        gone = {id(s) for s in replaced}
        live = [s for s in self.sessions.values() if id(s) not in gone]
        if self.max_sessions and len(live) >= self.max_sessions:
            raise LoginError(LoginStatus.OUT_OF_RESOURCES, "too many sessions")
        if node is not None and node.max_sessions and sum(
                1 for s in live if s.target is node) >= node.max_sessions:
            raise LoginError(LoginStatus.OUT_OF_RESOURCES,
                             f"too many sessions to {node.name}")

    def check_session(self, initiator_name: str, target_name: str, isid: bytes, tsih: int,
                      cid: int) -> None:
        session = self.sessions.get(tsih)
        if session is None or session.isid != isid or (
                session.params.initiator_name.lower() != initiator_name.lower()):
            raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session with TSIH {tsih}")
        if not any(c.cid == cid for c in session.connections):
            raise LoginError(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections is 1")

    # ---------------------------------------------------------------- discovery
    def send_targets(self, initiator_name: str, value: str, local_address: tuple[str, int],
                     session: Session) -> list[tuple[str, str]]:
        """SendTargets (RFC 7143 appendix C): the targets this initiator may log into."""
        if value == "All":
            if not session.discovery:
                return [("SendTargets", "Reject")]
            nodes: Iterable[TargetNode[Any]] = self.targets.values()
        elif value == "":
            nodes = [session.target] if session.target is not None else []
        else:
            node = self.target(value)
            nodes = [node] if node is not None else []
        answers: list[tuple[str, str]] = []
        for node in nodes:
            if not node.allows(initiator_name):
                continue
            answers.append(("TargetName", node.name))
            for host, port in self.addresses(local_address):
                answers.append(("TargetAddress", f"{host}:{port},{node.tpgt}"))
        return answers

    def addresses(self, local_address: tuple[str, int]) -> list[tuple[str, int]]:
        """Portal addresses to announce; a wildcard portal announces the address reached."""
        out: list[tuple[str, int]] = []
        for host, port in self.portals or [local_address]:
            if host in ("0.0.0.0", "::", ""):
                host = local_address[0]
            try:
                if ipaddress.ip_address(host).version == 6:
                    host = f"[{host}]"
            except ValueError:
                pass
            if (host, port) not in out:
                out.append((host, port))
        return out

    # ---------------------------------------------------------------- sessions
    def bind_session(self, result: LoginResult) -> tuple[Session, list[Session]]:
        """A Session for a completed login, and the sessions it replaces (RFC 7143 6.3.5)."""
        params = result.session
        replaced: list[Session] = []
        node = self.target(params.target_name) if params.session_type == "Normal" else None
        if result.tsih > 0:
            old = self.sessions.get(result.tsih)
            if old is None:
                raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, "session vanished")
            replaced.append(old)
            tsih = result.tsih
        else:
            for other in self.sessions.values():
                if (other.isid == result.isid and other.params.session_type == params.session_type
                        and other.params.initiator_name.lower() == params.initiator_name.lower()
                        and other.params.target_name.lower() == params.target_name.lower()):
                    replaced.append(other)
            self._check_room(node, replaced)
            tsih = self._allocate_tsih()
        nexus = None
        if node is not None:
            nexus = Nexus(params.initiator_name, result.isid, node.name, node.tpgt,
                          node.relative_port)
        session = Session(tsih, result.isid, params, node, nexus,
                          (result.cmd_sn) & 0xFFFFFFFF, self.window)
        session.connection_params = result.connection
        for old in replaced:
            self.sessions.pop(old.tsih, None)
        self.sessions[tsih] = session
        return session, replaced

    def share_tsihs(self, index: int, count: int) -> None:
        """This process is worker `index` of `count` serving one target port: it allocates
        only the TSIHs congruent to index + 1 modulo count, so no two sessions of the port
        share one (RFC 7143 11.12.6)."""
        self._tsih_first, self._tsih_step = index + 1, count
        self._next_tsih = index + 1

    def _allocate_tsih(self) -> int:
        for _ in range(65535 // self._tsih_step + 1):
            tsih = self._next_tsih
            following = tsih + self._tsih_step
            self._next_tsih = following if following <= 0xFFFF else self._tsih_first
            if tsih not in self.sessions:
                return tsih
        raise LoginError(LoginStatus.OUT_OF_RESOURCES, "no free TSIH")

    def remove_session(self, session: Session) -> None:
        if self.sessions.get(session.tsih) is session:
            del self.sessions[session.tsih]
