"""DICOMweb-to-DIMSE gateway."""

__version__ = "0.1.0"
