"""Shared helpers of the federation tests (imported explicitly, not a conftest): the small model
that tiny synthetic sites train in federated runs, and a stand-in for Flower's ``Grid`` that
answers the server strategy's messages with crafted replies (no ClientApp, no model)."""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Error, Message

#: ``model-overrides`` of the federated tests on tiny synthetic sites (seconds per round).
SMALL_MODEL_OVERRIDES = ("model.d_inter=16; model.d_token=8; model.hazard_hidden=16; model.dce_dim=8; "
                         "model.tabular_hidden=16; model.n_heads=2; train.batch_size=8")


class ReplyingGrid:
    """Answers each message with :meth:`reply` for the site its node serves, or with an error
    where :meth:`refusal` gives a reason; ``sent`` records every message in order."""

    def __init__(self, node_sites: Mapping[int, Any]):
        self.node_sites = dict(node_sites)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_sites)

    def refusal(self, message: Message, site: Any) -> str | None:
        """The error reason of ``site``'s reply to ``message``; None: it answers."""
        return None

    def reply(self, message: Message, site: Any) -> Message:
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for m in messages:
            self.sent.append(m)
            site = self.node_sites[m.metadata.dst_node_id]
            m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}-{len(self.sent)}"
            reason = self.refusal(m, site)
            reply = Message(Error(code=0, reason=reason), reply_to=m) if reason is not None else self.reply(m, site)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies
