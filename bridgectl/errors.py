"""The one exception type for bad input: the CLI prints it as `Error:` + `Hint:` and exits 2."""


class UserError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
