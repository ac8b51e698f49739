"""Limit/offset pagination that refuses what it cannot read (DRF's silently ignores
`offset=abc`): a client generated from the schema gets a 400 with the reason, not a default."""

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination

MAX_LIMIT = 500


class StrictLimitOffsetPagination(LimitOffsetPagination):
    default_limit = 100
    max_limit = MAX_LIMIT

    def _strict(self, request, name: str, default: int, low: int, high: int | None) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValidationError({name: [f"{name} must be an integer, not {raw!r}."]}) from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"{low} or more"
            raise ValidationError({name: [f"{name} must be {bound}."]})
        return value

    def get_limit(self, request) -> int:
        return self._strict(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request) -> int:
        return self._strict(request, self.offset_query_param, 0, 0, 2**31 - 1)

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for param in params:
            schema = param.setdefault("schema", {})
            if param["name"] == self.limit_query_param:
                schema.update({"minimum": 1, "maximum": self.max_limit})
            else:
                schema.update({"minimum": 0, "maximum": 2**31 - 1})
        return params
