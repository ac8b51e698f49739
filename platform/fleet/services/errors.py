"""Refusals of the fleet's services: a sentence for people, the HTTP status an API answers with,
and the input at fault if one is."""


class FleetError(Exception):
    status = 409

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(FleetError):
    status = 400


class NotAuthenticated(FleetError):
    status = 401


class Forbidden(FleetError):
    status = 403


class NotFound(FleetError):
    status = 404


class Conflict(FleetError):
    status = 409


class InvalidTransition(Conflict):
    pass


class Gone(FleetError):
    status = 410


class NoCapacity(FleetError):
    status = 503
