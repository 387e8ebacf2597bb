"""The package version, in its own module so that any part of tailor can read it without importing the
package face (tailor/__init__.py)."""

__version__ = "0.1.0"
