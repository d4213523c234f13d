"""The aviato service (control plane): gRPC API, auth, registry, lifecycle and placement.

Run it with `python -m aviato.server` (see `__main__`), or embed it with `app.serve`. The CLI's
`keys` commands use `auth.create_key/list_keys/revoke_key` on a `registry.Registry` directly.
This package imports the runtime only through `aviato.runtime.base` (and `app` picks
`aviato.runtime.bubblewrap` for the local placement).
"""
