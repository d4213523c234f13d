"""aviato's benchmarks: one command measures aviato and its references side by side.

    python -m benchmarks [--quick] [--only create,burst,exec,rl,files,density] [--json PATH]
                         [--no-docker]

Systems (each does the same work, see `scenarios.py`):

- ``aviato``: the public SDK with its embedded local service (`sdk.py`);
- ``floor``: plain `subprocess` on the host, no isolation (`floor.py`);
- ``bwrap``: raw bubblewrap with aviato's own command line, one `bwrap` per command
  (`raw_bwrap.py`);
- ``docker``: Debian's `docker.io` engine, started privately, driven by its HTTP API
  (`docker_ref.py`); skipped with a reason when it is not installed.

Prints a Markdown table of absolute figures and ratios (aviato ÷ reference) and writes every
number to a JSON file. Results and method: docs/benchmarks.md.
"""
