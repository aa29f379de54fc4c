"""Jinja2 templates of the console, shipped as package data."""
