"""Tests of the aviato service (`aviato.server`)."""
