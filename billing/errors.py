"""Refusals of billing's services (controlplane.errors.ServiceError: a sentence for people, an
HTTP status, the input at fault)."""

from controlplane.errors import ServiceError


class BillingError(ServiceError):
    status = 409


class BadInput(BillingError):
    status = 400


class NotFound(BillingError):
    status = 404


class PaymentRequired(BillingError):
    """No card, a declined card, or money owed: the sentence says which and what to do."""

    status = 402


class StripeUnavailable(BillingError):
    """Stripe did not answer (or answered an error we cannot act on): nothing was charged."""

    status = 502
