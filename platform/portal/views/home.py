from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse

from portal.views.base import account_of, page


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The signed-in customer's start page (the node list takes over once it exists)."""
    return page(request, "portal/home.html", {"account": account_of(request)})
