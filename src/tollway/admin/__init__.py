"""The operator's HTTP API under ``/admin/v1``, guarded by the admin token."""
