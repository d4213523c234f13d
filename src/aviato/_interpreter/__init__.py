"""The in-sandbox half of `aviato.CodeContext`: `driver.py`, shipped as package data.

The SDK never imports `driver`; it reads the file's text and sends it to ``python3`` in the
sandbox over the command's stdin (`aviato._code_wire.driver_source`). The driver imports only
the standard library (and IPython when the sandbox's Python has it), never `aviato`, and runs
on Python 3.8 and later.
"""
