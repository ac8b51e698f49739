from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe

from portal.views import nodes


@require_safe
@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The signed-in customer's start page: their nodes."""
    return nodes.node_list(request)
