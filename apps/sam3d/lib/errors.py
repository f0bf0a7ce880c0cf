"""The error of a request that can never succeed as sent: the server answers it with a 4xx and its message."""


class InvalidRequest(ValueError):
    """A request that can never succeed as sent; the server answers it with a 4xx and this message."""
