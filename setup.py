"""Shim for tools that need a setup.py (Beam's --setup_file on Dataflow); metadata is in setup.cfg."""

from setuptools import setup

setup()
