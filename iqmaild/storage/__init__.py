"""Storage used by every stage: schema, migrations, the database handle, the directory."""
