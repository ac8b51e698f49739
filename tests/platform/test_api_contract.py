"""The OpenAPI schema tells the truth: schemathesis calls every operation of /api/v1/schema/ on
a live server, as a customer (alice, with a node on a local host), with valid and invalid input,
and every answer must be one the schema describes (status, content type, headers, body shape),
never a 5xx, and invalid input must be refused.

Bounded (few examples per operation, derandomized) so it stays a unit-test-sized run."""

from dataclasses import dataclass

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.schemas import BaseSchema

from tests.conftest import give_card, use_stripe

from .conftest import give_secret, request_node

MAX_EXAMPLES = 15


@pytest.fixture
def contract(transactional_db, settings, live_server, alice, local_host, monkeypatch, localstripe):
    """The schema as served, with alice's token for apiToken operations, her node's secret for
    the heartbeat, and the ids that exist (so calls reach real objects, not only 404s)."""
    from accounts.services import token_create
    from fleet.services import queue

    # Nothing is queued for real: services only send tasks by name.
    monkeypatch.setattr(queue, "send_task", lambda *a, **k: True)
    # Hundreds of requests from one address: throttling is tested elsewhere (and 429 is in
    # the schema of every operation anyway).
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {
            "token": "100000/min",
            "anon": "100000/min",
            "agent": "100000/min",
        },  # fmt: skip
    }
    # Room for every node the generated requests ask for: 503 (no capacity) is in the schema,
    # but schemathesis counts every 5xx as a server error.
    # Webhook channels on any host name (production would resolve it and refuse private ones).
    settings.WEBHOOK_ALLOW_PRIVATE = True
    # Billing on, against a real local Stripe server: its operations answer for real.
    use_stripe(settings, localstripe)
    give_card(alice.membership.account)
    local_host.capacity, local_host.port_range_end = 1000, 19999
    local_host.save()
    node = request_node(alice, "alpha")
    node_secret = give_secret(node)
    token = token_create(account=node.account, user=alice, name="contract").secret
    # A second token for DELETE /tokens/{id} to revoke (not the one the calls are made with).
    spare = token_create(account=node.account, user=alice, name="spare").token

    # No NUL characters in generated strings: DRF refuses them in every text field (PostgreSQL
    # cannot store them), and JSON Schema could only say so with a pattern on every string.
    config = SchemathesisConfig.from_dict({"generation": {"allow-x00": False}})
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/v1/schema/", config=config)
    return Contract(
        schema=schema,
        ids={
            "node_id": str(node.pk),
            "job_id": node.jobs.order_by("pk").first().pk,
            "token_id": spare.pk,
        },
        bearer={"apiToken": token, "nodeSecret": node_secret},
    )


@dataclass
class Contract:
    schema: BaseSchema
    ids: dict  # path parameter -> an id that exists in alice's account
    bearer: dict  # security scheme -> alice's secret for it

    def credentials_for(self, operation) -> dict:
        """The Authorization header the operation's first security requirement asks for (none
        for an anonymous one)."""
        security = operation.definition.raw.get("security", [{"apiToken": []}])
        schemes = [name for requirement in security[:1] for name in requirement]
        if not schemes:
            return {}
        return {"Authorization": f"Bearer {self.bearer[schemes[0]]}"}


def test_every_operation_answers_as_its_schema_says(contract):
    # Driven by hand rather than by schemathesis' pytest plugin (`from_fixture(...).parametrize`),
    # which sets `Node._nodeid`, gone in pytest 9.2.
    failures = {}
    for result in contract.schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            try:
                _exercise(contract, operation, mode)
            except (Exception, BaseExceptionGroup) as exc:  # gathered, then reported together
                failures[f"{operation.label} ({mode.value})"] = exc
    assert not failures, "\n\n".join(f"{label}:\n{exc}" for label, exc in failures.items())


def _exercise(contract, operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode), real_ids=st.booleans())
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case, real_ids):
        if real_ids and mode.is_positive:
            for name in case.path_parameters or {}:
                if name in contract.ids:
                    case.path_parameters[name] = contract.ids[name]
        case.call_and_validate(headers=contract.credentials_for(operation))

    run()
