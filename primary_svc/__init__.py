"""primary_svc."""
