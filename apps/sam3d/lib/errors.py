"""Errors of requests and of what they reach (the datastore, the PACS), neutral about HTTP: the server's edge
(lib/server/endpoints.py, ``ERROR_STATUS``) answers each with its status and message, and scripts report them as they
are."""


class InvalidRequest(ValueError):
    """A request that can never succeed as sent (the server answers 422)."""


class NotFound(LookupError):
    """What the request names is not there: an image, a label, a model (404)."""


class Conflict(Exception):
    """The request contradicts what is stored: a new scan under the id of a labelled one (409)."""


class Unreachable(Exception):
    """A service the server relies on (the PACS) does not answer; the request may succeed later (503)."""


class TimedOut(Exception):
    """What the request needs is still on its way from the PACS; ask again later (504)."""
