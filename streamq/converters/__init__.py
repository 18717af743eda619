"""Output formats behind one interface: see `base.Converter`."""

from .base import CardText, Converter, Stats, converter_for

__all__ = ["CardText", "Converter", "Stats", "converter_for"]
