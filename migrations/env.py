"""Alembic environment: runs on the connection `iqmaild migrate` hands over.

For developers' `alembic revision --autogenerate`, pass the database with
`-x url=sqlite+aiosqlite:///path.db`.
"""

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from iqmaild.storage.models import Base

target_metadata = Base.metadata


def _run(connection):
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_standalone(url: str) -> None:
    async def main() -> None:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(_run)
        await engine.dispose()

    asyncio.run(main())


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("use `iqmaild migrate`, or pass -x url=DATABASE_URL")
    _run_standalone(url)
