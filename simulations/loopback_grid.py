"""An in-process Flower ``Grid`` that hands each message to a real ``ClientApp`` object.

For measuring and testing coordinator protocol logic (secure aggregation at 100 clients)
without a transport or a Ray cluster: the strategy, the ClientApp and its handlers are the
production ones; only delivery is a function call. Messages are round-tripped through
Flower's own protobuf serialisation, so what arrives is what a wire would deliver, and byte
counts are real. It also injects failures: a node listed in ``drop[message_type]`` never
answers that message type (a client that went away), and it records each node's CPU time
per message type. With ``errors_as_replies`` a handler that raises answers with an error
reply, as Flower's runtimes do, instead of raising into the caller. It keeps every message it
delivered and received (``sent``, ``received``) for tests to inspect, unless
``keep_traffic=False``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode


def _wire_copy(msg: Message) -> Message:
    """The message as a receiver would rebuild it from Flower's protobuf encoding."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(msg))


class LoopbackGrid:
    """Duck-typed ``flwr.serverapp.Grid``: ``get_node_ids`` and ``send_and_receive``."""

    def __init__(
        self,
        app: ClientApp,
        node_ids: Iterable[int],
        *,
        node_config: Mapping[int, dict[str, int | float | str | bool]] | None = None,
        serialise: bool = True,
        errors_as_replies: bool = False,
        keep_traffic: bool = True,
    ) -> None:
        self.app = app
        # Tests read ``sent``/``received``; a benchmark that traces the coordinator's memory
        # turns them off, or it would count every message the grid kept as the coordinator's.
        self.keep_traffic = keep_traffic
        self.serialise = serialise
        self.errors_as_replies = errors_as_replies
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=dict((node_config or {}).get(n, {})),
                       state=RecordDict(), run_config={})
            for n in node_ids
        }
        self.drop: dict[str, set[int]] = defaultdict(set)
        self.client_cpu_s: dict[str, dict[int, float]] = defaultdict(dict)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            kind = msg.metadata.message_type
            if node not in self.contexts or node in self.drop[kind]:
                continue
            inbound = _wire_copy(msg) if self.serialise else msg
            if self.keep_traffic:
                self.sent.append(inbound)
            start = time.process_time()
            try:
                reply = self.app(inbound, self.contexts[node])
            except Exception as exc:
                if not self.errors_as_replies:
                    raise
                reason = f"{type(exc)}:<'{exc}'>"  # Flower's wording (its vce_api)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                reply_to=inbound)
            self.client_cpu_s[kind][node] = (
                self.client_cpu_s[kind].get(node, 0.0) + time.process_time() - start
            )
            outbound = _wire_copy(reply) if self.serialise else reply
            if self.keep_traffic:
                self.received.append(outbound)
            replies.append(outbound)
        return replies
