"""Alembic environment: the store passes its connection in ``config.attributes``.

New migration: ``alembic -x url=sqlite:///dev.db revision --autogenerate -m "..."`` from this folder's parent
with a temporary alembic.ini, or write one by hand in ``versions/``.
"""

from alembic import context
from sqlalchemy import create_engine

from service.store import Base

config = context.config
target_metadata = Base.metadata

connection = config.attributes.get("connection")
if connection is None:
    url = context.get_x_argument(as_dictionary=True)["url"]
    with create_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
