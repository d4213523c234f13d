"""The in-sandbox half of `aviato.CodeContext`: the driver, shipped as package data.

The SDK never imports these modules; it reads their text and sends it to ``python3`` in the
sandbox over the command's stdin (`aviato._code_wire.driver_sources`), where the bootstrap makes
them the package ``_aviato_driver`` (so their relative imports work) and calls
``driver.main()``. They import only the standard library (and IPython when the sandbox's Python
has it), never `aviato`, and run on Python 3.8 and later: `rich` (outputs, values, errors),
`kernels` (our interpreter and IPython's), `driver` (the channel and the loop).
"""
