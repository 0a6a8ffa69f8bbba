"""The local web app (``python cli.py serve``): search a gallery in the browser, and a JSON API.

Needs the ``web`` extra (Starlette, uvicorn, python-multipart): ``pip install -e '.[web]'``.
``app.create_app(service)`` builds the Starlette app over a ``service.GalleryService``; ``serve.run``
starts it with uvicorn. Routes are thin: they call the library (query, store, fetch, decode, thumbs)
through ``service.py``.
"""

MISSING = "serve needs the web extra: pip install -e '.[web]' (Starlette, uvicorn, python-multipart)"


def require() -> None:
    """Raise ConfigError with the one line that says how to install the web extra, when it is missing."""
    from ..errors import ConfigError

    try:
        import multipart  # noqa: F401  (python-multipart)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None
