"""A Ray-free, in-process Flower ``Grid``: the real ServerApp and ClientApp in one process.

Flower 1.41 has no non-Ray simulation backend (../shared/FLOWER.md §7.2). Because
the ServerApp only talks to the abstract ``flwr.serverapp.Grid``, this synchronous
Grid calls the real ``ClientApp`` object directly (mods included). Messages are
serialised to protobuf and back in both directions, as real transport does: the
client cannot mutate server objects, and every message's wire size is recorded
(``bytes_down`` / ``bytes_up`` per node and message type) for the benchmarks.

Used by the fast end-to-end tests, ``oncofed compare`` and the FL benchmark. The
``flwr run`` smoke test exercises the real Ray simulation.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

_LOG = logging.getLogger(__name__)


def _wire(msg: Message) -> tuple[Message, int]:
    proto = message_to_proto(msg)
    data = proto.SerializeToString()
    back = message_from_proto(type(proto).FromString(data))
    return back, len(data)


class LocalGrid(Grid):
    """Synchronous Grid over in-process nodes; ``node_configs[i]`` is node i's node config.

    ``fail_nodes`` (node index -> callable(message) -> bool) lets tests make a node
    crash on chosen messages.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        run_id: int = 42,
        fail_nodes: dict[int, Callable[[Message], bool]] | None = None,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=run_id)
        self.contexts: dict[int, Context] = {}
        self.index_of: dict[int, int] = {}
        for i, nc in enumerate(node_configs):
            node_id = 1000 + i
            self.index_of[node_id] = i
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=dict(nc),
                                             state=RecordDict(), run_config=dict(run_config))
        self.fail_nodes = fail_nodes or {}
        self._replies: dict[str, Message] = {}
        self.client_seconds: dict[int, float] = defaultdict(float)
        self.bytes_down: dict[tuple[int, str], list[int]] = defaultdict(list)
        self.bytes_up: dict[tuple[int, str], list[int]] = defaultdict(list)
        # every reply as the server received it (node, message type, message): what left each client
        self.replies: list[tuple[int, str, Message]] = []
        TaskIdentity.run_id = run_id  # needed by the Message constructor
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # deprecated API
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            inbound, n_down = _wire(msg)
            kind = msg.metadata.message_type
            self.bytes_down[(node, kind)].append(n_down)
            ctx = self.contexts[node]
            t0 = time.perf_counter()
            try:
                crash = self.fail_nodes.get(self.index_of[node])
                if crash is not None and crash(inbound):
                    raise RuntimeError(f"injected failure on node {self.index_of[node]}")
                reply = self.client_app(inbound, ctx)
            except Exception as ex:  # a ClientApp exception becomes an error reply, as in Flower 1.41:
                # the reason is the exception's type and text only; the traceback stays on the node
                _LOG.error("node %d: ClientApp raised\n%s", self.index_of[node], traceback.format_exc())
                reply = Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=inbound)
            self.client_seconds[node] += time.perf_counter() - t0
            reply, n_up = _wire(reply)
            self.bytes_up[(node, kind)].append(n_up)
            self.replies.append((node, kind, reply))
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(
    server_app: ServerApp,
    client_app: ClientApp,
    node_configs: list[dict[str, Any]],
    *,
    app_dir: str | Path | None = None,
    run_config_overrides: dict[str, Any] | None = None,
    fail_nodes: dict[int, Callable[[Message], bool]] | None = None,
) -> tuple[Context, LocalGrid]:
    """Run ``server_app`` against in-process nodes with the fused run config of ``app_dir``."""
    overrides = dict(run_config_overrides or {})
    run_config = get_fused_config_from_dir(Path(app_dir), overrides) if app_dir else overrides
    grid = LocalGrid(client_app, node_configs, run_config, fail_nodes=fail_nodes)
    ctx = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                  state=RecordDict(), run_config=dict(run_config))
    server_app(grid, ctx)
    return ctx, grid
