"""The seed's key-management API and usage dashboard, as one ASGI app.

::

    from meterkit.admin import Admin

    admin = Admin(meter, keystore, session_secret=secret)  # an ASGI app
    # in front of an API (Starlette, FastAPI): its routes first, the rest to the API
    app.add_middleware(AdminMiddleware, admin=admin)

See :class:`Admin` for the routes and options, and ``docs/dashboard.md``.
"""

from meterkit.admin._app import Admin, AdminMiddleware

__all__ = ["Admin", "AdminMiddleware"]
