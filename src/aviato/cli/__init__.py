"""The `aviato` command: a thin shell over the SDK and the aviato.v1 API.

Each module holds one family of commands (sandboxes, exec, shell, logs, files, server, keys);
`main.py` assembles them into one click group and turns every failure into a single line on
stderr with a non-zero exit status. Nothing here is a public Python API: import `aviato` instead.
"""
