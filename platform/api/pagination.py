"""Integer query parameters read strictly, and limit/offset pagination built on them (DRF's
silently ignores `offset=abc`): a client generated from the schema gets a 400 with the reason
under the parameter's name, not a default."""

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_LIMIT = 500


def int_query_param(request, name: str, *, default: int, low: int, high: int) -> int:
    """`?name=` as an integer within [low, high]; absent or empty is `default`."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: [f"{name} must be an integer, not {raw!r}."]}) from None
    if not low <= value <= high:
        raise ValidationError({name: [f"{name} must be between {low} and {high}."]})
    return value


class StrictLimitOffsetPagination(LimitOffsetPagination):
    default_limit = 100
    max_limit = MAX_LIMIT

    def get_limit(self, request) -> int:
        return int_query_param(
            request, self.limit_query_param, default=self.default_limit, low=1, high=self.max_limit
        )

    def get_offset(self, request) -> int:
        return int_query_param(request, self.offset_query_param, default=0, low=0, high=2**31 - 1)

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for param in params:
            schema = param.setdefault("schema", {})
            if param["name"] == self.limit_query_param:
                schema.update({"minimum": 1, "maximum": self.max_limit})
            else:
                schema.update({"minimum": 0, "maximum": 2**31 - 1})
        return params
