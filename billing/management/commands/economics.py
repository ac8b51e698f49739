"""manage.py economics [--json] [--days N]: the economics of the current fleet (cost per
trillion ops, break-even per host, 3-year ROI of the seed's scenarios, MRR, paying accounts,
churn, revenue per node, burn coverage, MRR history), each figure with its inputs, assumptions
and sources beside it (billing.economics)."""

import json
import textwrap

from django.core.management.base import BaseCommand, CommandError

from billing.economics import DEFAULT_DAYS, MAX_DAYS, economics_report, jsonable

WIDTH = 100


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return "; ".join(", ".join(f"{k} {_text(v)}" for k, v in row.items()) for row in value)
        return ", ".join(_text(v) for v in value) or "none"
    return str(value)


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="The report as JSON.")
        parser.add_argument(
            "--days",
            type=int,
            default=DEFAULT_DAYS,
            help=f"Telemetry window in days back from now (1-{MAX_DAYS}; {DEFAULT_DAYS}).",
        )

    def handle(self, *args, **options) -> None:
        days = options["days"]
        if not 1 <= days <= MAX_DAYS:
            raise CommandError(f"--days must be between 1 and {MAX_DAYS}, not {days}.")
        report = jsonable(economics_report(days=days))
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        self.print_report(report)

    def line(self, text: str, indent: int = 0) -> None:
        pad = " " * indent
        self.stdout.write(
            textwrap.fill(text, WIDTH, initial_indent=pad, subsequent_indent=pad + "    ")
        )

    def figure(self, label: str, figure: dict, indent: int = 2) -> None:
        if figure["value"] is None:
            self.line(f"{label}: null ({figure['reason']})", indent)
        else:
            self.line(f"{label}: {figure['value']} {figure['unit']}", indent)
        # Said once per section: what an earlier figure of it already said is not repeated
        # (the assumptions' own source is in the header).
        for name in ("inputs", "assumptions"):
            text = "; ".join(f"{k} {_text(v)}" for k, v in figure[name].items())
            if text and (name, text) not in self.said:
                self.said.add((name, text))
                self.line(f"{name}: {text}", indent + 4)
        for key, source in figure["sources"].items():
            if key != "assumptions" and (key, source) not in self.said:
                self.said.add((key, source))
                self.line(f"source of {key}: {source}", indent + 4)

    def section(self, title: str) -> None:
        self.said: set[tuple[str, str]] = set()
        self.line("")
        self.line(title)

    def print_report(self, r: dict) -> None:
        w = r["window"]
        self.line(f"Economics at {r['generated_at']}; telemetry window {w['days']} days")
        self.line(f"from {w['start']}", 2)
        a = r["assumptions"]
        self.line(f"Assumptions ({a['source']}):")
        for name, value in a.items():
            if name not in ("source", "id"):
                self.line(f"{name} = {value}", 2)

        self.section("Cost per trillion ops")
        self.figure("fleet", r["cost_per_trillion_ops"]["fleet"])
        for node in r["cost_per_trillion_ops"]["nodes"]:
            label = (
                f"node {node['name']} ({node['kind']}, {node['state']}, account"
                f" {node['account']}, host {node['host'] or 'its own machine'})"
            )
            self.figure(label, node["cost_per_trillion_ops"])

        self.section("Break-even per host")
        if not r["break_even"]:
            self.line("no hosts", 2)
        for host in r["break_even"]:
            self.figure(f"{host['host']}, from revenue", host["hours_to_repay_from_revenue"])
            self.figure(f"{host['host']}, against a cloud TPU", host["hours_to_repay_vs_cloud_tpu"])

        self.section("3-year ROI of the seed's scenarios")
        for key, figure in r["roi_3_years"].items():
            self.figure(key, figure)

        self.section("Revenue")
        for key, figure in r["revenue"].items():
            self.figure(key, figure)

        self.section("MRR history (subscriptions at month end; paid invoices by period start)")
        for month in r["mrr_history"]:
            self.line(
                f"{month['month']}  MRR {month['mrr_usd']:>10} USD  paying accounts"
                f" {month['paying_accounts']:>3}  paid {month['paid_usd']:>10} USD",
                2,
            )
