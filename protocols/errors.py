"""The one exception type for an update the coordinator must refuse."""


class InvalidUpdate(ValueError):
    """A client reply that must not reach aggregation.

    ``reason`` says what was wrong in words an operator can act on; the coordinator logs it
    with the node id and drops the reply. The global adapter is never touched.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
