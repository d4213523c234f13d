"""OCI and Docker images: references, the registry client, the content store, layer unpacking.

The runtime uses `store.ImageStore` to pull an image once and to find the unpacked root that
its sandboxes bind read-only (`aviato.runtime.oci_image_root` turns a stored image into the
runtime's `ImageRoot`). Nothing here runs sandboxes, and nothing here imports `aviato.runtime`:
the runtime uses this package, never the reverse (tests/images/test_layering.py). See
docs/images.md.
"""
