"""The exceptions the CLI turns into exit codes: UserError (bad input: `Error:` + `Hint:`, exit 2), StopRun (a run
ended early with a given status) and NonFiniteError (a NaN or infinity: the run fails, exit 1)."""


class UserError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class StopRun(Exception):
    """Raised by a run's eval callback to end it early with a given summary status (e.g. `pruned` by a sweep)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class NonFiniteError(Exception):
    """A loss or gradient norm became NaN or infinite: the run stops before the update, its last checkpoint intact."""


def require(condition: bool, message: str, hint: str) -> None:
    """Raises UserError(message, hint) unless `condition`: how every config check states a rule."""
    if not condition:
        raise UserError(message, hint)
