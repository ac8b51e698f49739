"""The one shape of a refusal by any service: a sentence for people, the HTTP status an API
answers with, and the input at fault if one is. Each app subclasses it (fleet.services.errors,
accounts.services.AccountError); API views turn any of them into the same JSON answer."""


class ServiceError(Exception):
    status = 409

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
