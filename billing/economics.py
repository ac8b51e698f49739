"""The economics the operator steers by (issue 8; docs/architecture.md, "Billing"), computed from
the database only: telemetry counters for the ops nodes delivered and the energy they measured,
subscriptions and invoices for revenue, and the staff's assumptions for everything not measured.

Every figure is a dict: `value` (or null), `unit`, `reason` (why it is null), `inputs` (the
numbers it was computed from), `assumptions` (the staff's, by field name) and `sources` (where
each input came from). A figure that cannot be computed is null with its reason, never guessed.
Money is Decimal (USD); `jsonable` turns a report into JSON types (Decimal as exact strings).

Counting rules:
- Ops delivered: a node's cumulative runtime ops counter (`ops` of its telemetry samples, kept
  as the column `ops_total` beside `uptime_seconds`, `energy_joules` and `energy_source`),
  summed over consecutive samples in the window. A counter that went backwards (or whose
  uptime did) means the agent restarted: the later reading is what it counted since then.
- Energy: measured where both samples of an interval come from RAPL (`sources.power_watts`) and
  carry the cumulative `lifetime.energy_joules`; RAPL measures the whole CPU package, so a
  host's measured energy is shared by its nodes observed in the window. Every other interval is
  modelled with the staff's `modelled_watts_per_node`, and said so.
- Hardware: a host's upfront cost over `amortisation_months` (of 730 hours), shared by its nodes
  observed in the window; an enrolled node (the customer's own machine) counts as one machine at
  the same cost.
- MRR: subscriptions that are active, trialing or past_due (as Stripe counts MRR), quantity x
  plan price, plans priced in USD. The history and churn apply the same rule at a past moment,
  with each subscription's current quantity and price (we keep no history of those).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db import connection, transaction
from django.db.models import BigIntegerField, Case, Func, JSONField, Q, When
from django.utils import timezone

from accounts.models import User
from billing.models import EconomicAssumptions, Invoice, Subscription
from fleet.models import Host, Node, NodeState, TelemetrySample
from fleet.services.agents import sample_counters

HOURS_PER_MONTH = Decimal(730)  # 365 x 24 / 12
ROI_MONTHS = 36
DEFAULT_DAYS = 30
MAX_DAYS = 365
HISTORY_MONTHS = 12
CURRENCY = "usd"
MRR_STATUSES = ("active", "trialing", "past_due")
LIVE_NODE_STATES = (NodeState.READY, NodeState.DEGRADED, NodeState.SUSPENDED)
TRILLION = Decimal(10) ** 12
JOULES_PER_KWH = Decimal(3_600_000)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECONDS = Decimal(1_000_000)
ASSUMPTION_FIELDS = (
    "electricity_usd_per_kwh",
    "host_hardware_cost_usd",
    "amortisation_months",
    "modelled_watts_per_node",
    "cloud_tpu_usd_per_hour",
    "cloud_tpu_ops_per_second",
    "burn_usd_per_month",
)


@dataclass(frozen=True)
class Scenario:
    label: str
    nodes: int
    upfront_usd: Decimal
    monthly_usd: Decimal  # the operating cost (ranch, own node) or the price (managed)
    seed_projection: str


# The seed's three deployment scenarios (seed/vtpu-r23w40-success-projection.md, section 2):
# their costs are the scenario's definition; their returns are computed from our measurements.
SCENARIOS = {
    "ranch": Scenario("a 5-node ranch we own", 5, Decimal(7500), Decimal(42), "400 %"),
    "own_node": Scenario("a customer's own node", 1, Decimal(1500), Decimal("8.40"), "200 %"),
    "managed": Scenario("the managed service, per node", 1, Decimal(0), Decimal(200), "n/a"),
}


def figure(
    value: Any,
    unit: str,
    *,
    reason: str | None = None,
    inputs: dict | None = None,
    assumptions: dict | None = None,
    sources: dict | None = None,
) -> dict:
    if value is None and not reason:
        raise ValueError("a null figure needs its reason")
    return {
        "value": value,
        "unit": unit,
        "reason": None if value is not None else reason,
        "inputs": inputs or {},
        "assumptions": assumptions or {},
        "sources": sources or {},
    }


def _dec(value: float | int | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _usd(value: Decimal, places: int = 2) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places))


def _round(value: Decimal | float, places: int = 1) -> Decimal:
    return _dec(value).quantize(Decimal(1).scaleb(-places))


# ---- assumptions --------------------------------------------------------------------------


def assumptions_current() -> EconomicAssumptions:
    """The newest saved row, or the model's defaults (unsaved: pk is None)."""
    return EconomicAssumptions.objects.select_related("updated_by").first() or (
        EconomicAssumptions()
    )


def assumptions_source(row: EconomicAssumptions) -> str:
    if row.pk is None:
        return "defaults: staff have saved no assumptions yet"
    by = f" by {row.updated_by.get_username()}" if row.updated_by else ""
    return f"staff assumption (set{by} at {row.updated:%Y-%m-%d %H:%M} UTC)"


def assumptions_values(row: EconomicAssumptions) -> dict:
    values = {name: getattr(row, name) for name in ASSUMPTION_FIELDS}
    for name in ASSUMPTION_FIELDS:
        places = getattr(EconomicAssumptions._meta.get_field(name), "decimal_places", None)
        if places is not None:  # an unsaved row holds the fields' defaults as floats
            values[name] = _usd(_dec(values[name]), places)
    return values


@transaction.atomic
def assumptions_record(*, by: User, values: dict) -> EconomicAssumptions:
    """Save the staff's new assumptions as a new row (the old ones stay, as history); fields
    not given keep their current value."""
    current = assumptions_values(assumptions_current())
    return EconomicAssumptions.objects.create(**{**current, **values}, updated_by=by)


# ---- delivered ops and energy, from telemetry ---------------------------------------------


RAPL = "RAPL package energy"  # how the runtime names a measured power source


@dataclass
class Usage:
    """What one node's telemetry says about the window (times in whole microseconds)."""

    node: Node
    samples: int = 0
    first_us: int | None = None
    last_us: int | None = None
    ops: int = 0
    restarts: int = 0
    measured_joules: Decimal = Decimal(0)
    measured_us: int = 0
    modelled_us: int = 0
    power_sources: list[str] = field(default_factory=list)
    throughput_gops: float | None = None  # the latest: its speed while kernels ran

    @property
    def first(self) -> datetime | None:
        return None if self.first_us is None else EPOCH + timedelta(microseconds=self.first_us)

    @property
    def last(self) -> datetime | None:
        return None if self.last_us is None else EPOCH + timedelta(microseconds=self.last_us)

    @property
    def measured_seconds(self) -> Decimal:
        return Decimal(self.measured_us) / MICROSECONDS

    @property
    def modelled_seconds(self) -> Decimal:
        return Decimal(self.modelled_us) / MICROSECONDS

    @property
    def seconds(self) -> Decimal:
        return self.measured_seconds + self.modelled_seconds

    @property
    def hours(self) -> Decimal:
        return self.seconds / 3600


class EpochMicroseconds(Func):
    """A timestamp as whole microseconds since 1970, computed by PostgreSQL: an integer is
    read many times faster than a timestamp is parsed into a datetime."""

    template = "(EXTRACT(EPOCH FROM %(expressions)s) * 1000000)::bigint"
    output_field = BigIntegerField()


def _microseconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _usage(nodes: list[Node], start: datetime, end: datetime) -> dict[UUID, Usage]:
    usage = {node.pk: Usage(node) for node in nodes}
    postgresql = connection.vendor == "postgresql"
    rows = (
        TelemetrySample.objects.filter(node__in=usage, created__gte=start, created__lte=end)
        .order_by("node_id", "created", "id")
        .values_list(
            "node_id",
            EpochMicroseconds("created") if postgresql else "created",
            "ops_total",
            "uptime_seconds",
            "energy_joules",
            "energy_source",
            "throughput_gops",
            # A sample stored without the columns (around store_sample) is read from its JSON;
            # PostgreSQL reads no JSON for the others.
            Case(When(ops_total__isnull=True, then="data"), output_field=JSONField()),
        )
    )
    previous: tuple | None = None
    for node_id, at_us, ops, uptime, joules, power_source, gops, data in rows.iterator(10_000):
        if data is not None:
            counters = sample_counters(data)
            ops, uptime = counters["ops_total"], counters["uptime_seconds"]
            joules, power_source = counters["energy_joules"], counters["energy_source"]
        if ops is None or ops < 0:
            continue  # no counter in this sample: it cannot bound an interval
        if not postgresql:
            at_us = _microseconds(at_us)
        u = usage[node_id]
        # Also "null: window too short ... Source when measured: RAPL package energy (...)":
        # the energy counter still moved.
        at = power_source.find(RAPL) if power_source else -1
        measured = at >= 0
        if measured and power_source[at:] not in u.power_sources:
            u.power_sources.append(power_source[at:])
        if gops is not None:
            u.throughput_gops = gops
        current = (node_id, at_us, ops, uptime, joules if measured else None)
        if u.first_us is None:
            u.first_us = at_us
        u.last_us, u.samples = at_us, u.samples + 1
        if previous is not None and previous[0] == node_id:
            _, before_us, ops0, uptime0, joules0 = previous
            restarted = ops < ops0 or (
                uptime is not None and uptime0 is not None and uptime < uptime0
            )
            u.restarts += restarted
            u.ops += ops if restarted else ops - ops0
            delta_j = None if restarted or joules0 is None else current[4] - joules0
            if delta_j is not None and delta_j >= 0:
                u.measured_joules += _dec(delta_j)
                u.measured_us += at_us - before_us
            else:
                u.modelled_us += at_us - before_us
        previous = current
    return usage


@dataclass
class NodeCost:
    usage: Usage
    share: int  # nodes sharing its machine in the window
    energy_kwh: Decimal
    energy_usd: Decimal
    hardware_usd: Decimal

    @property
    def cost_usd(self) -> Decimal:
        return self.energy_usd + self.hardware_usd


def _node_cost(u: Usage, share: int, a: dict) -> NodeCost:
    measured_kwh = u.measured_joules / JOULES_PER_KWH / share
    modelled_kwh = a["modelled_watts_per_node"] * u.modelled_seconds / 3600 / 1000
    kwh = measured_kwh + modelled_kwh
    hardware_per_hour = a["host_hardware_cost_usd"] / (a["amortisation_months"] * HOURS_PER_MONTH)
    return NodeCost(
        usage=u,
        share=share,
        energy_kwh=kwh,
        energy_usd=kwh * a["electricity_usd_per_kwh"],
        hardware_usd=hardware_per_hour * u.hours / share,
    )


def _span(seconds: Decimal) -> str:
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _energy_source(u: Usage, a: dict, share: int) -> str:
    parts = []
    if u.measured_seconds:
        split = f", shared by the host's {share} nodes observed" if share > 1 else ""
        parts.append(
            f"measured for {_span(u.measured_seconds)}: "
            + "; ".join(u.power_sources)
            + f" (the runtime's lifetime.energy_joules counter{split})"
        )
    if u.modelled_seconds:
        parts.append(
            f"modelled for {_span(u.modelled_seconds)} at"
            f" {a['modelled_watts_per_node']} W (staff assumption modelled_watts_per_node):"
            " no RAPL energy reported for those intervals"
        )
    return "; ".join(parts) or "no interval observed"


def _cost_inputs(c: NodeCost) -> dict:
    u = c.usage
    return {
        "samples": u.samples,
        "observed_from": u.first,
        "observed_to": u.last,
        "observed_hours": _round(u.hours, 2),
        "ops_delivered": u.ops,
        "agent_restarts": u.restarts,
        "energy_kwh": _round(c.energy_kwh, 4),
        "energy_usd": _usd(c.energy_usd, 4),
        "hardware_usd": _usd(c.hardware_usd, 4),
        "cost_usd": _usd(c.cost_usd, 4),
        "nodes_sharing_machine": c.share,
    }


COST_ASSUMPTIONS = (
    "electricity_usd_per_kwh",
    "host_hardware_cost_usd",
    "amortisation_months",
    "modelled_watts_per_node",
)
COST_UNIT = "USD per 10^12 ops"


def _pick(a: dict, names: tuple[str, ...]) -> dict:
    return {name: a[name] for name in names}


def _cost_figure(costs: list[NodeCost], a: dict, source: str, *, what: str) -> dict:
    ops = sum(c.usage.ops for c in costs)
    cost = sum((c.cost_usd for c in costs), Decimal(0))
    reason = None
    if not costs or all(c.usage.samples < 2 for c in costs):
        reason = (
            f"fewer than two telemetry samples of {what} in the window: the ops delivered"
            " cannot be counted"
        )
    elif ops == 0:
        reason = f"{what} delivered no ops in the window: a cost per op is undefined"
    value = None if reason else _usd(cost / (_dec(ops) / TRILLION), 6)
    return figure(
        value,
        COST_UNIT,
        reason=reason,
        assumptions={**_pick(a, COST_ASSUMPTIONS), "hours_per_month": HOURS_PER_MONTH},
        inputs=(
            _cost_inputs(costs[0])
            if len(costs) == 1
            else {
                "nodes": len(costs),
                "ops_delivered": ops,
                "energy_usd": _usd(sum((c.energy_usd for c in costs), Decimal(0)), 4),
                "hardware_usd": _usd(sum((c.hardware_usd for c in costs), Decimal(0)), 4),
                "cost_usd": _usd(cost, 4),
            }
        ),
        sources={
            "ops_delivered": "runtime ops counter (telemetry `ops`: kernel shapes, a"
            " multiply-add is 2), summed over consecutive samples"
            + (
                "; self-reported by the customer's machine"
                if len(costs) == 1 and costs[0].usage.node.kind == Node.Kind.ENROLLED
                else ""
            ),
            "energy": (
                _energy_source(costs[0].usage, a, costs[0].share)
                if len(costs) == 1
                else "per node, as each node's figure says"
            ),
            "hardware": "host_hardware_cost_usd / (amortisation_months x 730 h) x observed"
            " hours / nodes sharing the machine (an enrolled node counts as one machine)",
            "assumptions": source,
        },
    )


# ---- revenue --------------------------------------------------------------------------------


def _live_at(subscription: Subscription, moment: datetime) -> bool:
    """Whether the subscription counted towards MRR at that moment (see the module's rules)."""
    if subscription.created > moment:
        return False
    if subscription.status in MRR_STATUSES:
        return True
    return (
        subscription.status == "canceled"
        and subscription.ended_at is not None
        and subscription.ended_at > moment
    )


def _monthly_cents(subscription: Subscription) -> int:
    return subscription.quantity * subscription.plan.amount_cents


def _paying_accounts(subscriptions: list[Subscription], moment: datetime) -> set[int]:
    return {s.account_id for s in subscriptions if _live_at(s, moment) and _monthly_cents(s) > 0}


def _cents(value: int) -> Decimal:
    return _usd(Decimal(value) / 100)


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(moment: datetime) -> datetime:
    return _month_start(moment.replace(day=28) + timedelta(days=4))


def _history(subscriptions: list[Subscription], now: datetime) -> list[dict]:
    """MRR at the end of each of the last HISTORY_MONTHS months (now for this one), and what
    paid invoices brought in for the subscription periods starting that month."""
    starts = [_month_start(now)]
    for _ in range(HISTORY_MONTHS - 1):
        starts.insert(0, _month_start(starts[0] - timedelta(days=1)))
    paid: dict[str, int] = {}
    for period_start, created, cents in Invoice.objects.filter(
        status="paid", subscription__isnull=False, currency=CURRENCY
    ).values_list("period_start", "stripe_created", "amount_paid_cents"):
        month = f"{(period_start or created):%Y-%m}"
        paid[month] = paid.get(month, 0) + cents
    rows = []
    for start in starts:
        moment = min(_next_month(start), now)
        month = f"{start:%Y-%m}"
        rows.append(
            {
                "month": month,
                "at": moment,
                "mrr_usd": _cents(
                    sum(_monthly_cents(s) for s in subscriptions if _live_at(s, moment))
                ),
                "paying_accounts": len(_paying_accounts(subscriptions, moment)),
                "paid_usd": _cents(paid.get(month, 0)),
            }
        )
    return rows


def _revenue(
    subscriptions: list[Subscription], a: dict, source: str, now: datetime, live_nodes: int
) -> dict:
    live = [s for s in subscriptions if _live_at(s, now)]
    mrr_cents = sum(_monthly_cents(s) for s in live)
    mrr = _cents(mrr_cents)
    sub_sources = {
        "subscriptions": "billing.Subscription rows (Stripe's status and quantity as last"
        " read) x their plan's price"
    }
    listed = [
        {
            "subscription": s.stripe_subscription_id,
            "account": s.account.name,
            "plan": s.plan.name,
            "status": s.status,
            "quantity": s.quantity,
            "usd_per_node_month": _cents(s.plan.amount_cents),
        }
        for s in live
    ]
    paying_now = _paying_accounts(subscriptions, now)
    month_ago = now - timedelta(days=30)
    paying_then = _paying_accounts(subscriptions, month_ago)
    churned = paying_then - paying_now
    collected = sum(
        Invoice.objects.filter(
            status="paid", currency=CURRENCY, paid_at__gt=month_ago, paid_at__lte=now
        ).values_list("amount_paid_cents", flat=True)
    )
    burn = a["burn_usd_per_month"]
    quantity = sum(s.quantity for s in live)
    return {
        "mrr": figure(
            mrr,
            "USD per month",
            inputs={"subscriptions": listed, "statuses_counted": list(MRR_STATUSES)},
            sources=sub_sources,
        ),
        "paying_accounts": figure(
            len(paying_now),
            "accounts",
            inputs={"rule": "a subscription counted in MRR, with a price above 0"},
            sources=sub_sources,
        ),
        "churn_monthly": figure(
            _round(Decimal(len(churned)) / len(paying_then) * 100) if paying_then else None,
            "% of accounts paying 30 days ago that pay no more",
            reason="no account was paying 30 days ago",
            inputs={
                "paying_30_days_ago": len(paying_then),
                "churned": len(churned),
                "since": month_ago,
            },
            sources={
                **sub_sources,
                "history": "each subscription's creation, status and end as recorded",
            },
        ),
        "revenue_per_node": figure(
            _usd(mrr / live_nodes) if live_nodes else None,
            "USD per node per month",
            reason="no live node (ready, degraded or suspended)",
            inputs={"mrr_usd": mrr, "live_nodes": live_nodes, "billed_nodes": quantity},
            sources={**sub_sources, "live_nodes": "fleet.Node in ready, degraded, suspended"},
        ),
        "revenue_collected_30_days": figure(
            _cents(collected),
            "USD",
            inputs={"since": month_ago},
            sources={"invoices": "billing.Invoice rows paid in the last 30 days (amount paid)"},
        ),
        "burn_coverage": figure(
            _round(mrr / burn * 100) if burn > 0 else None,
            "% of the monthly burn covered by MRR",
            reason="the monthly burn is 0",
            inputs={"mrr_usd": mrr},
            assumptions={"burn_usd_per_month": burn},
            sources={**sub_sources, "assumptions": source},
        ),
    }


# ---- break-even per host and 3-year ROI ---------------------------------------------------


def _node_revenue_cents(node: Node, subscriptions: list[Subscription], now: datetime) -> int:
    """The node's plan price when its account has a subscription on that plan counted in MRR."""
    if node.plan is None:
        return 0
    for s in subscriptions:
        if (
            s.account_id == node.account_id
            and s.plan_id == node.plan_id
            and s.quantity > 0
            and _live_at(s, now)
        ):
            return node.plan.amount_cents
    return 0


def _hours(numerator: Decimal, per_hour: Decimal) -> Decimal | None:
    return _round(numerator / per_hour) if per_hour > 0 else None


def _break_even(
    host: Host,
    nodes: list[Node],
    costs: dict[UUID, NodeCost],
    subscriptions: list[Subscription],
    a: dict,
    source: str,
    now: datetime,
) -> dict:
    upfront = a["host_hardware_cost_usd"]
    live = [n for n in nodes if n.state in LIVE_NODE_STATES]
    revenue_per_hour = (
        sum((Decimal(_node_revenue_cents(n, subscriptions, now)) / 100 for n in live), Decimal(0))
        / HOURS_PER_MONTH
    )
    observed = [costs[n.pk] for n in live if costs[n.pk].usage.seconds > 0]
    energy_per_hour = sum((c.energy_usd / c.usage.hours for c in observed), Decimal(0))
    unobserved = [n for n in live if n.pk not in {c.usage.node.pk for c in observed}]
    energy_per_hour += (
        a["modelled_watts_per_node"] / 1000 * a["electricity_usd_per_kwh"] * len(unobserved)
    )
    ops_per_second = sum(Decimal(c.usage.ops) / c.usage.seconds for c in observed)
    cloud_per_hour = (
        ops_per_second / _dec(a["cloud_tpu_ops_per_second"]) * a["cloud_tpu_usd_per_hour"]
    )
    inputs = {
        "upfront_usd": upfront,
        "live_nodes": len(live),
        "nodes_observed": len(observed),
        "hours_in_service": _round(_dec((now - host.created).total_seconds()) / 3600),
        "revenue_usd_per_hour": _usd(revenue_per_hour, 4),
        "energy_usd_per_hour": _usd(energy_per_hour, 4),
        "delivered_ops_per_second": _round(ops_per_second, 0),
        "cloud_tpu_equivalent_usd_per_hour": _usd(cloud_per_hour, 6),
    }
    sources = {
        "upfront_usd": "staff assumption host_hardware_cost_usd",
        "revenue": "the plan price of each live node whose account has a subscription on"
        " that plan counted in MRR, / 730 h",
        "energy": "each observed node's energy cost per observed hour (measured or modelled,"
        " as its cost figure says); live nodes without telemetry: modelled_watts_per_node",
        "delivered_ops_per_second": "runtime ops counters of the host's nodes over the window",
        "assumptions": source,
    }
    net = revenue_per_hour - energy_per_hour
    saving = cloud_per_hour - energy_per_hour
    return {
        "host": host.name,
        "host_id": host.pk,
        "hours_to_repay_from_revenue": figure(
            _hours(upfront, net),
            "hours",
            reason=(
                "no revenue from this host's nodes"
                if revenue_per_hour == 0
                else "its revenue does not cover its energy"
            ),
            inputs={**inputs, "net_usd_per_hour": _usd(net, 4)},
            assumptions=_pick(
                a, ("host_hardware_cost_usd", "electricity_usd_per_kwh", "modelled_watts_per_node")
            ),  # fmt: skip
            sources=sources,
        ),
        "hours_to_repay_vs_cloud_tpu": figure(
            _hours(upfront, saving),
            "hours",
            reason=(
                "no ops delivered by this host's nodes in the window"
                if ops_per_second == 0
                else "renting its delivered ops from a cloud TPU would cost less than its energy"
            ),
            inputs={**inputs, "saving_usd_per_hour": _usd(saving, 6)},
            assumptions=_pick(
                a,
                (
                    "host_hardware_cost_usd",
                    "electricity_usd_per_kwh",
                    "modelled_watts_per_node",
                    "cloud_tpu_usd_per_hour",
                    "cloud_tpu_ops_per_second",
                ),
            ),  # fmt: skip
            sources=sources,
        ),
    }


def _roi_percent(value: Decimal, cost: Decimal) -> Decimal:
    return _round((value - cost) / cost * 100)


def _roi(
    costs: list[NodeCost],
    subscriptions: list[Subscription],
    provisioned_per_host: Decimal | None,
    a: dict,
    source: str,
    now: datetime,
) -> dict:
    hours = HOURS_PER_MONTH * ROI_MONTHS
    observed = [c for c in costs if c.usage.seconds > 0]
    node_seconds = sum((c.usage.seconds for c in observed), Decimal(0))
    ops_per_second = (
        sum(Decimal(c.usage.ops) for c in observed) / node_seconds if node_seconds else None
    )
    speeds = [c.usage.throughput_gops for c in observed if c.usage.throughput_gops]
    capacity = _dec(sum(speeds) / len(speeds)) * 10**9 if speeds else None
    cloud_ops, cloud_price = _dec(a["cloud_tpu_ops_per_second"]), a["cloud_tpu_usd_per_hour"]
    roi_assumptions = _pick(a, ("cloud_tpu_usd_per_hour", "cloud_tpu_ops_per_second"))
    value_sources = {
        "delivered_ops_per_second": "runtime ops counters over the window / observed node-seconds"
        " (all observed nodes)",
        "capacity_ops_per_second": "mean of each observed node's latest throughput_gops (ops"
        " while its kernels ran: its measured speed when fully loaded)",
        "value": "the cloud-TPU rent of the same ops: ops/s / cloud_tpu_ops_per_second x"
        " cloud_tpu_usd_per_hour, for 36 x 730 h",
        "costs": "the seed's scenario (upfront and monthly)",
        "assumptions": source,
    }
    out = {}
    for key in ("ranch", "own_node"):
        scenario = SCENARIOS[key]
        cost = scenario.upfront_usd + scenario.monthly_usd * ROI_MONTHS

        def value_of(ops: Decimal | None, scenario: Scenario = scenario) -> Decimal | None:
            if ops is None:
                return None
            return _usd(ops / cloud_ops * cloud_price * hours * scenario.nodes)

        delivered, loaded = value_of(ops_per_second), value_of(capacity)
        out[key] = figure(
            _roi_percent(delivered, cost) if delivered is not None else None,
            "% over 3 years, at the ops the fleet delivered",
            reason="no node's telemetry in the window: no measured throughput",
            inputs={
                "scenario": scenario.label,
                "nodes": scenario.nodes,
                "upfront_usd": scenario.upfront_usd,
                "monthly_usd": scenario.monthly_usd,
                "cost_3_years_usd": cost,
                "delivered_ops_per_second_per_node": (
                    _round(ops_per_second, 0) if ops_per_second is not None else None
                ),
                "value_3_years_usd": delivered,
                "capacity_ops_per_second_per_node": (
                    _round(capacity, 0) if capacity is not None else None
                ),
                "value_3_years_at_capacity_usd": loaded,
                "roi_at_capacity_percent": (
                    _roi_percent(loaded, cost) if loaded is not None else None
                ),
                "seed_projection": scenario.seed_projection,
            },
            assumptions=roi_assumptions,
            sources=value_sources,
        )

    managed = SCENARIOS["managed"]
    live = [s for s in subscriptions if _live_at(s, now)]
    billed = sum(s.quantity for s in live)
    revenue = _usd(Decimal(sum(_monthly_cents(s) for s in live)) / 100 / billed) if billed else None
    energy_per_node_hour = (
        sum((c.energy_usd for c in observed), Decimal(0)) / (node_seconds / 3600)
        if node_seconds
        else a["modelled_watts_per_node"] / 1000 * a["electricity_usd_per_kwh"]
    )
    energy_month = _usd(energy_per_node_hour * HOURS_PER_MONTH, 4)
    reason = None
    if revenue is None:
        reason = "no subscription counted in MRR: no actual revenue per node"
    elif provisioned_per_host is None:
        reason = "no live node on our hosts: the hardware per node cannot be measured"
    hardware = (
        _usd(a["host_hardware_cost_usd"] / provisioned_per_host) if provisioned_per_host else None
    )
    cost = value = None
    if reason is None:
        cost = _usd(hardware + energy_month * ROI_MONTHS)
        value = _usd(revenue * ROI_MONTHS)
    out["managed"] = figure(
        _roi_percent(value, cost) if cost else None,
        "% over 3 years, per node, for the operator",
        reason=reason or "the node costs nothing",
        inputs={
            "scenario": managed.label,
            "revenue_usd_per_node_month": revenue,
            "billed_nodes": billed,
            "nodes_per_host": _round(provisioned_per_host, 2) if provisioned_per_host else None,
            "hardware_usd_per_node": hardware,
            "energy_usd_per_node_month": energy_month,
            "cost_3_years_usd": cost,
            "revenue_3_years_usd": value,
            "seed_price_usd_per_node_month": managed.monthly_usd,
        },
        assumptions=_pick(
            a, ("host_hardware_cost_usd", "electricity_usd_per_kwh", "modelled_watts_per_node")
        ),  # fmt: skip
        sources={
            "revenue": "MRR / the nodes its subscriptions bill (actual prices paid)",
            "hardware": "host_hardware_cost_usd / the live nodes per host with nodes",
            "energy": (
                "observed nodes' energy cost per node-hour x 730"
                if node_seconds
                else "modelled: modelled_watts_per_node (no telemetry in the window)"
            ),
            "assumptions": source,
        },
    )
    return out


# ---- the report -----------------------------------------------------------------------------


def economics_report(*, days: int = DEFAULT_DAYS, now: datetime | None = None) -> dict:
    """Every figure for the current fleet over the last `days` days of telemetry."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}, not {days}")
    now = now or timezone.now()
    start = now - timedelta(days=days)
    row = assumptions_current()
    a, source = assumptions_values(row), assumptions_source(row)

    observed_in_window = TelemetrySample.objects.filter(created__gte=start, created__lte=now)
    nodes = list(
        Node.objects.filter(
            Q(state__in=LIVE_NODE_STATES) | Q(pk__in=observed_in_window.values("node_id"))
        )
        .select_related("account", "host", "plan")
        .order_by("created", "pk")
    )
    usage = _usage(nodes, start, now)
    sharing: dict[int | None, int] = {}
    for u in usage.values():
        if u.seconds > 0 and u.node.host_id is not None:
            sharing[u.node.host_id] = sharing.get(u.node.host_id, 0) + 1
    costs = {
        pk: _node_cost(u, sharing.get(u.node.host_id, 1) if u.node.host_id else 1, a)
        for pk, u in usage.items()
    }

    per_node = [
        {
            "node": c.usage.node.pk,
            "name": c.usage.node.name,
            "account": c.usage.node.account.name,
            "kind": c.usage.node.kind,
            "host": c.usage.node.host.name if c.usage.node.host else None,
            "state": c.usage.node.state,
            "cost_per_trillion_ops": _cost_figure([c], a, source, what="this node"),
        }
        for c in costs.values()
    ]
    observed = [c for c in costs.values() if c.usage.samples >= 2]
    fleet_cost = _cost_figure(observed, a, source, what="any node")
    fleet_cost["inputs"]["nodes_without_telemetry"] = [
        str(c.usage.node) for c in costs.values() if c.usage.samples < 2
    ]

    subscriptions = list(Subscription.objects.select_related("plan", "account").order_by("pk"))
    subscriptions = [s for s in subscriptions if s.plan.currency == CURRENCY]

    hosts = list(Host.objects.order_by("name"))
    by_host: dict[int, list[Node]] = {h.pk: [] for h in hosts}
    for node in nodes:
        if node.host_id in by_host:
            by_host[node.host_id].append(node)
    break_even = [
        _break_even(h, by_host[h.pk], costs, subscriptions, a, source, now)
        for h in hosts
        if h.is_active or by_host[h.pk]
    ]
    with_nodes = [len([n for n in ns if n.state in LIVE_NODE_STATES]) for ns in by_host.values()]
    with_nodes = [n for n in with_nodes if n]
    per_host = Decimal(sum(with_nodes)) / len(with_nodes) if with_nodes else None
    live_nodes = sum(1 for n in nodes if n.state in LIVE_NODE_STATES)

    return {
        "generated_at": now,
        "window": {"days": days, "start": start, "end": now},
        "assumptions": {**a, "source": source, "id": row.pk},
        "cost_per_trillion_ops": {"fleet": fleet_cost, "nodes": per_node},
        "break_even": break_even,
        "roi_3_years": _roi(list(costs.values()), subscriptions, per_host, a, source, now),
        "revenue": _revenue(subscriptions, a, source, now, live_nodes),
        "mrr_history": _history(subscriptions, now),
    }


def jsonable(value: Any) -> Any:
    """The report in JSON types: Decimal as its exact string, datetimes in ISO 8601."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value
