"""Model-card templates, installed as the data-only package `retnet_hf.model_cards` (see pyproject.toml).

This file exists so that editable installs find the package: setuptools' editable finder does not resolve a
namespace package mapped under a regular one.
"""
