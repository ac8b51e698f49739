"""Filters of the staff dashboard's templates: a report's names and values in plain words."""

from datetime import datetime

from django import template

register = template.Library()


@register.filter
def words(name: str) -> str:
    """`hours_to_repay_from_revenue` → `hours to repay from revenue`."""
    return str(name).replace("_", " ")


@register.filter
def plain(value: object) -> str:
    """A report value as text: null as an em dash, lists and objects item by item."""
    if value is None:
        return "—"
    if isinstance(value, dict):
        return "; ".join(f"{words(k)}: {plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " | ".join(plain(v) for v in value) if value else "none"
    return str(value)


@register.filter
def moment(iso: str) -> str:
    """An ISO 8601 time of the report, to the minute, in UTC."""
    return f"{datetime.fromisoformat(iso):%Y-%m-%d %H:%M} UTC"
