"""The package version, in a module of its own: imported by the client and by records without importing the
package root (which imports the context, and with it half the package)."""

__version__ = "0.1.0"
