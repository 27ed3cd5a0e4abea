"""Alembic environment for Keel's feedback store: run by keel.service.feedback.migrate with an open connection
(config.attributes["connection"]); no alembic.ini and no URL of its own."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
