"""Storage: SQLAlchemy Core tables, migrations, engines and the batching writer."""
