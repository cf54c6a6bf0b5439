"""ProAssist Edge: export, quantize and run the ProAssist streaming video assistant on device."""

__version__ = "0.1.0"
