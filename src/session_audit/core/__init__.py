"""What every domain shares and no domain owns: configuration, the database pool and its
migrations, authentication, errors, value validation, SQL fragments and strict JSON bodies.

Nothing in here imports a domain package (sessions, analytics, reports)."""
