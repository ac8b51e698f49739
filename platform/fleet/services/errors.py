"""Refusals of the fleet's services (controlplane.errors.ServiceError: a sentence for people,
an HTTP status, the input at fault)."""

from controlplane.errors import ServiceError


class FleetError(ServiceError):
    status = 409


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
