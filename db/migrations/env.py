"""Alembic environment of the ledger: migrations run on the connection ``db.migrate`` hands over.

No alembic.ini is read: ``db.migrate.upgrade_schema`` builds the configuration in code and
passes an open connection (inside its transaction, holding the migration lock) in
``config.attributes["connection"]``. For a developer's ``alembic revision``, see db/migrate.py.
"""
from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
