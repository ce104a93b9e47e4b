"""HTTP: the Starlette application, public and customer routes, the server entry point."""
